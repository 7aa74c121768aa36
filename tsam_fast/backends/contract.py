"""The op contract, declared once: one table entry per fused op, and everything derived from it.

A backend implements the seven ops of ``OPS`` over the flat buffers of one bucket (docs/design.md §7).
Each entry (``OpSpec``) holds the op's name, its ``torch.library`` schema (mutated buffers annotated
``Tensor(a!)``), the formula, a sample-input function and the op's modes (``cases``) with their minimum
memory traffic. Derived from the table here:

* ``define(ns)``: the schemas defined in a ``torch.library`` namespace, with generic fake kernels
  (a reduction returns a 0-dim fp32 tensor on its buffer's device, an in-place op returns None). Both
  fused namespaces are defined by it: ``torch.ops.tsam_fast`` (the C++ extension registers only the
  kernels, csrc/ops.cpp) and ``torch.ops.tsam_fast_triton`` (``register``, from kernels/ops.py);
* ``register(ns, impls)``: ``define`` plus one device-generic Python kernel per op (the Triton launchers);
* ``Forwarding``: the eager implementation, or the registered op while ``torch.compile`` traces;
* ``opcheck_cases``: the ``torch.library.opcheck`` inputs of every op and mode; the op tests and
  ``bench/bench_ops.py`` take their inputs and byte counts from the same entries.

Conventions of every op (docs/design.md §7):

* ``theta`` is a list of tensors (``Tensor[]``): the parameters of one bucket, each seen as its own storage
  flat (1-D, contiguous; ``tsam_fast.bucket.storage_view``), never copied into a buffer of ours. The
  bucket's flat index space is their concatenation in list order: element ``k`` of ``theta[i]`` is
  position ``offset_i + k``, ``offset_i`` the sum of the lengths before it. Every other buffer
  (``theta0``, ``grad``, ``acc``, ``momentum``, ``precond``, ``out``) is one flat 1-D contiguous buffer
  of that length. Each op is one dispatch over the whole list ("multi-tensor apply").
* ``theta0``, ``grad`` and ``precond`` are in the parameter dtype (fp32, bf16, fp16), like ``theta``;
  ``acc`` (the tilt accumulator A), ``momentum`` (HMC's v) and ``out`` are fp32. All arithmetic is fp32,
  one rounding to the dtype of each stored result.
* Scalars (``coef``, ``kick``, ``drift``, ``a``, ``b``, ``inv_z``) are 0-dim fp32 tensors on the
  buffers' device; reductions return one. No op reads a device value on the host.
* ``runs`` (``int[] runs``) are flat ``(buffer_offset, global_offset, length)`` triples:
  ``b0, g0, n0, b1, g1, n1, ...``; element ``b + k`` of the flat space takes the noise of global element
  ``g + k`` (docs/design.md §4). An op with a ``theta`` list takes exactly one run per tensor, in order
  (``b = offset_i``, ``n = len(theta[i])``); ``noise_sqnorm`` and ``fill_noise`` take the same runs.
  ``flat_runs`` turns a bucket's tuple of triples into this form.
* ``seed`` is a 63-bit int (``rng.stream_seed``); ``int? seed`` = None means no noise (``start="none"``):
  the op then copies theta0 and never runs the generator. xi below is that noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

#: the seed of the sample inputs: above 2**32, so both halves of the Philox key are used
SAMPLE_SEED = 2**40 + 12345


# -- runs --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _flatten(runs: tuple) -> Tuple[int, ...]:
    return tuple(int(v) for run in runs for v in run)


def flat_runs(runs) -> Tuple[int, ...]:
    """A bucket's runs (a tuple of ``(buffer_offset, global_offset, length)`` triples) as the ops'
    ``int[] runs`` (cached: a bucket's runs are the same tuple every step)."""
    return _flatten(runs if isinstance(runs, tuple) else tuple(tuple(r) for r in runs))


@functools.lru_cache(maxsize=1024)
def _triples(flat: tuple) -> Tuple[Tuple[int, int, int], ...]:
    if len(flat) % 3:
        raise ValueError(f"runs must be (buffer_offset, global_offset, length) triples, got {len(flat)} integers")
    return tuple((int(flat[i]), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3))


def run_triples(runs: Sequence[int]) -> Tuple[Tuple[int, int, int], ...]:
    """The ops' flat ``int[] runs`` back as a tuple of triples (for implementations that walk them)."""
    return _triples(runs if isinstance(runs, tuple) else tuple(runs))


def sample_sizes(n: int) -> Tuple[int, ...]:
    """Lengths of the tensors of a sample ``theta`` list of ``n`` elements in all: an empty tensor, a
    1-element one and odd sizes, so segments and tiles start and end everywhere."""
    if n <= 1:
        return (0, n)
    if n < 5:
        return (1, 0, n - 1)
    third = n // 3 | 1
    return (1, 0, third, n - 1 - third)


def tensor_runs(sizes: Sequence[int], starts: Sequence[int]) -> Tuple[int, ...]:
    """One run per tensor of a ``theta`` list with these lengths: the tensor's offset in the flat space,
    its first global index ``starts[i]``, its length."""
    out, offset = [], 0
    for n, g in zip(sizes, starts):
        out += [offset, g, n]
        offset += n
    return tuple(out)


def sample_runs(n: int) -> Tuple[int, ...]:
    """The runs of a sample bucket of ``n`` elements (``sample_sizes``): global offsets that are not
    multiples of 4 (the first and last Philox counters of each run are shared with elements outside it)
    and that jump between the tensors, as a frozen parameter between two trainable ones makes them."""
    sizes, starts, g = sample_sizes(n), [], 13
    for k in sample_sizes(n):
        starts.append(g)
        g += k + 1002
    return tensor_runs(sizes, starts)


# -- sample inputs -----------------------------------------------------------------------------------
# Each returns the op's arguments in schema order, freshly drawn from torch's global generator: random
# normal buffers (never zeros, never constant), fp32 scalars, runs that straddle Philox counters.


def _buf(n, dtype, device):
    return torch.randn(n, device=device).to(dtype)


def _params(n, dtype, device):
    """A sample ``theta`` list: ``sample_sizes(n)`` tensors viewing one storage at odd offsets with gaps
    between them (unaligned data pointers; the gaps, like a frozen parameter's storage, must not change:
    ``gaps_of`` reads them)."""
    sizes = sample_sizes(n)
    parent = _buf(sum(sizes) + 2 * len(sizes) + 1, dtype, device)
    out, pos = [], 1
    for k in sizes:
        out.append(parent[pos:pos + k])
        pos += k + 2
    return out


def gaps_of(theta: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The elements of a sample ``theta`` list's storage that lie between its tensors (a copy), or None
    when the tensors do not share one storage."""
    if not theta or any(t._base is None or t._base is not theta[0]._base for t in theta):
        return None
    parent = theta[0]._base
    keep = torch.ones(parent.numel(), dtype=torch.bool, device=parent.device)
    for t in theta:
        keep[t.storage_offset():t.storage_offset() + t.numel()] = False
    return parent[keep].clone()


def _f32(n, device):
    return torch.randn(n, device=device)


def _s(x, device):
    return torch.tensor(x, dtype=torch.float32, device=device)


def _sample_noise_sqnorm(n, dtype, device, *, seed=SAMPLE_SEED):
    return (sample_runs(n), seed, torch.device(device))


def _sample_sqnorm(n, dtype, device, *, scaled=False):
    return (_params(n, dtype, device), _buf(n, dtype, device) if scaled else None)


def _sample_perturb(n, dtype, device, *, seed=SAMPLE_SEED, coef=0.37, save_backup=False):
    return (_params(n, dtype, device), _buf(n, dtype, device), sample_runs(n), seed, _s(coef, device), save_backup)


def _sample_fill_noise(n, dtype, device, *, seed=SAMPLE_SEED, coef=1.7):
    return (_f32(n, device), sample_runs(n), seed, _s(coef, device))


def _sample_leapfrog(n, dtype, device, *, mode="ascent", kick=0.05 / 3.3, drift=None):
    drift = (0.7 if mode == "hmc" else 1.0) if drift is None else drift
    theta, grad = _params(n, dtype, device), _buf(n, dtype, device)
    momentum = _f32(n, device) if mode == "hmc" else None
    precond = _buf(n, dtype, device) if mode == "adaptive" else None
    return (theta, grad, _s(kick, device), _s(drift, device), momentum, precond)


def _sample_tilt_accumulate(n, dtype, device, *, first=False, seed=SAMPLE_SEED, a=0.8, b=1.3, coef=0.21):
    return (_f32(n, device), _buf(n, dtype, device), _s(a, device), _s(b, device), first, _params(n, dtype, device),
            _buf(n, dtype, device), sample_runs(n), seed, _s(coef, device))


def _sample_finalize(n, dtype, device, *, first=False, a=0.6, b=0.3, inv_z=1 / 2.9):
    return (_f32(n, device), _buf(n, dtype, device), _s(a, device), _s(b, device), _s(inv_z, device), first,
            _params(n, dtype, device), _buf(n, dtype, device))


# -- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One mode of an op: keyword arguments of its sample function, and the op's minimum memory traffic
    in that mode, in passes over d elements of 4 bytes (fp32 buffers; docs/design.md §5)."""

    kwargs: Mapping[str, object]
    passes: int


@dataclass(frozen=True)
class OpSpec:
    """One op of the contract. ``schema`` is the torch.library schema without a namespace; ``cases``
    lists the modes the tests cover, the first being the one ``bench/bench_ops.py`` times."""

    name: str
    schema: str
    doc: str
    sample: Callable[..., tuple] = field(repr=False)
    cases: Mapping[str, Case] = field(repr=False)

    @functools.cached_property
    def parsed(self) -> torch._C.FunctionSchema:
        return torch._C.parse_schema(self.schema)

    @property
    def arg_names(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.parsed.arguments)

    @property
    def mutated(self) -> Tuple[str, ...]:
        """The arguments the op writes (``Tensor(x!)`` in the schema)."""
        return tuple(a.name for a in self.parsed.arguments if a.alias_info is not None and a.alias_info.is_write)

    @property
    def returns_tensor(self) -> bool:
        return len(self.parsed.returns) == 1

    def args(self, n: int, dtype: torch.dtype = torch.float32, device="cpu", case: Optional[str] = None,
             **kwargs) -> tuple:
        """Fresh sample arguments (schema order) for ``n`` elements: the mode ``case`` (default: the
        first), with ``kwargs`` overriding its sample keywords."""
        base = self.cases[case] if case is not None else next(iter(self.cases.values()))
        return self.sample(n, dtype, device, **{**base.kwargs, **kwargs})

    def passes(self, case: Optional[str] = None) -> int:
        return (self.cases[case] if case is not None else next(iter(self.cases.values()))).passes


OPS: Tuple[OpSpec, ...] = (
    OpSpec(
        "noise_sqnorm", "noise_sqnorm(int[] runs, int seed, Device device) -> Tensor",
        "sum(xi**2) over the runs, a 0-dim fp32 tensor on ``device`` (the generator only, no buffer read).",
        _sample_noise_sqnorm, {"runs": Case({}, 0)}),
    OpSpec(
        "sqnorm", "sqnorm(Tensor[] x, Tensor? scale=None) -> Tensor",
        "sum((scale * x)**2) over the flat space of the list x (scale: flat, 1 when None), a 0-dim fp32 "
        "tensor on x's device.",
        _sample_sqnorm, {"plain": Case({}, 1), "scaled": Case(dict(scaled=True), 2)}),
    OpSpec(
        "perturb",
        "perturb(Tensor(a!)[] theta, Tensor(b!) theta0, int[] runs, int? seed, Tensor coef, bool save_backup) -> ()",
        "theta0 <- theta if save_backup; then theta <- theta0 + coef * xi (theta <- theta0 when seed is None).",
        _sample_perturb,
        {"noise": Case({}, 2), "noise-backup": Case(dict(save_backup=True), 3),
         "no-noise": Case(dict(seed=None), 2)}),
    OpSpec(
        "fill_noise", "fill_noise(Tensor(a!) out, int[] runs, int seed, Tensor coef) -> ()",
        "out <- coef * xi (out: fp32; HMC's momentum draw).",
        _sample_fill_noise, {"runs": Case({}, 1)}),
    OpSpec(
        "leapfrog",
        "leapfrog(Tensor(a!)[] theta, Tensor grad, Tensor kick, Tensor drift, Tensor(b!)? momentum=None, "
        "Tensor? precond=None) -> ()",
        "With momentum: v <- v + kick * g; theta <- theta + drift * v. Without: theta <- theta + drift * "
        "((kick * g) * P), P = precond**2 (or 1). momentum and precond are not given together.",
        _sample_leapfrog,
        {"ascent": Case({}, 3), "adaptive": Case(dict(mode="adaptive"), 4), "hmc": Case(dict(mode="hmc"), 5)}),
    OpSpec(
        "tilt_accumulate",
        "tilt_accumulate(Tensor(a!) acc, Tensor grad, Tensor a, Tensor b, bool first, Tensor(b!)[] theta, "
        "Tensor theta0, int[] runs, int? seed, Tensor coef) -> ()",
        "A <- a * A + b * g (b * g when first: A not read); then theta <- theta0 + coef * xi (the next "
        "sample's start; theta <- theta0 when seed is None).",
        _sample_tilt_accumulate,
        {"later": Case({}, 5), "first": Case(dict(first=True), 4), "first-no-noise": Case(dict(first=True, seed=None), 4)}),
    OpSpec(
        "finalize",
        "finalize(Tensor acc, Tensor(a!) grad, Tensor a, Tensor b, Tensor inv_z, bool first, Tensor(b!)[] theta, "
        "Tensor theta0) -> ()",
        "grad <- (a * A + b * g) * inv_z (A not read when first); theta <- theta0: the end of a step.",
        _sample_finalize, {"later": Case({}, 5), "first": Case(dict(first=True), 4)}),
)

#: the table by op name
SPECS: Dict[str, OpSpec] = {op.name: op for op in OPS}
NAMES: Tuple[str, ...] = tuple(SPECS)


# -- registration ------------------------------------------------------------------------------------

_LIBS: Dict[str, torch.library.Library] = {}  # namespace -> the Library holding its definitions (kept alive)


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, torch.device):
            return a
    raise TypeError("a reduction of the op contract needs a tensor or a device argument")


def _fake(op: OpSpec) -> Callable:
    """The op's FakeTensor kernel: metadata only (shapes, dtypes, devices), nothing computed."""
    if op.returns_tensor:
        def fake_reduction(*args, **kwargs):
            return torch.empty((), dtype=torch.float32, device=_device_of(list(args) + list(kwargs.values())))
        return fake_reduction

    def fake_in_place(*args, **kwargs):
        return None
    return fake_in_place


def define(ns: str) -> torch.library.Library:
    """Define every op of the table in namespace ``ns`` (``torch.ops.<ns>.<op>``) with its fake kernel.

    Idempotent (a namespace is defined once per process). A "FRAGMENT" library: the C++ extension
    declares its diagnostics ops (``_isa``, ...) in another fragment of ``tsam_fast``. Kernels registered
    before the definition are checked against it here: the C++ extension is loaded first, and a C++
    kernel whose signature disagrees with the schema makes this raise a RuntimeError ("Inferred operator
    schema ... doesn't match"); the other order would abort the process inside the library load.
    """
    if ns in _LIBS:
        return _LIBS[ns]
    lib = torch.library.Library(ns, "FRAGMENT")
    for op in OPS:
        lib.define(op.schema, tags=(torch.Tag.pt2_compliant_tag,))
        torch.library.register_fake(f"{ns}::{op.name}", _fake(op), lib=lib)
    _LIBS[ns] = lib
    return lib


def register(ns: str, impls: Mapping[str, Callable]) -> torch.library.Library:
    """``define(ns)`` and register ``impls[name]`` (taking the schema's arguments) as each op's kernel
    for every device (CompositeExplicitAutograd): the Triton launchers run on CUDA tensors, and on CPU
    tensors in the interpreter."""
    missing = set(NAMES) - set(impls)
    if missing:
        raise ValueError(f"no implementation of {sorted(missing)} for namespace {ns}")
    lib = define(ns)
    for op in OPS:
        lib.impl(op.name, impls[op.name], "CompositeExplicitAutograd")
    return lib


def registered(ns: str, name: str) -> torch._ops.OpOverload:
    """The registered op ``torch.ops.<ns>.<name>.default``."""
    return getattr(getattr(torch.ops, ns), name).default


def _forwarder(op: OpSpec, ns: str, eager: Callable) -> Callable:
    compiled = registered(ns, op.name)

    def forward(*args, **kwargs):
        if torch.compiler.is_compiling():  # an opaque op with declared mutations, not the launcher's Python
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)  # no dispatcher round trip per call

    forward.__name__ = forward.__qualname__ = op.name
    forward.__doc__ = op.doc
    return forward


