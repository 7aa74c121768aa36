"""The C++ CPU backend beyond the generic op parity of test_ops.py.

* the operators are real torch ops: ``torch.library.opcheck`` (schema, fake kernels, aot dispatch) of every
  op and mode of the contract table, and a ``torch.compile``d function that calls them; the C++ kernels
  are checked against the table's schemas when those are defined (a mismatching kernel is refused);
* the noise: Philox words bit-identical to ``tsam_fast.rng.philox4x32``; normals within a stated ulp bound
  of ``tsam_fast.rng.normal`` and of a float64 evaluation of the spec's formula; every instruction-set
  path (avx512 / avx2 / scalar) bit-identical;
* determinism: 1 and 2 threads give bit-identical results (norms included);
* whole trajectories (backend="cpp" vs backend="reference"): ``tests/test_trajectory.py``;
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

import tsam_fast
from tsam_fast import rng
from tsam_fast.backends import contract, resolve_backend

from conftest import DTYPES, DTYPE_IDS, assert_close

STATUS = tsam_fast.backend_info()["cpp"]
REPO = Path(__file__).resolve().parents[1]

# Normals: at most this many units in the last place (of the fp32 result) from the reference backend and
# from a float64 evaluation of the spec's Box-Muller (measured: 3.0 and 2.95 over 4M normals; the
# reference itself is 2.3 ulp from float64). The Philox words are exact.
NORMAL_ULP_BOUND = 4.0

pytestmark = pytest.mark.skipif(not STATUS.available, reason=f"cpp backend unavailable: {STATUS.reason}")

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

OPCHECK = contract.opcheck_cases("tsam_fast")


@pytest.mark.parametrize("name,case,dtype", [c[1:] for c in OPCHECK], ids=[c[0] for c in OPCHECK])
def test_opcheck(name, case, dtype):
    """Every op and mode of the contract table, in every dtype: schema, fake kernel, aot dispatch."""
    contract.opcheck("tsam_fast", name, case, dtype)


def test_ops_inside_torch_compile():
    """A compiled function that calls the ops traces them through their fake kernels (no graph break)."""
    n = 1001
    theta, theta0, grad, acc = torch.randn(n), torch.randn(n), torch.randn(n), torch.randn(n)
    runs = [0, 0, n]

    def step(theta, theta0, grad, acc):
        norm = _ops().sqnorm([grad], None).sqrt()
        _ops().leapfrog([theta], grad, 0.05 / (norm + 1e-12), torch.ones(()), None, None)
        _ops().tilt_accumulate(acc, grad, torch.ones(()), torch.ones(()), True, [theta], theta0, runs, 11,
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
        _ops().fill_noise(torch.zeros(10), [5, 0, 5, 0, 100, 5], 1, _s(1.0))
    with pytest.raises(RuntimeError, match="is not tensor 0's"):
        _ops().perturb([torch.zeros(5), torch.zeros(5)], torch.zeros(10), [5, 0, 5, 0, 100, 5], 1, _s(1.0), False)
    with pytest.raises(RuntimeError, match="one run per tensor"):
        _ops().perturb([torch.zeros(5), torch.zeros(5)], torch.zeros(10), [0, 0, 10], 1, _s(1.0), False)
    with pytest.raises(RuntimeError, match="one dtype per list"):
        _ops().leapfrog([torch.zeros(5), torch.zeros(5, dtype=torch.bfloat16)], torch.zeros(10), _s(1.0), _s(1.0))
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops().leapfrog([torch.zeros(4, 2).t()], torch.zeros(8), _s(1.0), _s(1.0))
    with pytest.raises(RuntimeError, match="triples"):
        _ops().fill_noise(torch.zeros(10), [0, 0], 1, _s(1.0))
    with pytest.raises(RuntimeError, match="float32"):
        _ops().tilt_accumulate(torch.zeros(4, dtype=torch.float16), torch.zeros(4), _s(1.0), _s(1.0), True,
                               [torch.zeros(4)], torch.zeros(4), [0, 0, 4], 1, _s(1.0))
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        _ops().noise_sqnorm([0, 0, 4], 1, torch.device("meta"))


# A tiny extension that registers kernels of contract ops, as csrc/ops.cpp does: one namespace with the
# table's signature, one with a drifted one (seed as a double where the table says int).
_PROBE_CPP = r"""
#include <ATen/core/Tensor.h>
#include <torch/library.h>
namespace {
void fill_noise(const at::Tensor& out, c10::IntArrayRef runs, int64_t seed, const at::Tensor& coef) { out.fill_(7); }
void perturb(at::TensorList theta, const at::Tensor& theta0, c10::IntArrayRef runs, double seed,
             const at::Tensor& coef, bool save_backup) {}
}
TORCH_LIBRARY_IMPL(tsam_fast_probe_ok, CPU, m) { m.impl("fill_noise", &fill_noise); }
TORCH_LIBRARY_IMPL(tsam_fast_probe_bad, CPU, m) { m.impl("fill_noise", &fill_noise); m.impl("perturb", &perturb); }
"""

_PROBE = """
    import sys, torch
    from torch.utils import cpp_extension
    from tsam_fast.backends import contract
    cpp_extension.load(name="tsam_fast_schema_probe", sources=[sys.argv[1]], build_directory=sys.argv[2],
                       is_python_module=False, verbose=False)  # loads it: kernels registered, no schema yet
    contract.define("tsam_fast_probe_ok")
    out = torch.zeros(3)
    torch.ops.tsam_fast_probe_ok.fill_noise(out, [0, 0, 3], 1, torch.tensor(1.0))
    print("OK", out.tolist())
    try:
        contract.define("tsam_fast_probe_bad")
        print("NOT REFUSED")
    except RuntimeError as exc:
        print("REFUSED", " ".join(str(exc).split()))
