"""The C++ CPU backend beyond the generic op parity of test_ops.py.

* the operators are real torch ops: ``torch.library.opcheck`` (schema, fake kernels, aot dispatch) and a
  ``torch.compile``d function that calls them;
* the noise: Philox words bit-identical to ``tsam_fast.rng.philox4x32``; normals within a stated ulp bound
  of ``tsam_fast.rng.normal`` and of a float64 evaluation of the spec's formula; every instruction-set
  path (avx512 / avx2 / scalar) bit-identical;
* determinism: 1 and 2 threads give bit-identical results (norms included); keeping the noise between
  its norm pass and its update pass (store_noise, the default) gives the same results as regenerating it;
* whole trajectories: 20 TSAM steps of a small MLP and CNN, backend="cpp" vs backend="reference";
* loading: prebuilt module preferred, JIT build cached (one line on the first build, none after), and
  a clear fallback when no compiler exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import tsam_fast
from tsam_fast import TSAM, rng
from tsam_fast.backends import resolve_backend
from tsam_fast.backends.reference import ReferenceBackend

from conftest import DTYPES, DTYPE_IDS, assert_close

STATUS = tsam_fast.backend_info()["cpp"]
REPO = Path(__file__).resolve().parents[1]

# Normals: at most this many units in the last place (of the fp32 result) from the reference backend and
# from a float64 evaluation of the spec's Box-Muller (measured: 3.0 and 2.95 over 4M normals; the
# reference itself is 2.3 ulp from float64). The Philox words are exact.
NORMAL_ULP_BOUND = 4.0
# 20 steps of SGD+momentum on top of TSAM: the element ops match the reference bit for bit; only the
# normals (a few ulp) and the order of the double norm sums differ (measured max |diff| 7.5e-8).
TRAJ_TOL = dict(rtol=1e-5, atol=1e-6)

pytestmark = pytest.mark.skipif(not STATUS.available, reason=f"cpp backend unavailable: {STATUS.reason}")

REF = ReferenceBackend()


def _ops():
    return torch.ops.tsam_fast


def _s(x):
    return torch.tensor(x, dtype=torch.float32)


def _isas():
    """Instruction sets this CPU runs (scalar always)."""
    out = []
    current = _ops()._isa()
    for isa in ("avx512", "avx2", "scalar"):
        try:
            _ops()._set_isa(isa)
            out.append(isa)
        except RuntimeError:
            pass
    _ops()._set_isa(current)
    return out


@pytest.fixture
def isa_guard():
    before = _ops()._isa()
    yield
    _ops()._set_isa(before)


@pytest.fixture
def threads_guard():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- operator registration -----------------------------------------------------------------------

def _op_cases(n=37):
    """(op name, id, args): every op and mode, runs with a gap and counters straddling."""
    runs = [0, 13, 20, 22, 1035, 15]  # buffer [20, 22) is outside every run: xi = 0 there
    r = lambda dtype=torch.float32: torch.randn(n).to(dtype)  # noqa: E731
    return [
        ("sqnorm", "plain", (r(), None)),
        ("sqnorm", "scaled-bf16", (r(torch.bfloat16), r(torch.bfloat16))),
        ("noise_sqnorm", "runs", (runs, 5)),
        ("perturb", "noise-backup", (r(), r(), runs, 5, _s(0.3), True)),
        ("perturb", "none-fp16", (r(torch.float16), r(torch.float16), runs, None, _s(0.3), False)),
        ("perturb", "stored-noise", (r(), r(), runs, 5, _s(0.3), False, r())),
        ("noise_sqnorm_store", "runs", (r(), runs, 5)),
        ("fill_noise", "runs", (r(), runs, 5, _s(2.0))),
        ("leapfrog", "ascent", (r(), r(), _s(0.1), _s(1.0), None, None)),
        ("leapfrog", "hmc", (r(), r(), _s(0.1), _s(0.5), r(), None)),
        ("leapfrog", "adaptive-bf16", (r(torch.bfloat16), r(torch.bfloat16), _s(0.1), _s(1.0), None,
                                       r(torch.bfloat16))),
        ("tilt_accumulate", "later", (r(), r(), _s(0.5), _s(0.7), False, r(), r(), runs, 3, _s(0.1))),
        ("tilt_accumulate", "first-none", (r(), r(), _s(0.5), _s(0.7), True, r(), r(), runs, None, _s(0.1))),
        ("tilt_accumulate", "stored-noise", (r(), r(), _s(0.5), _s(0.7), False, r(), r(), runs, 3, _s(0.1), r())),
        ("finalize", "later", (r(), r(), _s(0.5), _s(0.7), _s(0.3), False, r(), r())),
        ("finalize", "first-fp16", (r(), r(torch.float16), _s(0.5), _s(0.7), _s(0.3), True, r(torch.float16),
                                    r(torch.float16))),
    ]


@pytest.mark.parametrize("name,args", [(c[0], c[2]) for c in _op_cases()], ids=[f"{c[0]}-{c[1]}" for c in _op_cases()])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(_ops(), name).default, args)


def test_ops_inside_torch_compile():
    """A compiled function that calls the ops traces them through their fake kernels (no graph break)."""
    n = 1001
    theta, theta0, grad, acc = torch.randn(n), torch.randn(n), torch.randn(n), torch.randn(n)
    runs = [0, 0, n]

    def step(theta, theta0, grad, acc):
        norm = _ops().sqnorm(grad, None).sqrt()
        _ops().leapfrog(theta, grad, 0.05 / (norm + 1e-12), torch.ones(()), None, None)
        _ops().tilt_accumulate(acc, grad, torch.ones(()), torch.ones(()), True, theta, theta0, runs, 11,
                               torch.full((), 0.1))
        return norm

    expect = [t.clone() for t in (theta, theta0, grad, acc)]
    want = step(*expect)
    got_args = [t.clone() for t in (theta, theta0, grad, acc)]
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*got_args)
    assert_close(got, want, rtol=0, atol=0, what="compiled sqnorm")
    for g, e, what in zip(got_args, expect, ("theta", "theta0", "grad", "acc")):
        assert_close(g, e, rtol=0, atol=0, what=f"compiled {what}")


def test_invalid_runs_raise():
    with pytest.raises(RuntimeError, match="out of order"):
        _ops().perturb(torch.zeros(10), torch.zeros(10), [5, 0, 5, 0, 100, 5], 1, _s(1.0), False)
    with pytest.raises(RuntimeError, match="triples"):
        _ops().fill_noise(torch.zeros(10), [0, 0], 1, _s(1.0))
    with pytest.raises(RuntimeError, match="float32"):
        _ops().tilt_accumulate(torch.zeros(4, dtype=torch.float16), torch.zeros(4), _s(1.0), _s(1.0), True,
                               torch.zeros(4), torch.zeros(4), [0, 0, 4], 1, _s(1.0))


def test_run_gaps_get_no_noise():
    """Buffer elements outside every run get xi = 0 (defined behaviour; the optimizer never leaves gaps)."""
    theta, theta0 = torch.zeros(12), torch.randn(12)
    _ops().perturb(theta, theta0, [0, 0, 4, 8, 100, 4], 3, _s(1.0), False)
    assert torch.equal(theta[4:8], theta0[4:8])
    assert not torch.equal(theta[:4], theta0[:4])


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
def test_stored_noise_equals_regenerated(dtype):
    """Keeping xi between the norm pass and the update pass changes nothing: same norm, same buffers."""
    from tsam_fast.backends.cpp import CppBackend
    n, seed = 300_007, 31
    runs = ((0, 5, n // 2), (n // 2, 5 + n // 2 + 999, n - n // 2))
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(n, generator=g).to(dt) for dt in (torch.float32, dtype, dtype, dtype)]
    outs = []
    for store in (True, False):
        be = CppBackend(store_noise=store)
        acc, grad, theta, theta0 = (t.clone() for t in inputs)
        norm = be.noise_sqnorm(runs, seed, torch.device("cpu"))
        assert (be.held_bytes() == 4 * n) == store
        be.tilt_accumulate(acc, grad, _s(0.5), _s(0.25), False, theta, theta0, runs, seed, _s(0.3))
        be.perturb(theta, theta0, runs, seed, _s(0.7), True)
        outs.append([norm, acc, theta, theta0])
    for i, (a, b) in enumerate(zip(*outs)):
        assert torch.equal(a, b), f"output {i}: stored noise differs from regenerated noise"
    # the kept noise is only used for its own (runs, seed): another seed regenerates
    be = CppBackend(store_noise=True)
    be.noise_sqnorm(runs, seed, torch.device("cpu"))
    theta, ref = inputs[1].clone(), inputs[1].clone()
    be.perturb(theta, inputs[2], runs, seed + 1, _s(0.7), False)
    REF.perturb(ref, inputs[2], runs, seed + 1, _s(0.7), False)
    assert_close(theta, ref, rtol=2e-2, atol=1e-5, what="perturb with another seed")


# ---- the noise -------------------------------------------------------------------------------------

# counters at 0, just below 2^32 (the low word wraps inside one SIMD vector) and far out
COUNTER_STARTS = [0, 5, 2**32 - 7, 2**40 + 3, 2**61 - 100]


@pytest.mark.parametrize("counter", COUNTER_STARTS)
def test_philox_words_bit_identical(counter, isa_guard):
    seed = rng.stream_seed(2024, 17, 2, rng.STREAM_START)
    cs = torch.arange(counter, counter + 77, dtype=torch.int64)
    zero = torch.zeros_like(cs)
    want = torch.stack(rng.philox4x32(cs & 0xFFFFFFFF, cs >> 32, zero, zero, seed & 0xFFFFFFFF, seed >> 32), 1)
    for isa in _isas():
        _ops()._set_isa(isa)
        got = _ops()._philox_words(seed, counter, 77)
        assert torch.equal(got, want), f"{isa}: Philox words differ from tsam_fast.rng.philox4x32"


def _ulps(actual: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|actual - truth| in units of the fp32 ulp at truth."""
    spacing = torch.from_numpy(np.spacing(np.abs(truth.float().numpy()))).double()
    return (actual.double() - truth.double()).abs() / spacing


