"""The fused C++ CPU backend: the op contract (``base.py``) as ``torch.ops.tsam_fast.*`` operators (csrc/).

Where the operators come from, in order:

1. the module built ahead of time by ``pip install --no-build-isolation -e .`` (``tsam_fast._C``);
2. otherwise a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load`` into a cache
   directory (``$TSAM_FAST_BUILD_DIR``, default ``~/.cache/tsam_fast/cpp-<hash of sources, flags, torch>``).
   The first build prints one line; later processes find the library in the cache and load it.

If neither works (no compiler, no ninja, no sources), ``probe()`` reports the backend unavailable with
the original error: ``backend="auto"`` then falls back to the reference, ``backend="cpp"`` raises.

Environment knobs (tests, debugging): ``TSAM_FAST_CPP_DISABLE=1`` reports the backend unavailable;
``TSAM_FAST_CPP_JIT=1`` skips the prebuilt module; ``TSAM_FAST_CPP_STORE_NOISE=1`` keeps the noise between
its two passes instead of regenerating it (see CppBackend); ``TSAM_FAST_CPP_ISA=scalar|avx2|avx512``
caps the instruction set of the kernels (otherwise the best one this CPU runs, chosen at run time).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple

import torch

from .base import Backend, BackendStatus

# Compiler flags of both builds (setup.py reads them from here). -ffp-contract=off: the kernels do the reference's
# fp32 multiplies and adds one rounding at a time, so results match it bit for bit; no -march=native: the
# SIMD code paths are chosen at run time (csrc/ops.cpp).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
LD_FLAGS = ["-fopenmp"]
JIT_NAME = "tsam_fast_cpp"

_CSRC = Path(__file__).resolve().parents[2] / "csrc"


def source_files(csrc: Path = _CSRC):
    """The translation units of the extension (the headers they include live next to them)."""
    return sorted(str(p) for p in csrc.glob("*.cpp"))


def source_hash(csrc: Path = _CSRC) -> str:
    """Hash of every source and header, the flags and the torch/python versions: the JIT cache key."""
    h = hashlib.sha256()
    for p in sorted(csrc.glob("*")):
        if p.suffix in (".cpp", ".h"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(" ".join(CXX_FLAGS + LD_FLAGS).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


def jit_build_dir() -> Path:
    root = os.environ.get("TSAM_FAST_BUILD_DIR")
    if root:
        return Path(root)
    return Path.home() / ".cache" / "tsam_fast" / f"cpp-{source_hash()}"


def _ops_loaded() -> bool:
    return hasattr(torch.ops, "tsam_fast") and hasattr(torch.ops.tsam_fast, "finalize")


def _load_jit() -> str:
    """Build (first time) or load (later) the extension from csrc/; returns where it came from."""
    if not source_files():
        raise RuntimeError(f"the C++ sources are not there ({_CSRC}); reinstall tsam_fast from a source checkout")
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)")
    cpp_extension.verify_ninja_availability()  # raises "Ninja is required to load C++ extensions"
    build_dir = jit_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"{JIT_NAME}.so"
    if not lib.exists():
        print(f"tsam_fast: compiling the C++ CPU backend once (about a minute) into {build_dir}", file=sys.stderr,
              flush=True)
    cpp_extension.load(name=JIT_NAME, sources=source_files(), extra_cflags=CXX_FLAGS, extra_ldflags=LD_FLAGS,
                       build_directory=str(build_dir), is_python_module=False, verbose=False)
    return f"JIT build in {build_dir}"


def _stale_prebuilt() -> Optional[str]:
    """Why the prebuilt module must not be used (it is older than csrc/, e.g. after editing a kernel in an
    editable install), or None. Loading it would register the old operators and block the JIT build."""
    try:
        spec = importlib.util.find_spec("tsam_fast._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not _CSRC.is_dir():
        return None
    built = os.path.getmtime(spec.origin)
    newer = [p.name for p in _CSRC.glob("*") if p.suffix in (".cpp", ".h") and os.path.getmtime(p) > built]
    if not newer:
        return None
    return (f"prebuilt {Path(spec.origin).name} is older than csrc/ ({', '.join(sorted(newer))}); "
            "rerun 'pip install --no-build-isolation -e .' to refresh it")


def _load() -> str:
    """Make torch.ops.tsam_fast.* exist; returns a short description of where they came from."""
    if _ops_loaded():
        return "already loaded"
    aot_error = "skipped (TSAM_FAST_CPP_JIT=1)"
    stale = _stale_prebuilt()
    if stale:
        aot_error = stale
    elif os.environ.get("TSAM_FAST_CPP_JIT") != "1":
        try:
            from .. import _C  # noqa: F401  (built by pip install; loading it registers the operators)

            return "prebuilt module tsam_fast._C"
        except ImportError as exc:
            aot_error = f"{type(exc).__name__}: {exc}"
    try:
        origin = _load_jit()
        return f"{origin}; prebuilt module not used: {stale}" if stale else origin
    except Exception as exc:  # compiler/ninja missing or build failure: reported, never swallowed
        raise RuntimeError(f"no prebuilt module ({aot_error}) and the JIT build failed: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    """The telling line of an error: a compiler's first "error:" line, else the message's first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    line = errors[0] if errors else (lines[0] if lines else "")
    if len(line) > 300:
        line = line[:297] + "..."
    return f"{type(exc).__name__}: {line}"


_fakes_registered = False


