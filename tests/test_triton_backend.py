"""Triton-specific tests: the in-kernel generator against ``tsam_fast.rng``, noise runs at awkward global
offsets, one launch per op over a ``theta`` list of many tensors (multi-tensor apply), the registered ops
(opcheck, torch.compile) and the GPU-only checks (full-size parity, 64-bit indexing, no host sync). On a
GPU the device-generic tests run on CUDA. Whole TSAM trajectories against the reference and C++ backends
(and, on a GPU, the CUDA trajectory against the CPU reference) are in ``tests/test_trajectory.py``.

Without CUDA the kernels run in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` has to be in the
environment before triton is first imported; this module sets it for a run of this file alone, and
``tests/conftest.py`` sets it for the whole suite (test_ops.py is imported first).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tsam_fast  # noqa: E402
from tsam_fast import TSAM, rng  # noqa: E402
from tsam_fast.backends import contract, resolve_backend  # noqa: E402
from tsam_fast.backends.contract import flat_runs  # noqa: E402
from tsam_fast.backends.reference import ReferenceOps  # noqa: E402

from conftest import DTYPES, DTYPE_IDS, TOL, assert_close  # noqa: E402

STATUS = tsam_fast.backend_info()["triton"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETED

if not STATUS.available:
    pytest.skip(f"the triton backend is unavailable: {STATUS.reason}", allow_module_level=True)
if not CUDA and "cpu" not in STATUS.devices:
    pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 was set (set it in the environment "
                "or in tests/conftest.py before anything imports triton)", allow_module_level=True)

from tsam_fast._kernels import launch  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TRITON = resolve_backend("triton", DEVICE).ops  # the op contract (runs as flat int[] triples)
REF = ReferenceOps()
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels, not the interpreter)")

# Normals: the integer part is exact; the float transform (log, sqrt, cos, sin) may differ by a few ulps
# between libms, and near a zero of cos/sin a libm's error is absolute rather than relative to the tiny
# result (numpy's SIMD cosf, used by the interpreter on some arrays, shows it). Bound: 8 ulps of
# max(|n|, 1), i.e. |difference| <= 8 * 2**-23 for |n| <= 1. Measured over 12M normals: at most 3 such
# ulps between the interpreter and torch's CPU libm; libdevice's logf/cosf/sinf are within 2 ulps each.
NORMAL_ULPS = 8


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of fp32 at max(|x|, 1)."""
    x = x.abs().clamp_min(1.0)
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


def _scalar(x, device=DEVICE):
    return torch.tensor(x, dtype=torch.float32, device=device)


# -- the generator --------------------------------------------------------------------------------

SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 + 7, rng.stream_seed(2024, 17, 2, rng.STREAM_START), 2**63 - 1]
COUNTERS = [0, 1, 2, 3, 4, 1023, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 12345, 2**62 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_bit_identical(seed):
    c = torch.tensor(COUNTERS + list(range(5000, 5000 + 997)), dtype=torch.int64, device=DEVICE)
    words = launch.philox_words(seed, c).cpu()
    cc, zero = c.cpu(), torch.zeros(c.numel(), dtype=torch.int64)
    ref = torch.stack(rng.philox4x32(cc & 0xFFFFFFFF, cc >> 32, zero, zero, seed & 0xFFFFFFFF, seed >> 32), 1)
    assert torch.equal(words, ref), f"first mismatch at {(words != ref).nonzero()[:4].tolist()}"


@pytest.mark.parametrize("seed", SEEDS)
def test_randn4x_within_ulps(seed):
    c = torch.tensor(COUNTERS + list(range(0, 20000 * 13, 13)), dtype=torch.int64, device=DEVICE)
    got = launch.randn4x(seed, c).cpu()
    ref = torch.stack(rng.randn4x(seed, c.cpu()), 1)
    ulps = (got - ref).abs() / _ulp(ref)
    assert ulps.max() <= NORMAL_ULPS, f"max {ulps.max():.1f} ulps at {ulps.argmax()}"


# -- noise runs -----------------------------------------------------------------------------------

RUN_LAYOUTS = {
    # one run starting mid-counter, past 2**32 global elements (64-bit counters, high word used)
    "one-offset": lambda n: ((0, 2**34 + 3, n),),
    # many short runs (1, 2, 3 ... elements): several runs per 4-element counter and per tile
    "many-short": lambda n: _short_runs(n),
    # runs listed out of buffer order, with global gaps and a counter shared by two runs
    "unordered": lambda n: ((n // 3, 1001, n - n // 3), (0, 6, n // 3)),
}


def _short_runs(n):
    runs, b, g, k = [], 0, 7, 1
    while b < n:
        m = min(k, n - b)
        runs.append((b, g, m))
        b, g, k = b + m, g + m + (k % 3), k % 5 + 1
    return tuple(runs)


# (layout, n): every run gets at least one tile, so many short runs cost the interpreter a tile each
RUN_CASES = [(layout, n) for layout in RUN_LAYOUTS for n in (1, 5, 301, 3001) if (layout, n) != ("many-short", 3001)]


@pytest.mark.parametrize("layout,n", RUN_CASES, ids=[f"{layout}-n{n}" for layout, n in RUN_CASES])
def test_noise_ops_over_runs(layout, n):
    runs, seed, coef = flat_runs(RUN_LAYOUTS[layout](n)), 2**40 + 99, _scalar(0.61)
    dev = torch.device(DEVICE)
    assert_close(TRITON.noise_sqnorm(runs, seed, dev).cpu(), REF.noise_sqnorm(runs, seed, dev).cpu(),
                 rtol=1e-5, atol=1e-6, what="noise_sqnorm")
    out, ref = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    TRITON.fill_noise(out, runs, seed, coef)
    REF.fill_noise(ref, runs, seed, coef)
    assert_close(out.cpu(), ref.cpu(), **TOL[torch.float32], what="fill_noise")
    # an op with a theta list takes one run per tensor, in order: the tensors split the buffer like the runs
    ordered = tuple(sorted(RUN_LAYOUTS[layout](n)))
    runs, sizes = flat_runs(ordered), [k for _, _, k in ordered]
    theta0 = torch.randn(n, device=DEVICE).to(torch.bfloat16)
    out, ref = torch.empty_like(theta0), torch.empty_like(theta0)
    TRITON.perturb(list(out.split(sizes)), theta0, runs, seed, coef, False)
    REF.perturb(list(ref.split(sizes)), theta0, runs, seed, coef, False)
    assert_close(out.cpu(), ref.cpu(), **TOL[torch.bfloat16], what="perturb")


def test_noise_matches_rng_normal_for_any_split():
    """A parameter's noise does not depend on how its global range is split into runs or buckets."""
    seed, n = 77, 1037
    whole = torch.zeros(n, device=DEVICE)
    TRITON.fill_noise(whole, (0, 2**33 + 2, n), seed, _scalar(1.0))
    assert_close(whole.cpu(), rng.normal(seed, 2**33 + 2, n), **TOL[torch.float32], what="vs rng.normal")
    split = torch.zeros(n, device=DEVICE)
    cuts = (0, 3, 4, 9, 500, 1000, n)
    runs = tuple((a, 2**33 + 2 + a, b - a) for a, b in zip(cuts, cuts[1:]))
    TRITON.fill_noise(split, flat_runs(runs), seed, _scalar(1.0))
    assert torch.equal(split, whole)


@pytest.mark.parametrize("runs", [((0, 0, 5),), ((0, 0, 3), (4, 3, 3)), ((1, 0, 7),), ((0, -4, 7),)],
                         ids=["short", "gap", "offset", "negative"])
def test_runs_must_tile_the_bucket(runs):
    theta = torch.zeros(7, device=DEVICE)
    with pytest.raises(ValueError, match="runs"):
        TRITON.perturb([theta], theta.clone(), flat_runs(runs), 1, _scalar(1.0), False)
    with pytest.raises(ValueError, match="runs"):
        TRITON.fill_noise(theta, flat_runs(runs), 1, _scalar(1.0))


def test_theta_list_checks():
    """One run per tensor of the list, in order; every tensor 1-D contiguous, of one dtype and device."""
    parts = [torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE)]
    theta0, one = torch.zeros(7, device=DEVICE), _scalar(1.0)
    TRITON.perturb(parts, theta0, (0, 0, 3, 3, 9, 4), 1, one, False)
    with pytest.raises(ValueError, match=r"runs must hold one .* per tensor of theta \(2 tensors\), got 1"):
        TRITON.perturb(parts, theta0, (0, 0, 7), 1, one, False)
    with pytest.raises(ValueError, match=r"runs\[1\] = \(4, 9, 3\) must be \(3, global_offset >= 0, 4\)"):
        TRITON.perturb(parts, theta0, (0, 0, 3, 4, 9, 3), 1, one, False)
    with pytest.raises(ValueError, match=r"theta\[1\] must be a contiguous 1-D torch.float32"):
        TRITON.perturb([parts[0], torch.zeros(2, 2, device=DEVICE)], theta0, (0, 0, 3, 3, 9, 4), 1, one, False)
    with pytest.raises(ValueError, match=r"theta\[1\] must be a contiguous 1-D torch.float32"):
        TRITON.leapfrog([parts[0], torch.zeros(8, device=DEVICE)[::2]], theta0, one, one)
    with pytest.raises(ValueError, match=r"theta\[1\] must be .* like theta\[0\]"):
        TRITON.leapfrog([parts[0], parts[1].to(torch.bfloat16)], theta0, one, one)
    with pytest.raises(ValueError, match="grad must be a contiguous 1-D torch.float32 buffer of 7 elements"):
        TRITON.leapfrog(parts, theta0[:6], one, one)
    with pytest.raises(TypeError, match="x must be a non-empty list of 1-D tensors"):
        TRITON.sqnorm([])
    with pytest.raises(TypeError, match="theta must be a non-empty list of 1-D tensors .*, got a Tensor"):
        launch.leapfrog(theta0, theta0, one, one)


def test_scalars_must_be_device_tensors():
    theta = torch.zeros(7, device=DEVICE)
    with pytest.raises(TypeError, match="coef must be a 0-dim fp32 tensor"):
        TRITON.perturb([theta], theta.clone(), (0, 0, 7), 1, 0.5, False)
    with pytest.raises(TypeError, match="kick"):
        TRITON.leapfrog([theta], theta.clone(), _scalar(1.0).double(), _scalar(1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
def test_noise_free_results_bit_identical(dtype):
    """Without noise the kernels round every product and sum as the reference does (no FMA contraction,
    round-to-nearest-even into bf16/fp16): results are equal bit for bit, not just close."""
    n, s = 3001, _scalar
    mk = lambda: torch.randn(n, device=DEVICE).to(dtype)  # noqa: E731
    theta, theta0, grad, acc, v = mk(), mk(), mk(), torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    for kw in (dict(), dict(precond=theta0), dict(momentum=v)):
        out, ref = theta.clone(), theta.clone()
        m_out, m_ref = (v.clone(), v.clone()) if "momentum" in kw else (None, None)
        kw_out = dict(kw, momentum=m_out) if m_out is not None else kw
        kw_ref = dict(kw, momentum=m_ref) if m_ref is not None else kw
        TRITON.leapfrog([out], grad, s(0.013), s(0.7), **kw_out)
        REF.leapfrog([ref], grad, s(0.013), s(0.7), **kw_ref)
        assert torch.equal(out, ref), f"leapfrog {list(kw)}"
        assert m_out is None or torch.equal(m_out, m_ref)
    for first in (True, False):
        outs, refs = [acc.clone(), theta.clone()], [acc.clone(), theta.clone()]
        TRITON.tilt_accumulate(outs[0], grad, s(0.8), s(1.3), first, [outs[1]], theta0, (0, 3, n), None, s(0.0))
        REF.tilt_accumulate(refs[0], grad, s(0.8), s(1.3), first, [refs[1]], theta0, (0, 3, n), None, s(0.0))
        assert torch.equal(outs[0], refs[0]) and torch.equal(outs[1], refs[1]), "tilt_accumulate"
        outs, refs = [grad.clone(), theta.clone()], [grad.clone(), theta.clone()]
        TRITON.finalize(acc, outs[0], s(0.6), s(0.3), s(1 / 2.9), first, [outs[1]], theta0)
        REF.finalize(acc, refs[0], s(0.6), s(0.3), s(1 / 2.9), first, [refs[1]], theta0)
        assert torch.equal(outs[0], refs[0]) and torch.equal(outs[1], refs[1]), "finalize"
    for save in (True, False):
        outs, refs = [theta.clone(), theta0.clone()], [theta.clone(), theta0.clone()]
        TRITON.perturb([outs[0]], outs[1], (0, 3, n), None, s(0.5), save)
        REF.perturb([refs[0]], refs[1], (0, 3, n), None, s(0.5), save)
        assert torch.equal(outs[0], refs[0]) and torch.equal(outs[1], refs[1]), "perturb without noise"


# -- multi-tensor apply ---------------------------------------------------------------------------


class _Spy:
    """A kernel whose launches are logged: (kernel name, grid, keyword arguments)."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def call(*args, **kwargs):
            self.log.append((self.name, grid, kwargs))
            return launcher(*args, **kwargs)
        return call


@pytest.fixture
def launches(monkeypatch):
    """The launches of every kernel during the test (the list fills as they happen)."""
    log = []
    for name in dir(launch.K):
        if name.endswith("_kernel"):
            monkeypatch.setattr(launch.K, name, _Spy(name, getattr(launch.K, name), log))
    return log


def _many(dtype, aligned):
    """A parent storage, the (start, length) spans of a theta list's tensors in it and their runs: many
    tensors of odd sizes (empty and 1-element ones, tails of every length), with gaps between them that
    stand for frozen parameters, and global offsets that jump. ``aligned``: every start, length, gap and
    global offset a multiple of 16 elements (ALIGNED launches); else odd ones (unaligned data pointers,
    global offsets that are not multiples of 4)."""
    if aligned:
        sizes, gaps, g = (0, 16, 1024, 48, 0, 1040, 32, 16), (16, 32, 16, 48, 16, 16, 32, 16, 16), 1 << 33
    else:
        sizes, gaps, g = (0, 1, 3, 1029, 0, 17, 1030, 1, 6, 5, 0, 2), (1, 2, 3, 1, 1, 2, 5, 3, 1, 2, 1, 3, 2), 2**33 + 7
    spans, runs, pos, offset = [], [], gaps[0], 0
    for i, k in enumerate(sizes):
        spans.append((pos, k))
        runs += [offset, g, k]
        pos, offset, g = pos + k + gaps[i + 1], offset + k, g + k + (1000 if aligned else 1003 + i)
    parent = torch.randn(pos, device=DEVICE).to(dtype)
    return parent, spans, tuple(runs)


def _views(parent, spans):
    return [parent[s:s + k] for s, k in spans]


@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_launch_over_many_tensors(dtype, aligned, launches):
    """Every op over a list of many tensors: one launch (two for a reduction) over all of them, results
    as the reference's (bit for bit without noise), nothing written between the tensors, ALIGNED exactly
    when every pointer and offset allows 16-byte accesses."""
    parent, spans, runs = _many(dtype, aligned)
    n, s = sum(k for _, k in spans), _scalar
    mk = lambda: torch.randn(n, device=DEVICE).to(dtype)  # noqa: E731
    theta0, grad, precond = mk(), mk(), mk()
    acc, v = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)

    def check(what, run, exact, *flat, reduction=False):
        """run(theta, *flat) on the Triton side and the reference's; compare theta, the flat buffers, gaps."""
        del launches[:]
        p = parent.clone()
        mine, ref = _views(p, spans), [t.clone() for t in _views(parent, spans)]
        gaps = contract.gaps_of(mine)
        mine_flat, ref_flat = [f.clone() for f in flat], [f.clone() for f in flat]
        got, want = run(TRITON, mine, *mine_flat), run(REF, ref, *ref_flat)
        assert len(launches) == (2 if reduction else 1), f"{what}: {[(k, g) for k, g, _ in launches]}"
        assert launches[0][2]["MULTI_RUN"] and launches[0][2]["ALIGNED"] == aligned, what
        if reduction:
            assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=0, what=what)
        tol = dict(rtol=0, atol=0) if exact else TOL[dtype]
        assert_close(torch.cat(mine).cpu(), torch.cat(ref).cpu(), **tol, what=f"{what} theta")
        for i, (a, b) in enumerate(zip(mine_flat, ref_flat)):
            assert_close(a.cpu(), b.cpu(), **(TOL[torch.float32] if a.dtype == torch.float32 and not exact else tol),
                         what=f"{what} buffer {i}")
        assert torch.equal(contract.gaps_of(mine).cpu(), gaps.cpu()), f"{what}: wrote between the tensors"

    for save in (True, False):
        check(f"perturb save_backup={save}", lambda o, th, t0: o.perturb(th, t0, runs, 99, s(0.3), save), False,
              theta0)
        check(f"perturb no noise save_backup={save}", lambda o, th, t0: o.perturb(th, t0, runs, None, s(0.3), save),
              True, theta0)
    for first in (True, False):
        check(f"tilt_accumulate first={first}", lambda o, th, a: o.tilt_accumulate(
            a, grad, s(0.8), s(1.3), first, th, theta0, runs, 7, s(0.2)), False, acc)
    check("tilt_accumulate no noise", lambda o, th, a: o.tilt_accumulate(
        a, grad, s(0.8), s(1.3), False, th, theta0, runs, None, s(0.2)), True, acc)
    check("leapfrog ascent", lambda o, th: o.leapfrog(th, grad, s(0.013), s(0.7)), True)
    check("leapfrog adaptive", lambda o, th: o.leapfrog(th, grad, s(0.013), s(1.0), None, precond), True)
    check("leapfrog hmc", lambda o, th, m: o.leapfrog(th, grad, s(0.013), s(0.7), m, None), True, v)
    for first in (True, False):
        check(f"finalize first={first}", lambda o, th, g: o.finalize(acc, g, s(0.6), s(0.3), s(1 / 2.9), first, th,
                                                                     theta0), True, grad)
    check("sqnorm", lambda o, th: o.sqnorm(th), True, reduction=True)
    check("sqnorm scaled", lambda o, th: o.sqnorm(th, precond), True, reduction=True)


@pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])
def test_noise_over_a_list_is_the_flat_noise_bit_for_bit(aligned):
    """The noise of element k of theta[i] is the generator's at global index G_i + k, whatever the tensor's
    address: theta0 = 0, coef = 1 gives exactly xi, equal to fill_noise's over the same runs in one flat
    buffer and to a single-tensor perturb of each run alone."""
    parent, spans, runs = _many(torch.float32, aligned)
    n, one, seed = sum(k for _, k in spans), _scalar(1.0), 2**40 + 5
    theta = _views(parent, spans)
    TRITON.perturb(theta, torch.zeros(n, device=DEVICE), runs, seed, one, False)
    flat = torch.empty(n, device=DEVICE)
    TRITON.fill_noise(flat, runs, seed, one)
    assert torch.equal(torch.cat(theta), flat)
    for t, (_, g, k) in zip(theta, contract.run_triples(runs)):
        alone = torch.empty(k, device=DEVICE)
        TRITON.perturb([alone], torch.zeros(k, device=DEVICE), (0, g, k), seed, one, False)
        assert torch.equal(alone, t)


def test_run_table_cached_until_a_storage_moves(launches, monkeypatch):
    """The device table of a list is built once per (data_ptr, numel) layout; a single tensor needs none."""
    monkeypatch.setattr(launch, "_TILE_CACHE", launch.OrderedDict())
    built = []
    table = launch._device_table
    monkeypatch.setattr(launch, "_device_table", lambda rows, device: built.append(len(rows)) or table(rows, device))
    parent, grad, one = torch.randn(80, device=DEVICE), torch.randn(37, device=DEVICE), _scalar(1.0)
    theta = [parent[1:10], parent[12:12], parent[13:41]]
    for _ in range(2):
        TRITON.leapfrog(theta, grad, one, one)
    assert built == [2]
    theta[2] = theta[2].clone()  # a new storage for one tensor: a new table
    TRITON.leapfrog(theta, grad, one, one)
    TRITON.leapfrog(theta, grad, one, one)
    assert built == [2, 2]
    TRITON.leapfrog([parent[:37]], grad, one, one)  # one tensor: kernel arguments, no table
    assert built == [2, 2] and not launches[-1][2]["MULTI_RUN"]
    TRITON.leapfrog([parent[:0], parent[3:40]], grad, one, one)  # one non-empty tensor: the same
    assert built == [2, 2] and not launches[-1][2]["MULTI_RUN"]


# -- registration ---------------------------------------------------------------------------------


# every op and mode of the contract table; fp32 and bf16 (the interpreter is slow: fp16 is left to test_ops)
OPCHECK = contract.opcheck_cases("tsam_fast_triton", dtypes=(torch.float32, torch.bfloat16))


@pytest.mark.parametrize("name,case,dtype", [c[1:] for c in OPCHECK], ids=[c[0] for c in OPCHECK])
def test_opcheck(name, case, dtype):
    """Schemas, declared mutations and fake implementations of the registered ops (torch.library.opcheck)."""
    contract.opcheck("tsam_fast_triton", name, case, dtype, device=DEVICE)


def test_launchers_take_the_tables_arguments():
    """Each registered launcher takes its op's schema arguments by the schema's names and defaults."""
    import inspect

    from tsam_fast._kernels import ops

    for op in contract.OPS:
        params = inspect.signature(ops.LAUNCHERS[op.name]).parameters.values()
        assert [(p.name, p.default is not inspect.Parameter.empty) for p in params] == \
            [(a.name, a.has_default_value()) for a in op.parsed.arguments], op.name


def test_torch_compile_sees_registered_ops():
    """torch.compile(fullgraph=True) traces user code that calls the backend: no graph break, same result."""
    n, runs = 1001, (0, 13, 500, 500, 1600, 501)

    def fn(theta, theta0, acc, grad, coef, a, b, seed):  # theta: a list of two tensors
        TRITON.perturb(theta, theta0, runs, seed, coef, True)
        norm = TRITON.noise_sqnorm(runs, seed, theta0.device)
        TRITON.tilt_accumulate(acc, grad, a, b, False, theta, theta0, runs, seed + 1, coef / norm.sqrt())
        return norm + TRITON.sqnorm([grad]) + TRITON.sqnorm(theta)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    scalars = (_scalar(0.3), _scalar(0.7), _scalar(1.1))
    for seed in (12345, 2**62 + 3):
        torch.manual_seed(0)
        got = [torch.randn(n, device=DEVICE) for _ in range(4)]
        want = [x.clone() for x in got]
        args = lambda t: [list(t[0].split((500, 501)))] + t[1:]  # noqa: E731
        assert_close(compiled(*args(got), *scalars, seed).cpu(), fn(*args(want), *scalars, seed).cpu(), rtol=0,
                     atol=0, what="compiled result")
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_probe_reports_import_errors(monkeypatch):
    import sys

    from tsam_fast.backends import triton_backend

    monkeypatch.setitem(sys.modules, "triton", None)
    backend, status = triton_backend.probe()
    assert backend is None and not status.available
    assert "triton does not import" in status.reason and "ModuleNotFoundError" in status.reason


def test_probe_devices():
    assert STATUS.devices == (("cuda", "cpu") if INTERPRETED else ("cuda",))
    assert tsam_fast.backend_info()["triton"].available
    if CUDA:
        assert resolve_backend("auto", "cuda").name == "triton"


@pytest.mark.skipif(CUDA, reason="on a GPU every other test here runs the compiled kernels")
def test_kernels_compile_for_the_gpu():
    """The compiled (non-interpreted) path: every kernel compiles for sm_90 with the bundled ptxas, no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tsam_fast._kernels.compile_check", "--quick", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


# -- GPU only -------------------------------------------------------------------------------------

BIG = 100_000_000


def _big_runs(n):
    half = n // 2 + 1
    return (0, 2**33 + 1, half, half, 2**33 + 1 + half + 1002, n - half)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_size_parity(dtype):
    """Every op at 1e8 elements (fp32 math, two runs straddling counters) against the reference on CUDA."""
    n, runs, dev, tol = BIG, _big_runs(BIG), torch.device("cuda"), TOL[dtype]
    mk = lambda: torch.randn(n, device="cuda").to(dtype)  # noqa: E731
    assert_close(TRITON.noise_sqnorm(runs, 5, dev).cpu(), REF.noise_sqnorm(runs, 5, dev).cpu(),
                 rtol=1e-5, atol=0, what="noise_sqnorm")
    x, s = mk(), mk()
    assert_close(TRITON.sqnorm([x], s).cpu(), REF.sqnorm([x], s).cpu(), rtol=1e-5, atol=0, what="sqnorm")
    sizes = (runs[2], runs[5])  # the two runs as two tensors of the list
    theta, theta0, grad = mk(), mk(), mk()
    out, ref = [theta.clone(), theta0.clone()], [theta.clone(), theta0.clone()]
    TRITON.perturb(list(out[0].split(sizes)), out[1], runs, 6, _scalar(0.3), True)
    REF.perturb(list(ref[0].split(sizes)), ref[1], runs, 6, _scalar(0.3), True)
    assert_close(out[0], ref[0], **tol, what="perturb")
    assert torch.equal(out[1], ref[1])
    del out, ref
    acc = torch.randn(n, device="cuda")
    outs, refs = [acc.clone(), theta.clone()], [acc.clone(), theta.clone()]
    TRITON.tilt_accumulate(outs[0], grad, _scalar(0.7), _scalar(0.2), False, list(outs[1].split(sizes)), theta0,
                           runs, 8, _scalar(0.1))
    REF.tilt_accumulate(refs[0], grad, _scalar(0.7), _scalar(0.2), False, list(refs[1].split(sizes)), theta0,
                        runs, 8, _scalar(0.1))
    assert_close(outs[0], refs[0], rtol=2e-6, atol=1e-30, what="tilt A")
    assert_close(outs[1], refs[1], **tol, what="tilt theta")
    del outs, refs
    out, ref = theta.clone(), theta.clone()
    TRITON.leapfrog(list(out.split(sizes)), grad, _scalar(0.01), _scalar(1.0), precond=theta0)
    REF.leapfrog([ref], grad, _scalar(0.01), _scalar(1.0), precond=theta0)
    assert_close(out, ref, **tol, what="leapfrog")
    g_out, g_ref, t_out = grad.clone(), grad.clone(), theta.clone()
    TRITON.finalize(acc, g_out, _scalar(0.6), _scalar(0.3), _scalar(0.4), False, list(t_out.split(sizes)), theta0)
    REF.finalize(acc, g_ref, _scalar(0.6), _scalar(0.3), _scalar(0.4), False, [theta.clone()], theta0)
    assert_close(g_out, g_ref, **tol, what="finalize grad")
    assert torch.equal(t_out, theta0)


@gpu_only
def test_buffers_over_2_31_elements():
    """64-bit indexing: a bf16 bucket of 2**31 + 4099 elements, checked in the region past 2**31."""
    n, glob = 2**31 + 4099, 2**35 + 3
    tail = slice(2**31 - 5, n)
    theta0 = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    theta0[tail] = torch.randn(n - tail.start, device="cuda").to(torch.bfloat16)
    theta = torch.empty_like(theta0)
    TRITON.perturb([theta], theta0, (0, glob, n), 11, _scalar(0.5), False)
    want = theta0[tail].float() + 0.5 * rng.normal(11, glob + tail.start, n - tail.start, device="cuda")
    assert_close(theta[tail], want.to(torch.bfloat16), **TOL[torch.bfloat16], what="perturb past 2**31")
    grad = torch.ones_like(theta0)
    before = theta[tail].float()
    TRITON.leapfrog([theta], grad, _scalar(0.25), _scalar(1.0))
    assert_close(theta[tail], (before + 0.25).to(torch.bfloat16), **TOL[torch.bfloat16], what="leapfrog past 2**31")
    # the same through the run table: a list of two tensors, the second's offsets past 2**31
    parts, runs = [theta[:7], theta[7:]], (0, glob, 7, 7, glob + 7, n - 7)
    one_tensor = theta[tail].clone()
    TRITON.perturb([theta], theta0, (0, glob, n), 11, _scalar(0.5), False)
    reference = theta[tail].clone()
    TRITON.perturb(parts, theta0, runs, 11, _scalar(0.5), False)
    assert torch.equal(theta[tail], reference), "perturb over a list past 2**31"
    TRITON.leapfrog(parts, grad, _scalar(0.25), _scalar(1.0))
    assert torch.equal(theta[tail], one_tensor), "leapfrog over a list past 2**31"
    del theta0
    got = TRITON.sqnorm([grad])
    assert got.item() == pytest.approx(float(n), rel=1e-6)


@gpu_only
@pytest.mark.parametrize("sampler,kw", [("ascent", {}), ("ascent", dict(max_grad_norm=1.0, adaptive=True)),
                                        ("random", dict(start="ball")), ("hmc", dict(delta=0.5))],
                         ids=["ascent", "ascent-clip-adaptive", "random-ball", "hmc-delta"])
def test_step_makes_no_host_sync(sampler, kw):
    """Two param groups (tilts 3 and 0), every sampler: no device sync inside the step."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    x, y = torch.randn(16, 64, device="cuda"), torch.randn(16, 8, device="cuda")
    groups = [{"params": net[0].parameters(), "tilt": 3.0}, {"params": net[2].parameters(), "tilt": 0.0}]
    opt = TSAM(groups, torch.optim.SGD, lr=0.01, momentum=0.9, backend="triton", check_finite=False,
               num_samples=3, seed=1, sampler=sampler, **kw)
    assert opt.backend_name("cuda") == "triton"

    def closure():
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)  # warm-up: kernel compilation, flat buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
def test_optimizer_dtypes_on_cuda(dtype):
    """A model stored in each dtype trains with backend='auto' (which picks triton for CUDA)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(33, 7).cuda().to(dtype)
    opt = TSAM(net.parameters(), torch.optim.SGD, lr=0.01, seed=3)
    assert opt.backend_name("cuda") == "triton"
    x = torch.randn(8, 33, device="cuda", dtype=dtype)

    def closure():
        loss = net(x).float().square().mean()
        loss.backward()
        return loss

    for _ in range(3):
        assert torch.isfinite(opt.step(closure))
