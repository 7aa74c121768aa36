"""pytest-benchmark suite of the fused ops, reference vs cpp (not part of the test run: testpaths=["tests"]).

    pytest bench/bench_ops.py --benchmark-only                     # all ops, 1M fp32 elements
    pytest bench/bench_ops.py --benchmark-only -k "cpp and 10M"    # the cpp backend at 10M

Each benchmark first checks its backend's answer against the reference on the same inputs, then times
the op on freshly made inputs (ops update in place: repeated calls keep the buffers' values finite).
GB/s in extra_info is the op's minimum memory traffic (spec section 5) per second.
"""

from __future__ import annotations

import pytest
import torch

import tsam_fast
from tsam_fast.backends import resolve_backend
from tsam_fast.backends.reference import ReferenceBackend

REF = ReferenceBackend()
BACKENDS = ["reference"] + (["cpp"] if tsam_fast.backend_info()["cpp"].available else [])
SIZES = {"1M": 1_000_000, "10M": 10_000_000}
SEED = 123456789


def _s(x):
    return torch.tensor(x, dtype=torch.float32)


def _inputs(n, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda dt=dtype: torch.randn(n, generator=g).to(dt)  # noqa: E731
    return dict(theta=r(), theta0=r(), grad=r(), precond=r(), acc=r(torch.float32), v=r(torch.float32),
                out=r(torch.float32), runs=((0, 3, n // 2), (n // 2, 3 + n // 2 + 64, n - n // 2)))


def _call(be, op, x):
    """Run ``op`` on backend ``be`` with the buffers of ``x``; returns what the op produced."""
    if op == "noise_sqnorm":
        return [be.noise_sqnorm(x["runs"], SEED, torch.device("cpu"))]
    if op == "sqnorm":
        return [be.sqnorm(x["grad"])]
    if op == "perturb":
        be.perturb(x["theta"], x["theta0"], x["runs"], SEED, _s(0.1), False)
        return [x["theta"]]
    if op == "fill_noise":
        be.fill_noise(x["out"], x["runs"], SEED, _s(0.5))
        return [x["out"]]
    if op == "leapfrog":
        be.leapfrog(x["theta"], x["grad"], _s(0.01), _s(1.0))
        return [x["theta"]]
    if op == "tilt_accumulate":
        be.tilt_accumulate(x["acc"], x["grad"], _s(0.5), _s(0.5), False, x["theta"], x["theta0"], x["runs"], SEED,
                           _s(0.1))
        return [x["acc"], x["theta"]]
    if op == "finalize":
        be.finalize(x["acc"], x["grad"], _s(0.5), _s(0.5), _s(0.9), False, x["theta"], x["theta0"])
        return [x["grad"], x["theta"]]
    raise ValueError(op)


# minimum traffic in units of d elements of 4 bytes (fp32), spec section 5
PASSES = {"noise_sqnorm": 0, "sqnorm": 1, "perturb": 2, "fill_noise": 1, "leapfrog": 3, "tilt_accumulate": 5,
          "finalize": 5}
OPS = list(PASSES)

CASES = [(op, be, size) for size in SIZES for op in OPS for be in BACKENDS
         # the reference's integer Philox takes seconds per 10M normals: time it at 1M only
         if not (be == "reference" and size == "10M")]


@pytest.mark.parametrize("op,backend,size", CASES, ids=[f"{op}-{be}-{size}" for op, be, size in CASES])
def test_op(benchmark, op, backend, size):
    n = SIZES[size]
    be = resolve_backend(backend, "cpu")
    if backend != "reference":  # check the answer before timing it
        mine, ref = _inputs(min(n, 100_003), torch.float32), _inputs(min(n, 100_003), torch.float32)
        for a, b in zip(_call(be, op, mine), _call(REF, op, ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x = _inputs(n, torch.float32)
    benchmark.extra_info.update(op=op, backend=backend, n=n, threads=torch.get_num_threads(),
                                bytes=PASSES[op] * 4 * n)
    benchmark.pedantic(_call, args=(be, op, x), rounds=3 if backend == "reference" else 10,
                       warmup_rounds=1, iterations=1)
    if PASSES[op]:
        benchmark.extra_info["GB/s"] = PASSES[op] * 4 * n / benchmark.stats.stats.median / 1e9
