"""The reference backend's fast path (``FastReferenceOps``, what ``backend="reference"`` and the ``auto``
fallback run) against the plain definition (``ReferenceOps``, the oracle): bit for bit.

Every op and mode of the contract table, in every dtype the reference runs (float64 included), on fresh
random inputs, at sizes below, on and across the chunk boundaries (shrunk here so that crossing them is
cheap, and once at the real size), with runs at global offsets that are not multiples of 4 and jump
between runs; the generator eager and compiled (and failing to compile); the kept noise of a step; and
whole TSAM trajectories with param groups, frozen parameters and float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tsam_fast
from tsam_fast import rng
from tsam_fast import backends as backends_mod
from tsam_fast.backends import contract
from tsam_fast.backends import noise as noise_mod
from tsam_fast.backends import reference_fast as fast_mod
from tsam_fast.backends.base import Backend
from tsam_fast.backends.noise import NoiseGenerator
from tsam_fast.backends.reference import REFERENCE_DTYPES, ReferenceOps
from tsam_fast.backends.reference_fast import FastReferenceBackend, FastReferenceOps

ORACLE = ReferenceOps()
DTYPES = REFERENCE_DTYPES
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
SMALL_CHUNK, SMALL_GEN = 96, 8  # elements per element-wise chunk, counters per generator call (shrunk)
SIZES = (0, 1, 7, 95, 96, 97, 389, 4097)  # below, on and across the shrunk chunk boundaries


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(fast_mod, "CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(noise_mod, "GEN_COUNTERS", SMALL_GEN)
    monkeypatch.setattr(fast_mod, "KEEP_MIN", 1)  # small buckets keep their noise too


def _equal(got, want, what):
    got, want = [got] if isinstance(got, torch.Tensor) else got, [want] if isinstance(want, torch.Tensor) else want
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        same = (g == w) | (g.isnan() & w.isnan())
        if not bool(same.all()):
            bad = (~same).reshape(-1).nonzero().reshape(-1)[:6].tolist()
            rows = ", ".join(f"[{i}] {g.reshape(-1)[i].item()!r} vs {w.reshape(-1)[i].item()!r}" for i in bad)
            raise AssertionError(f"{what}: {int((~same).sum())} of {w.numel()} elements differ; first: {rows}")


def _clone(a):
    if isinstance(a, list):
        return [t.clone() for t in a]
    return a.clone() if isinstance(a, torch.Tensor) else a


def _run(ops, name, args):
    """``name`` of ``ops`` on a private copy of ``args``: its result, or the buffers it wrote (a written
    parameter list as the tensors of the list)."""
    args = tuple(_clone(a) for a in args)
    spec = contract.SPECS[name]
    result = getattr(ops, name)(*args)
    if spec.returns_tensor:
        return [result]
    out = []
    for m in spec.mutated:
        a = args[spec.arg_names.index(m)]
        out.extend(a if isinstance(a, list) else [] if a is None else [a])
    return out


def _args(name, case, n, dtype, **kw):
    args = contract.SPECS[name].args(n, dtype, "cpu", case, **kw)
    if dtype == torch.float64:  # float64 buckets keep A and v in float64 (docs/design.md §7)
        args = tuple([t.double() for t in a] if isinstance(a, list) else
                     a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() else a
                     for a in args)
    return args


OP_CASES = [(name, case) for name in contract.NAMES for case in contract.SPECS[name].cases]


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("name,case", OP_CASES, ids=[f"{n}-{c}" for n, c in OP_CASES])
def test_every_op_bit_exact(small_chunks, name, case, dtype):
    fast = FastReferenceOps(NoiseGenerator(compile=False))
    for n in SIZES:
        # seeds above 2**32 (both key words) and one that is not; offsets of sample_runs straddle counters
        seed = contract.SAMPLE_SEED + n if n % 2 else 977
        kw = {"seed": seed} if "seed" in contract.SPECS[name].arg_names and case not in (
            "no-noise", "first-no-noise") else {}
        args = _args(name, case, n, dtype, **kw)
        _equal(_run(fast, name, args), _run(ORACLE, name, args), f"{name}[{case}] n={n} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
def test_norms_with_scratch_bit_exact(small_chunks, dtype):
    """The fp64 norms made in a held scratch buffer (the backend's CPU path) sum to the oracle's bits."""
    fast = FastReferenceOps(NoiseGenerator(compile=False))
    for n in SIZES:
        scratch = torch.full((n + 3,), float("nan"), dtype=torch.float64)  # longer, and stale
        for case in ("plain", "scaled"):
            x, scale = _args("sqnorm", case, n, dtype)
            _equal(fast.sqnorm(x, scale, scratch=scratch), ORACLE.sqnorm(x, scale), f"sqnorm[{case}] n={n}")
        runs, seed, device = _args("noise_sqnorm", "runs", n, dtype, seed=contract.SAMPLE_SEED + n)
        out = torch.full((n,), float("nan"))
        _equal(fast.noise_sqnorm(runs, seed, device, out=out, scratch=scratch[:n]),
               ORACLE.noise_sqnorm(runs, seed, device), f"noise_sqnorm n={n}")
        want = torch.zeros(n)
        for b, g, length in contract.run_triples(runs):
            want[b:b + length] = rng.normal(seed, g, length)
        _equal(out, want, f"kept noise n={n}")


def test_generator_matches_rng_normal_at_any_offset(small_chunks):
    gen = NoiseGenerator(compile=False)
    for seed in (0, 5, 2**62 + 2**33 + 11):
        for start in (0, 1, 2, 3, 4 * SMALL_GEN - 1, 2**35 + 3):  # counters beyond 2**32 use the high word
            for n in (1, 3, 4 * SMALL_GEN, 4 * SMALL_GEN + 1, 4 * SMALL_GEN * 3 + 6):
                out = gen.normal_(torch.empty(n), seed, start)
                _equal(out, rng.normal(seed, start, n), f"seed={seed} start={start} n={n}")


def test_generator_real_chunk_size():
    """One call across the real generator chunk and one element-wise op across the real chunk."""
    n = 4 * noise_mod.GEN_COUNTERS + 9
    _equal(NoiseGenerator(compile=False).normal_(torch.empty(n), 321, 6), rng.normal(321, 6, n), "generator")
    args = _args("perturb", "noise-backup", fast_mod.CHUNK + 5, torch.float32)
    _equal(_run(FastReferenceOps(NoiseGenerator(compile=False)), "perturb", args), _run(ORACLE, "perturb", args),
           "perturb across CHUNK")


def test_philox_int64_matches_definition():
    g = torch.Generator().manual_seed(7)
    words = [torch.randint(0, 2**32, (4099,), generator=g, dtype=torch.int64) for _ in range(4)]
    words[1][:3] = torch.tensor([0, 2**32 - 1, 2**31])
    for k0, k1 in ((0, 0), (2**32 - 1, 2**32 - 1), (0x9E3779B9, 12345)):
        for got, want in zip(rng.philox4x32_int64(*words, k0, k1), rng.philox4x32(*words, k0, k1)):
            assert torch.equal(got, want)


@pytest.mark.slow
def test_compiled_generator_bit_exact(small_chunks, monkeypatch):
    """The torch.compile path (forced on for small calls); skipped only where torch.compile cannot run."""
    monkeypatch.setattr(noise_mod, "COMPILE_MIN_COUNTERS", 1)
    gen = NoiseGenerator(compile=True)
    out = gen.normal_(torch.empty(4 * SMALL_GEN * 2 + 5), 2**40 + 3, 6)
    if not gen.compiled("cpu"):
        pytest.skip(f"torch.compile does not run here: {gen.info('cpu')}")
    assert "compiled" in gen.info("cpu")
    _equal(out, rng.normal(2**40 + 3, 6, out.numel()), "compiled normals")
    fast = FastReferenceOps(gen)
    for name, case in (("tilt_accumulate", "later"), ("noise_sqnorm", "runs"), ("fill_noise", "runs")):
        args = _args(name, case, 389, torch.float32)
        _equal(_run(fast, name, args), _run(ORACLE, name, args), f"compiled {name}")


def test_failed_compile_falls_back_eager_and_says_why(small_chunks, monkeypatch):
    def no_compiler(*a, **k):
        raise RuntimeError("simulated: no C++ compiler")
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(noise_mod, "COMPILE_MIN_COUNTERS", 1)
    gen = NoiseGenerator(compile=True)
    out = gen.normal_(torch.empty(101), 99, 3)
    _equal(out, rng.normal(99, 3, 101), "eager after a failed compile")
    assert gen.compiled("cpu") is False and "simulated: no C++ compiler" in gen.info("cpu")
    monkeypatch.setenv(noise_mod.COMPILE_ENV, "0")
    assert "TSAM_FAST_COMPILE=0" in NoiseGenerator().info("cpu")


class _Bucket:
    """What FastReferenceBackend reads of a bucket: its parameter list, runs and flat buffers."""

    def __init__(self, runs, dtype=torch.float32):
        sizes = [n for _, _, n in runs]
        n = sum(sizes)
        self.theta = [torch.randn(k).to(dtype) for k in sizes]
        self.backup, self.grad, self.acc = torch.randn(n).to(dtype), torch.randn(n).to(dtype), torch.randn(n)
        self.grads, self.numel = [self.grad], n
        self.runs = self.noise_runs = runs
        self.device, self.dtype = torch.device("cpu"), dtype

    def publish(self):
        pass


def test_kept_noise_is_the_noise_of_its_seed(small_chunks):
    """noise_sqnorm keeps the bucket's noise; the perturb of the same seed uses it, another seed does not."""
    backend = FastReferenceBackend(FastReferenceOps(NoiseGenerator(compile=False)))
    runs = ((0, 13, 150), (150, 777, 50), (200, 1500, 189))  # three parameters, global indices jumping
    b = _Bucket(runs)
    flat = contract.flat_runs(runs)
    coef = torch.tensor(0.37)
    for seed in (2**40 + 1, 77):
        want_sq = ORACLE.noise_sqnorm(flat, seed, "cpu")
        _equal(backend.noise_sqnorm(b, seed), want_sq, "kept noise_sqnorm")
        assert backend.held_bytes() == (4 + 8) * 389  # fp32 noise, fp64 squares
        for use in (seed, seed + 1):  # the kept seed, and one that must be generated afresh
            theta, theta0 = [t.clone() for t in b.theta], b.backup.clone()
            ORACLE.perturb(theta, theta0, flat, use, coef, False)
            backend.perturb(b, use, coef)
            _equal(b.theta, theta, f"perturb seed {use} after noise_sqnorm({seed})")
        _equal(backend.grad_sqnorm(b, adaptive=True), ORACLE.sqnorm([b.grad], b.backup), "grad_sqnorm")
    other = _Bucket(((0, 0, 97),))
    backend.noise_sqnorm(other, 5)
    assert backend.held_bytes([b]) == (4 + 8) * 389 and backend.held_bytes() == (4 + 8) * (389 + 97)
    del b, other
    assert backend.held_bytes() == 0  # the buffers live as long as their buckets


def test_small_buckets_hold_nothing():
    backend = FastReferenceBackend(FastReferenceOps(NoiseGenerator(compile=False)))
    b = _Bucket(((0, 3, fast_mod.KEEP_MIN - 1),))
    _equal(backend.noise_sqnorm(b, 8), ORACLE.noise_sqnorm(contract.flat_runs(b.runs), 8, "cpu"), "small bucket")
    assert backend.held_bytes() == 0


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(9, 31), nn.Tanh(), nn.Linear(31, 7), nn.Tanh(), nn.Linear(7, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_trajectory_matches_plain_reference(small_chunks, dtype):
    """Whole TSAM steps, backend="reference" (the fast path) vs the same optimizer on ReferenceOps: two
    param groups (two buckets), a frozen layer in between (jumps in the global offsets), ascent and hmc."""
    x, y = torch.randn(16, 9, dtype=dtype), torch.randint(0, 3, (16,))

    def train(plain, sampler):
        saved = backends_mod._cache.get("reference")
        if plain:
            status = backends_mod.backend_info()["reference"]
            backends_mod._cache["reference"] = (Backend("reference", ReferenceOps(), REFERENCE_DTYPES), status)
        try:
            model = _model().to(dtype)
            model[2].weight.requires_grad_(False)
            groups = [dict(params=list(model[0].parameters())),
                      dict(params=[model[2].bias] + list(model[4].parameters()), radius=0.3)]
            opt = tsam_fast.TSAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9, tilt=5.0, num_samples=3,
                                 sampler=sampler, seed=11, backend="reference", check_finite=False)
            assert isinstance(opt._backend_for(torch.device("cpu"), dtype), FastReferenceBackend) != plain
            losses = [opt.step(lambda: (l := nn.functional.cross_entropy(model(x), y)).backward() or l)
                      for _ in range(3)]
        finally:
            if saved is not None:
                backends_mod._cache["reference"] = saved
        return [p.detach().clone() for p in model.parameters()], torch.stack(losses), opt

    for sampler in ("ascent", "hmc"):
        fast_p, fast_l, opt = train(False, sampler)
        plain_p, plain_l, _ = train(True, sampler)
        for i, (a, b) in enumerate(zip(fast_p, plain_p)):
            _equal(a, b, f"{sampler} parameter {i}")
        _equal(fast_l, plain_l, f"{sampler} losses")
        # the kept noise (one fp32 buffer per bucket) is counted as extra memory
        trainable = sum(p.numel() for p in _model().parameters()) - 31 * 7
        assert opt.extra_memory_bytes() >= 4 * trainable
