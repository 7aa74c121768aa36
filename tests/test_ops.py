"""Every op of the contract, on every fused backend available here, against the reference backend.

Fresh random inputs (never zeros), odd sizes, all dtypes, noise runs that straddle Philox counters,
and the awkward scalars: large t*L (tiny a/b), tiny and zero norms.
"""

from __future__ import annotations

import pytest
import torch

from tsam_fast.backends import resolve_backend
from tsam_fast.backends.reference import ReferenceBackend

from conftest import DTYPES, DTYPE_IDS, TOL, assert_close, fused_backends, interpreted

REF = ReferenceBackend()
BACKENDS = fused_backends()
SIZES = (0, 1, 7, 1023, 4097, 1_000_003)

if not BACKENDS:
    pytest.skip("no fused backend is available in this environment (see tsam_fast.backend_info())",
                allow_module_level=True)


def _sizes(name, device):
    return [n for n in SIZES if not interpreted(name, device) or n <= 4097]


def _runs(n):
    """Two runs whose global offsets are not multiples of 4 (counter straddling) and a gap between."""
    if n < 2:
        return ((0, 5, n),) if n else ()
    half = n // 2
    return ((0, 13, half), (half, 13 + half + 1002, n - half))


def _scalar(x, device):
    return torch.tensor(x, dtype=torch.float32, device=device)


CASES = [(name, device, n, dtype) for name, device in BACKENDS for n in _sizes(name, device) for dtype in DTYPES]
IDS = [f"{name}-{device}-n{n}-{DTYPE_IDS[dtype]}" for name, device, n, dtype in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    name, device, n, dtype = request.param
    return resolve_backend(name, device), device, n, dtype


def _fresh(n, dtype, device, scale=1.0):
    return (torch.randn(n, device=device) * scale).to(dtype)


def test_noise_sqnorm(case):
    be, device, n, dtype = case
    runs, seed = _runs(n), 987654321987
    assert_close(be.noise_sqnorm(runs, seed, torch.device(device)).cpu(),
                 REF.noise_sqnorm(runs, seed, torch.device(device)).cpu(), rtol=1e-5, atol=1e-6, what="noise_sqnorm")


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "adaptive"])
def test_sqnorm(case, scaled):
    be, device, n, dtype = case
    x = _fresh(n, dtype, device)
    scale = _fresh(n, dtype, device) if scaled else None
    assert_close(be.sqnorm(x, scale).cpu(), REF.sqnorm(x, scale).cpu(), rtol=1e-5, atol=1e-6, what="sqnorm")


def test_sqnorm_tiny_and_zero(case):
    be, device, n, dtype = case
    for x in (torch.full((n,), 1e-20, device=device), torch.zeros(n, device=device)):
        got = be.sqnorm(x.to(dtype))
        assert torch.isfinite(got).all()
        assert_close(got.cpu(), REF.sqnorm(x.to(dtype)).cpu(), rtol=1e-5, atol=0, what="sqnorm tiny")


@pytest.mark.parametrize("save_backup", [True, False])
@pytest.mark.parametrize("noisy", [True, False], ids=["noise", "no-noise"])
def test_perturb(case, save_backup, noisy):
    be, device, n, dtype = case
    theta, theta0 = _fresh(n, dtype, device), _fresh(n, dtype, device)
    runs, seed, coef = _runs(n), (12345 if noisy else None), _scalar(0.37, device)
    out = [theta.clone(), theta0.clone()]
    ref = [theta.clone(), theta0.clone()]
    be.perturb(out[0], out[1], runs, seed, coef, save_backup)
    REF.perturb(ref[0], ref[1], runs, seed, coef, save_backup)
    assert_close(out[1].cpu(), ref[1].cpu(), rtol=0, atol=0, what="perturb theta0")
    assert_close(out[0].cpu(), ref[0].cpu(), **TOL[dtype], what="perturb theta")


def test_fill_noise(case):
    be, device, n, dtype = case
    out, ref = torch.randn(n, device=device), torch.randn(n, device=device)
    be.fill_noise(out, _runs(n), 42, _scalar(1.7, device))
    REF.fill_noise(ref, _runs(n), 42, _scalar(1.7, device))
    assert_close(out.cpu(), ref.cpu(), **TOL[torch.float32], what="fill_noise")


@pytest.mark.parametrize("mode", ["ascent", "adaptive", "hmc"])
def test_leapfrog(case, mode):
    be, device, n, dtype = case
    theta, grad = _fresh(n, dtype, device), _fresh(n, dtype, device)
    precond = _fresh(n, dtype, device) if mode == "adaptive" else None
    v = torch.randn(n, device=device) if mode == "hmc" else None
    kick, drift = _scalar(0.05 / 3.3, device), _scalar(0.7 if mode == "hmc" else 1.0, device)
    out, ref = theta.clone(), theta.clone()
    v_out, v_ref = (v.clone(), v.clone()) if v is not None else (None, None)
    be.leapfrog(out, grad, kick, drift, momentum=v_out, precond=precond)
    REF.leapfrog(ref, grad, kick, drift, momentum=v_ref, precond=precond)
    assert_close(out.cpu(), ref.cpu(), **TOL[dtype], what="leapfrog theta")
    if v is not None:
        assert_close(v_out.cpu(), v_ref.cpu(), **TOL[torch.float32], what="leapfrog momentum")


# (a, b): an ordinary update, a sample 60 nats below the running max (tiny b), one 60 above (tiny a).
SCALARS = [(0.8, 1.3), (1.0, 8.7e-27), (8.7e-27, 1.0)]


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("ab", SCALARS, ids=["plain", "tiny-b", "tiny-a"])
def test_tilt_accumulate(case, first, ab):
    be, device, n, dtype = case
    acc, grad = torch.randn(n, device=device), _fresh(n, dtype, device)
    theta, theta0 = _fresh(n, dtype, device), _fresh(n, dtype, device)
    a, b, coef = _scalar(ab[0], device), _scalar(ab[1], device), _scalar(0.21, device)
    outs = [acc.clone(), theta.clone()]
    refs = [acc.clone(), theta.clone()]
    be.tilt_accumulate(outs[0], grad, a, b, first, outs[1], theta0, _runs(n), 777, coef)
    REF.tilt_accumulate(refs[0], grad, a, b, first, refs[1], theta0, _runs(n), 777, coef)
    assert_close(outs[0].cpu(), refs[0].cpu(), rtol=2e-6, atol=1e-30, what="tilt_accumulate A")
    assert_close(outs[1].cpu(), refs[1].cpu(), **TOL[dtype], what="tilt_accumulate theta")


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_finalize(case, first):
    be, device, n, dtype = case
    acc, grad = torch.randn(n, device=device), _fresh(n, dtype, device)
    theta, theta0 = _fresh(n, dtype, device), _fresh(n, dtype, device)
    a, b, inv_z = _scalar(0.6, device), _scalar(0.3, device), _scalar(1 / 2.9, device)
    outs = [grad.clone(), theta.clone()]
    refs = [grad.clone(), theta.clone()]
    be.finalize(acc.clone(), outs[0], a, b, inv_z, first, outs[1], theta0)
    REF.finalize(acc.clone(), refs[0], a, b, inv_z, first, refs[1], theta0)
    assert_close(outs[0].cpu(), refs[0].cpu(), **TOL[dtype], what="finalize grad")
    assert_close(outs[1].cpu(), refs[1].cpu(), rtol=0, atol=0, what="finalize theta")
