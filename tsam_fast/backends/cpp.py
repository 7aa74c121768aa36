"""The fused C++ CPU backend: the op contract (``contract.py``) as ``torch.ops.tsam_fast.*`` operators (csrc/).

The extension registers only the kernels; the schemas are defined from ``contract.OPS`` right after it
is loaded (``contract.define``), which is where the dispatcher checks every C++ kernel's signature
against its schema (docs/design.md §7).

Where the operators come from, in order:

1. the module built ahead of time by ``pip install --no-build-isolation -e .`` (``tsam_fast._C``);
2. otherwise a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load`` into a cache
   directory (``$TSAM_FAST_BUILD_DIR``, default ``~/.cache/tsam_fast/cpp-<hash of sources, flags, torch>``).
   The first build prints one line; later processes find the library in the cache and load it.

If neither works (no compiler, no ninja, no sources), ``probe()`` reports the backend unavailable with
the original error: ``backend="auto"`` then falls back to the reference, ``backend="cpp"`` raises.

Environment knobs (tests, debugging): ``TSAM_FAST_CPP_DISABLE=1`` reports the backend unavailable;
``TSAM_FAST_CPP_JIT=1`` skips the prebuilt module; ``TSAM_FAST_CPP_ISA=scalar|avx2|avx512`` caps the
instruction set of the kernels (otherwise the best one this CPU runs, chosen at run time).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import weakref
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import contract
from .base import Backend, BackendStatus
from .contract import flat_runs

# Compiler flags of both builds (setup.py reads them from here). -ffp-contract=off: the kernels do the reference's
# fp32 multiplies and adds one rounding at a time, so results match it bit for bit; no -march=native: the
# SIMD code paths are chosen at run time (csrc/ops.cpp).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
LD_FLAGS = ["-fopenmp"]
JIT_NAME = "tsam_fast_cpp"
#: the torch.library namespace of the operators
NAMESPACE = "tsam_fast"

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
    """Whether the extension is loaded (its diagnostics op ``_isa`` is declared by the library itself)."""
    return hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), "_isa")


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
    """The fake kernel of the diagnostics op ``_philox_words`` (the contract's come with ``contract.define``)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake(f"{NAMESPACE}::_philox_words")
    def _(seed, counter, ncounters):
        return torch.empty((ncounters, 4), dtype=torch.int64)


class CppOps:
    """The op contract on CPU buffers via ``torch.ops.tsam_fast`` (fused, SIMD, OpenMP): one attribute per
    op of ``contract.OPS``, the registered operator itself (it takes the schema's arguments).

    Each op generates the noise it needs from the counter-based generator; whether a random start's noise
    is kept between its norm and its use is the backend's choice (``CppBackend``).
    """

    namespace = NAMESPACE

    def __init__(self):
        for op in contract.OPS:
            setattr(self, op.name, contract.registered(NAMESPACE, op.name))

    @property
    def isa(self) -> str:
        """The instruction set the kernels run with here ("avx512", "avx2" or "scalar")."""
        return getattr(torch.ops, NAMESPACE)._isa()


#: buckets of at least this many elements keep a random start's noise from its norm to its use
KEEP_MIN = 1 << 16
#: ``TSAM_FAST_CPP_KEEP_NOISE=0``: never keep it (4 bytes per parameter less; the noise generated twice)
KEEP_ENV = "TSAM_FAST_CPP_KEEP_NOISE"


class CppBackend(Backend):
    """The C++ ops as the engine uses them. On the CPU the counter-based noise is compute-bound (about 1 ns
    per element on 2 AVX2 cores, against 0.1-0.2 ns for a pass over memory), and a random start needs it
    twice: for its norm, then to move the parameters. A bucket of at least ``KEEP_MIN`` elements keeps it
    in between (one fp32 buffer per bucket, ``held_bytes``; docs/design.md §5): ``noise_sqnorm`` writes it
    (``fill_noise``) and sums its squares (``sqnorm``), and the ``perturb`` or ``tilt_accumulate`` of the
    same seed runs without noise, then adds ``coef * xi`` from the buffer (``leapfrog`` without momentum):
    the same fp32 operations, one rounding each, as the fused op's. Any other seed regenerates."""

    def __init__(self, ops):
        super().__init__("cpp", ops)
        self._kept: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # bucket -> [seed, noise]
        self._one = torch.ones(())
        self.keep = os.environ.get(KEEP_ENV) != "0"

    def held_bytes(self, buckets=None) -> int:
        held = list(self._kept.items())
        if buckets is not None:
            ids = {id(b) for b in buckets}
            held = [(b, h) for b, h in held if id(b) in ids]
        return sum(h[1].numel() * h[1].element_size() for _, h in held)

    def noise_sqnorm(self, bucket, seed: int) -> torch.Tensor:
        if not self.keep or bucket.numel < KEEP_MIN:
            return super().noise_sqnorm(bucket, seed)
        entry = self._kept.get(bucket)
        if entry is None or entry[1].numel() != bucket.numel:
            entry = self._kept[bucket] = [None, torch.empty(bucket.numel, dtype=torch.float32)]
        entry[0] = None  # overwritten below: valid again once written
        self.ops.fill_noise(entry[1], flat_runs(bucket.noise_runs), seed, self._one)
        entry[0] = seed
        return self.ops.sqnorm([entry[1]], None)

    def _recall(self, bucket, seed: Optional[int]) -> Optional[torch.Tensor]:
        entry = self._kept.get(bucket) if seed is not None else None
        return entry[1] if entry is not None and entry[0] == seed else None

    def perturb(self, bucket, seed, coef, save_backup: bool = False, base=None) -> None:
        xi = self._recall(bucket, seed)
        if xi is None:
            return super().perturb(bucket, seed, coef, save_backup, base)
        self.ops.perturb(bucket.theta, bucket.backup if base is None else base, flat_runs(bucket.runs), None, coef,
                         save_backup)
        self.ops.leapfrog(bucket.theta, xi, coef, self._one, None, None)
        bucket.publish()

    def tilt_accumulate(self, bucket, a, b, first: bool, seed, coef, base=None) -> None:
        xi = self._recall(bucket, seed)
        if xi is None:
            return super().tilt_accumulate(bucket, a, b, first, seed, coef, base)
        self.ops.tilt_accumulate(bucket.acc, bucket.grad, a, b, first, bucket.theta,
                                 bucket.backup if base is None else base, flat_runs(bucket.runs), None, coef)
        self.ops.leapfrog(bucket.theta, xi, coef, self._one, None, None)
        bucket.publish()


def probe() -> Tuple[Optional[Backend], BackendStatus]:
    """(backend, status): the backend if the operators load here, else None and the original reason."""
    if os.environ.get("TSAM_FAST_CPP_DISABLE") == "1":
        return None, BackendStatus("cpp", False, ("cpu",), "disabled by TSAM_FAST_CPP_DISABLE=1")
    try:
        origin = _load()
        contract.define(NAMESPACE)  # raises if a kernel's C++ signature disagrees with the table
        _register_fakes()
        ops = CppOps()
        isa = ops.isa
        backend = CppBackend(ops)
    except Exception as exc:
        return None, BackendStatus("cpp", False, ("cpu",), f"the C++ extension could not be loaded: {exc}")
    return backend, BackendStatus("cpp", True, ("cpu",),
                                  f"fused C++ CPU kernels ({isa}, {torch.get_num_threads()} threads; {origin})")