def test_normals_within_ulp_bound_of_reference():
    n, start, seed = 1_000_003, 13, 2**62 + 987
    got = torch.empty(n)
    _ops().fill_noise(got, [0, start, n], seed, _s(1.0))
    err = _ulps(got, rng.normal(seed, start, n))
    assert err.max().item() <= NORMAL_ULP_BOUND, f"max {err.max().item()} ulp from the reference"


def test_normals_within_ulp_bound_of_float64():
    """Against the spec's formula in float64 (the angle 2*pi*u2 rounded to fp32 first, as the spec does)."""
    ncounters, seed = 1 << 17, 4321
    got = torch.empty(4 * ncounters)
    _ops().fill_noise(got, [0, 0, 4 * ncounters], seed, _s(1.0))
    cs = torch.arange(ncounters, dtype=torch.int64)
    zero = torch.zeros_like(cs)
    u = [rng.words_to_uniform(w) for w in rng.philox4x32(cs & 0xFFFFFFFF, cs >> 32, zero, zero, seed & 0xFFFFFFFF,
                                                          seed >> 32)]

    def box_muller(u1, u2):
        r = torch.sqrt(-2.0 * torch.log(torch.clamp_min(u1, rng.MIN_UNIFORM).double()))
        th = (u2 * rng.TWO_PI).double()
        return r * torch.cos(th), r * torch.sin(th)

    truth = torch.stack([*box_muller(u[0], u[1]), *box_muller(u[2], u[3])], 1).reshape(-1)
    err = _ulps(got, truth)
    assert err.max().item() <= NORMAL_ULP_BOUND, f"max {err.max().item()} ulp from float64"