def _register_fakes() -> None:
    """Fake (meta) kernels: shapes and dtypes only, so torch.compile / FakeTensor can trace the ops."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    lib = "tsam_fast::"

    @torch.library.register_fake(lib + "noise_sqnorm")
    def _(runs, seed):
        return torch.empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "noise_sqnorm_store")
    def _(xi, runs, seed):
        return xi.new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "sqnorm")
    def _(x, scale):
        return x.new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "_philox_words")
    def _(seed, counter, ncounters):
        return torch.empty((ncounters, 4), dtype=torch.int64)

    for name in ("perturb", "fill_noise", "leapfrog", "tilt_accumulate", "finalize"):
        torch.library.register_fake(lib + name)(lambda *args, **kwargs: None)


def _key(runs) -> tuple:
    """``runs`` as a hashable tuple of (buffer_offset, global_offset, length) tuples."""
    return runs if isinstance(runs, tuple) and all(isinstance(r, tuple) for r in runs) else \
        tuple(tuple(int(v) for v in r) for r in runs)


@functools.lru_cache(maxsize=256)
def _flat_runs(runs: tuple) -> Tuple[int, ...]:
    """The op's int[] form of ``runs`` (cached: a bucket's runs are the same tuple every step)."""
    return tuple(int(v) for run in runs for v in run)


class CppOps:
    """The op contract on CPU buffers via torch.ops.tsam_fast (fused, SIMD, OpenMP).

    Noise between its two passes (spec section 5): the random start needs xi twice, for its norm
    (``noise_sqnorm``) and then for the update (``perturb`` / ``tilt_accumulate``). By default it is
    generated twice. With ``store_noise=True`` (or TSAM_FAST_CPP_STORE_NOISE=1) ``noise_sqnorm`` keeps the
    normals in a per-bucket fp32 buffer (4 bytes per parameter, counted by ``held_bytes``) and the update
    reads them when its (runs, seed) match. Results are identical either way. Measured on a 2-core
    AVX-512 CPU (bench/cpp_overhead.py --noise, 10M parameters): storing saves ~5 ms per sample in the
    isolated ops, but whole steps come out equal within noise (93.7 vs 91.3 ms overhead, medians of one
    run), so the default keeps the optimizer's extra memory at theta0 + A.
    """

    #: buckets whose noise buffer is kept (least recently used ones are dropped beyond this)
    max_stored = 32

    def __init__(self, store_noise: Optional[bool] = None):
        self.ops = torch.ops.tsam_fast
        if store_noise is None:
            store_noise = os.environ.get("TSAM_FAST_CPP_STORE_NOISE", "0") == "1"
        self.store_noise = bool(store_noise)
        self._stored: "OrderedDict[tuple, list]" = OrderedDict()  # runs -> [seed, xi]

    @property
    def isa(self) -> str:
        """The instruction set the kernels run with here ("avx512", "avx2" or "scalar")."""
        return self.ops._isa()

    def held_bytes(self) -> int:
        """The kept noise buffers (4 bytes per parameter of every bucket seen recently, in this process)."""
        return sum(xi.numel() * 4 for _, xi in self._stored.values())

    def _stored_xi(self, runs, seed, n) -> Optional[torch.Tensor]:
        """The kept normals of (runs, seed) for a buffer of n elements, or None (then they are generated)."""
        if seed is None or not self._stored:
            return None
        entry = self._stored.get(runs)
        if entry is None or entry[0] != seed or entry[1].numel() != n:
            return None
        return entry[1]

    def noise_sqnorm(self, runs, seed, device):
        runs = _key(runs)
        if not self.store_noise:
            return self.ops.noise_sqnorm(_flat_runs(runs), seed)
        n = max((b + length for b, _, length in runs), default=0)
        entry = self._stored.pop(runs, None)
        xi = entry[1] if entry is not None and entry[1].numel() == n else torch.empty(n, dtype=torch.float32)
        self._stored[runs] = [seed, xi]
        while len(self._stored) > self.max_stored:
            self._stored.popitem(last=False)
        return self.ops.noise_sqnorm_store(xi, _flat_runs(runs), seed)

    def sqnorm(self, x, scale=None):
        return self.ops.sqnorm(x, scale)

    def perturb(self, theta, theta0, runs, seed, coef, save_backup):
        runs = _key(runs)
        self.ops.perturb(theta, theta0, _flat_runs(runs), seed, coef, save_backup,
                         self._stored_xi(runs, seed, theta.numel()))

    def fill_noise(self, out, runs, seed, coef):
        self.ops.fill_noise(out, _flat_runs(_key(runs)), seed, coef)

    def leapfrog(self, theta, grad, kick, drift, momentum=None, precond=None):
        self.ops.leapfrog(theta, grad, kick, drift, momentum, precond)

    def tilt_accumulate(self, acc, grad, a, b, first, theta, theta0, runs, seed, coef):
        runs = _key(runs)
        self.ops.tilt_accumulate(acc, grad, a, b, first, theta, theta0, _flat_runs(runs), seed, coef,
                                 self._stored_xi(runs, seed, theta.numel()))

    def finalize(self, acc, grad, a, b, inv_z, first, theta, theta0):
        self.ops.finalize(acc, grad, a, b, inv_z, first, theta, theta0)


def probe() -> Tuple[Optional[Backend], BackendStatus]:
    """(backend, status): the backend if the operators load here, else None and the original reason."""
    if os.environ.get("TSAM_FAST_CPP_DISABLE") == "1":
        return None, BackendStatus("cpp", False, ("cpu",), "disabled by TSAM_FAST_CPP_DISABLE=1")
    try:
        origin = _load()
        _register_fakes()
        ops = CppOps()
        isa = ops.isa
        backend = Backend("cpp", ops)
    except Exception as exc:
        return None, BackendStatus("cpp", False, ("cpu",), f"the C++ extension could not be loaded: {exc}")
    return backend, BackendStatus("cpp", True, ("cpu",),
                                  f"fused C++ CPU kernels ({isa}, {torch.get_num_threads()} threads; {origin})")