"""


@pytest.mark.slow
def test_cpp_kernels_are_checked_against_the_table(tmp_path):
    """The dispatcher takes C++ kernels registered before their schema (csrc/ops.cpp registers only kernels;
    contract.define adds the schemas after the library is loaded), and refuses, with a Python exception,
    a kernel whose C++ signature disagrees with the table's schema."""
    from torch.utils import cpp_extension
    import hashlib
    import shutil

    if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
        pytest.skip("needs a C++ compiler and ninja")
    key = hashlib.sha256((_PROBE_CPP + torch.__version__).encode()).hexdigest()[:12]
    build = Path.home() / ".cache" / "tsam_fast" / f"schema-probe-{key}"  # compiled once (~20 s), then reused
    build.mkdir(parents=True, exist_ok=True)
    src = build / "probe.cpp"
    if not src.exists() or src.read_text() != _PROBE_CPP:
        src.write_text(_PROBE_CPP)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_PROBE), str(src), str(build)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "OK [7.0, 7.0, 7.0]", res.stdout
    assert lines[1].startswith("REFUSED") and "tsam_fast_probe_bad::perturb" in lines[1] \
        and "doesn't match" in lines[1] and "int? vs float" in lines[1], lines[1]


def test_run_gaps_get_no_noise():
    """Buffer elements outside every run get xi = 0 (defined behaviour; the optimizer never leaves gaps)."""
    out = torch.ones(12)
    _ops().fill_noise(out, [0, 0, 4, 8, 100, 4], 3, _s(1.0))
    assert torch.equal(out[4:8], torch.zeros(4))
    assert (out[:4] != 0).all() and (out[8:] != 0).all()


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
    flat, theta0, grad, acc, v, pre = r(), r(), r(), r(torch.float32), r(torch.float32), r()
    theta = [flat[:n // 3], flat[n // 3:]]  # two parameters, one run each
    cpu = torch.device("cpu")
    out = [_ops().noise_sqnorm(runs, seed, cpu), _ops().noise_sqnorm(runs, seed + 1, cpu),
           _ops().sqnorm([grad], None), _ops().sqnorm(theta, pre)]
    _ops().perturb(theta, theta0, runs, seed, _s(0.3), True)
    _ops().leapfrog(theta, grad, _s(0.1), _s(1.0), None, pre)
    _ops().leapfrog(theta, grad, _s(0.1), _s(0.5), v, None)
    _ops().tilt_accumulate(acc, grad, _s(0.8), _s(1.3), False, theta, theta0, runs, seed + 1, _s(0.2))
    noise = torch.empty(n)
    _ops().fill_noise(noise, runs, seed + 2, _s(1.5))
    _ops().finalize(acc, grad, _s(0.6), _s(0.3), _s(0.4), False, theta, theta0)
    return out + [flat, theta0, grad, acc, v, noise]


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
    import importlib.util

    from tsam_fast.backends import cpp
    if importlib.util.find_spec("tsam_fast._C") is None:
        pytest.skip("no prebuilt module in this installation (pip install --no-build-isolation -e .)")
    # checked before anything imports it: loading a stale prebuilt next to the JIT build already loaded
    # here would register the same operators twice (an abort inside the library load)
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


@pytest.mark.skipif(not STATUS.available, reason="the C++ extension is not available here")
@pytest.mark.parametrize("options", [dict(), dict(shared_ascent=True), dict(sampler="random", backward_samples=2),
                                     dict(start="sphere", num_samples=2)],
                         ids=["ascent", "shared-ascent", "sampled-backward", "sphere"])
def test_kept_noise_is_the_regenerated_noise_bit_for_bit(monkeypatch, options):
    """A bucket of at least KEEP_MIN elements keeps a start's noise from its norm to its use: the steps are
    bit-identical to regenerating it, over an fp32 and a bf16 bucket, and the buffer is counted as held."""
    from tsam_fast.backends import cpp

    backend = resolve_backend("cpp", "cpu")
    monkeypatch.setattr(cpp, "KEEP_MIN", 1000)
    recalled, recall = [], backend._recall
    monkeypatch.setattr(backend, "_recall", lambda bucket, seed: recalled.append(recall(bucket, seed)) or recalled[-1])

    def run(keep: bool):
        monkeypatch.setattr(backend, "keep", keep)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
        model[2].to(torch.bfloat16)
        x, y = torch.randn(16, 40), torch.randint(0, 3, (16,))
        opt = tsam_fast.TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="cpp", radius=0.05, seed=5,
                             **options)

        def closure(backward=True):
            loss = torch.nn.functional.cross_entropy(model[2](model[1](model[0](x)).bfloat16()).float(), y)
            if backward:
                loss.backward()
            return loss
        for _ in range(3):
            opt.step(closure)
        return [p.detach().clone() for p in model.parameters()], opt.extra_memory_bytes()

    kept, kept_bytes = run(True)
    assert any(xi is not None for xi in recalled), "no move used the kept noise"
    regenerated, plain_bytes = run(False)
    for a, b in zip(kept, regenerated):
        assert torch.equal(a, b)
    assert kept_bytes - plain_bytes == 4 * (40 * 40 + 40)  # the fp32 bucket keeps its noise; the bf16 one is small