def _all_ops(dtype, n=200_003, seed=99):
    """Every op once on fresh inputs; returns every output (norms and buffers)."""
    g = torch.Generator().manual_seed(5)
    r = lambda dt=dtype: torch.randn(n, generator=g).to(dt)  # noqa: E731
    runs = [0, 7, n // 3, n // 3, 10**6 + 1, n - n // 3]
    theta, theta0, grad, acc, v, pre = r(), r(), r(), r(torch.float32), r(torch.float32), r()
    xi = torch.empty(n)
    out = [_ops().noise_sqnorm(runs, seed), _ops().noise_sqnorm_store(xi, runs, seed + 1), xi,
           _ops().sqnorm(grad, None), _ops().sqnorm(grad, pre)]
    _ops().perturb(theta, theta0, runs, seed, _s(0.3), True)
    _ops().leapfrog(theta, grad, _s(0.1), _s(1.0), None, pre)
    _ops().leapfrog(theta, grad, _s(0.1), _s(0.5), v, None)
    _ops().tilt_accumulate(acc, grad, _s(0.8), _s(1.3), False, theta, theta0, runs, seed + 1, _s(0.2), xi)
    noise = torch.empty(n)
    _ops().fill_noise(noise, runs, seed + 2, _s(1.5))
    _ops().finalize(acc, grad, _s(0.6), _s(0.3), _s(0.4), False, theta, theta0)
    return out + [theta, theta0, grad, acc, v, noise]


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
def test_isa_paths_bit_identical(dtype, isa_guard):
    """avx512, avx2 and scalar kernels: same normals, same element results, same norms, bit for bit."""
    isas = _isas()
    _ops()._set_isa(isas[0])
    want = _all_ops(dtype)
    for isa in isas[1:]:
        _ops()._set_isa(isa)
        for i, (g, w) in enumerate(zip(_all_ops(dtype), want)):
            assert torch.equal(g, w), f"{isa} vs {isas[0]}: output {i} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
def test_thread_count_invariance(dtype, threads_guard):
    """Fixed segments and per-segment double partials summed in order: 1 and 2 threads agree bit for bit."""
    n = 1_000_003
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(_all_ops(dtype, n=n))
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"


# ---- whole trajectories ------------------------------------------------------------------------------

def _mlp():
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 7 * 7, 5))


