"""pytest-benchmark suite of the fused ops, reference vs cpp (not part of the test run: testpaths=["tests"]).

    pytest bench/bench_ops.py --benchmark-only                     # all ops, 1M fp32 elements
    pytest bench/bench_ops.py --benchmark-only -k "cpp and 10M"    # the cpp backend at 10M

The ops, their inputs and their byte counts come from the contract table (``tsam_fast.backends.contract``):
each op is timed in its first mode (``OpSpec.cases``) on the table's sample inputs. Each benchmark first
checks its backend's answer against the reference on the same inputs, then times the op on freshly made
inputs (ops update in place: repeated calls keep the buffers' values finite). GB/s in extra_info is the
op's minimum memory traffic (docs/design.md §5; the mode's ``passes`` over 4-byte elements) per second.
"""

from __future__ import annotations

import pytest
import torch

import tsam_fast
from tsam_fast.backends import contract, resolve_backend

BACKENDS = ["reference"] + (["cpp"] if tsam_fast.backend_info()["cpp"].available else [])
SIZES = {"1M": 1_000_000, "10M": 10_000_000}
OPS = list(contract.NAMES)

CASES = [(op, be, size) for size in SIZES for op in OPS for be in BACKENDS
         # the reference's integer Philox takes seconds per 10M normals: time it at 1M only
         if not (be == "reference" and size == "10M")]


def _inputs(op: str, n: int):
    """The op's sample arguments (fp32, CPU, its first mode), drawn from a fixed seed."""
    torch.manual_seed(0)
    return contract.SPECS[op].args(n, torch.float32, "cpu")


def _call(ops, op: str, args):
    """Run ``op`` of an ops namespace on ``args``; returns what it produced (its result or the buffers it writes)."""
    result = getattr(ops, op)(*args)
    spec = contract.SPECS[op]
    written = [args[spec.arg_names.index(name)] for name in spec.mutated]
    return [result] if spec.returns_tensor else [t for t in written if t is not None]


@pytest.mark.parametrize("op,backend,size", CASES, ids=[f"{op}-{be}-{size}" for op, be, size in CASES])
def test_op(benchmark, op, backend, size):
    n = SIZES[size]
    ops = resolve_backend(backend, "cpu").ops
    if backend != "reference":  # check the answer before timing it
        ref_ops = resolve_backend("reference", "cpu").ops
        small = min(n, 100_003)
        for a, b in zip(_call(ops, op, _inputs(op, small)), _call(ref_ops, op, _inputs(op, small))):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)  # the reference's norms are fp64
    args = _inputs(op, n)
    passes = contract.SPECS[op].passes()
    benchmark.extra_info.update(op=op, backend=backend, n=n, threads=torch.get_num_threads(), bytes=passes * 4 * n)
    benchmark.pedantic(_call, args=(ops, op, args), rounds=3 if backend == "reference" else 10,
                       warmup_rounds=1, iterations=1)
    if passes:
        benchmark.extra_info["GB/s"] = passes * 4 * n / benchmark.stats.stats.median / 1e9