class Forwarding:
    """Ops whose eager implementations are Python callables registered in namespace ``ns``: each op
    calls its implementation directly, or the registered ``torch.ops.<ns>.<op>`` while torch.compile
    traces (so compiled code sees one opaque op with its mutations declared)."""

    def __init__(self, ns: str, impls: Mapping[str, Callable]):
        self.namespace = ns
        for op in OPS:
            setattr(self, op.name, _forwarder(op, ns, impls[op.name]))


# -- opcheck -----------------------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_cases(ns: str, n: int = 37, device="cpu",
                  dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16)
                  ) -> List[Tuple[str, str, str, torch.dtype]]:
    """``(id, op name, case, dtype)`` of every op and mode (and every dtype of ``dtypes`` for the ops
    with parameter-dtype buffers): the ``torch.library.opcheck`` inputs of namespace ``ns`` are
    ``SPECS[name].args(n, dtype, device, case)``."""
    out = []
    for op in OPS:
        dtyped = any(t.dtype == torch.bfloat16 for a in op.args(1, torch.bfloat16, "cpu")
                     for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor))
        for case in op.cases:
            for dtype in (dtypes if dtyped else dtypes[:1]):
                out.append((f"{ns}.{op.name}-{case}-{str(dtype).replace('torch.', '')}", op.name, case, dtype))
    return out


def opcheck(ns: str, name: str, case: str, dtype: torch.dtype, n: int = 37, device="cpu",
            test_utils: Sequence[str] = OPCHECK_UTILS) -> None:
    """``torch.library.opcheck`` of ``torch.ops.<ns>.<name>`` on fresh sample inputs of mode ``case``."""
    torch.library.opcheck(registered(ns, name), SPECS[name].args(n, dtype, device, case), test_utils=test_utils)