def _trajectory(make, backend, sampler, steps=20):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(32, 20) if make is _mlp else torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 5, (x.shape[0],))
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, tilt=5.0, num_samples=3,
               sampler=sampler, radius=0.1, noise_scale=0.01, rho=0.05, seed=7, backend=backend)
    assert opt.backend_name() == backend
    losses = []
    for _ in range(steps):
        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(opt.step(closure))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), torch.stack(losses)


@pytest.mark.parametrize("sampler", ["ascent", "random", "hmc"])
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_trajectory_matches_reference(make, sampler):
    params, losses = _trajectory(make, "cpp", sampler)
    ref_params, ref_losses = _trajectory(make, "reference", sampler)
    assert_close(losses, ref_losses, **TRAJ_TOL, what=f"{sampler} tilted losses")
    assert_close(params, ref_params, **TRAJ_TOL, what=f"{sampler} parameters after 20 steps")


# ---- loading: prebuilt, JIT cache, fallback -------------------------------------------------------------

def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **{k: str(v) for k, v in env.items()}}
    full_env.pop("TSAM_FAST_CPP_ISA", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=600)


_SHOW = """
    import logging, tsam_fast
    logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
    st = tsam_fast.backend_info()["cpp"]
    print("AVAILABLE" if st.available else "UNAVAILABLE", st.reason)
"""


def test_prebuilt_module_is_preferred():
    """After `pip install -e .` the prebuilt tsam_fast._C is used: no compilation at import."""
    try:
        import tsam_fast._C  # noqa: F401
    except ImportError:
        pytest.skip("no prebuilt module in this installation (pip install --no-build-isolation -e .)")
    from tsam_fast.backends import cpp
    if cpp._stale_prebuilt():
        pytest.skip(f"prebuilt module is stale: {cpp._stale_prebuilt()}")
    res = _python(_SHOW)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("AVAILABLE") and "prebuilt module tsam_fast._C" in res.stdout, res.stdout
    assert "compiling" not in res.stderr


@pytest.mark.slow
def test_jit_build_then_cache(tmp_path):
    """No prebuilt module: the first process compiles (one line on stderr), the next reuses the cache."""
    env = dict(TSAM_FAST_CPP_JIT=1, TSAM_FAST_BUILD_DIR=tmp_path / "build")
    first = _python(_SHOW, **env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("AVAILABLE"), first.stdout + first.stderr
    assert "JIT build" in first.stdout
    compiling = [ln for ln in first.stderr.splitlines() if "compiling the C++ CPU backend" in ln]
    assert len(compiling) == 1, first.stderr
    second = _python(_SHOW, **env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("AVAILABLE"), second.stdout + second.stderr
    assert "compiling" not in second.stderr, second.stderr


_FALLBACK = """
    import logging, torch, tsam_fast
    from tsam_fast import TSAM, BackendUnavailable
    logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
    st = tsam_fast.backend_info()["cpp"]
    print("UNAVAILABLE" if not st.available else "AVAILABLE", st.reason)
    model = torch.nn.Linear(3, 2)
    print("AUTO", TSAM(model.parameters(), torch.optim.SGD, lr=0.1).backend_name("cpu"))
    try:
        TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="cpp")
        print("NO RAISE")
    except BackendUnavailable as exc:
        print("RAISED", exc)
"""


def _check_fallback(res, why):
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("UNAVAILABLE") and why in lines[0], res.stdout
    assert "AUTO reference" in lines
    assert lines[-1].startswith("RAISED") and why in lines[-1], res.stdout
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("LOG ")]
    assert len(warnings) == 1 and "uses 'reference'" in warnings[0] and why in warnings[0], res.stderr


def test_fallback_without_compiler(tmp_path):
    res = _python(_FALLBACK, TSAM_FAST_CPP_JIT=1, TSAM_FAST_BUILD_DIR=tmp_path / "empty",
                  CXX=tmp_path / "no-such-compiler")
    _check_fallback(res, "no C++ compiler")


def test_fallback_when_disabled():
    _check_fallback(_python(_FALLBACK, TSAM_FAST_CPP_DISABLE=1), "TSAM_FAST_CPP_DISABLE=1")


def test_auto_selects_cpp_for_cpu():
    assert resolve_backend("auto", "cpu").name == "cpp"
    assert "cpu" in STATUS.devices
