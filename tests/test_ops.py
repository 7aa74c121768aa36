"""Every op of the contract, on every fused backend available here, against the reference backend.

Inputs come from the contract table (``tsam_fast.backends.contract``): fresh random buffers (never
zeros), noise runs that straddle Philox counters; here at odd sizes, in all dtypes, with the awkward
scalars: large t*L (tiny a/b), tiny and zero norms. Also: each fused namespace's registered schemas are
the table's, and the reference implements the table's signatures.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tsam_fast.backends import contract, resolve_backend
from tsam_fast.backends.reference import ReferenceOps

from conftest import DTYPES, DTYPE_IDS, TOL, assert_close, fused_backends, interpreted

REF = ReferenceOps()
SPECS = contract.SPECS
BACKENDS = fused_backends()
SIZES = (0, 1, 7, 1023, 4097, 1_000_003)

if not BACKENDS:
    pytest.skip("no fused backend is available in this environment (see tsam_fast.backend_info())",
                allow_module_level=True)


def _sizes(name, device):
    return [n for n in SIZES if not interpreted(name, device) or n <= 4097]


CASES = [(name, device, n, dtype) for name, device in BACKENDS for n in _sizes(name, device) for dtype in DTYPES]
IDS = [f"{name}-{device}-n{n}-{DTYPE_IDS[dtype]}" for name, device, n, dtype in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    """(the backend's ops, device, n, dtype)"""
    name, device, n, dtype = request.param
    return resolve_backend(name, device).ops, device, n, dtype


def _pair(args):
    """Two copies of an op's arguments: the sample itself for the backend (its ``theta`` list views one
    storage at unaligned offsets, with gaps), independent clones for the reference."""
    def clone(a):
        if isinstance(a, list):
            return [t.clone() for t in a]
        return a.clone() if isinstance(a, torch.Tensor) else a
    return tuple(args), tuple(clone(a) for a in args)


def _flat(x):
    """A ``theta`` list as one tensor (its flat space), for comparisons."""
    return torch.cat([t.reshape(-1).cpu() for t in x]) if isinstance(x, list) else x.cpu()


def _check_theta(out_theta, ref_theta, gaps, dtype, what, exact=False):
    """The backend's theta list matches the reference's, and the storage between its tensors is untouched."""
    tol = dict(rtol=0, atol=0) if exact else TOL[dtype]
    assert_close(_flat(out_theta), _flat(ref_theta), **tol, what=what)
    if gaps is not None:
        assert torch.equal(contract.gaps_of(out_theta).cpu(), gaps.cpu()), f"{what}: wrote outside its tensors"


def test_noise_sqnorm(case):
    ops, device, n, dtype = case
    args = SPECS["noise_sqnorm"].args(n, dtype, device, seed=987654321987)
    assert_close(ops.noise_sqnorm(*args).cpu(), REF.noise_sqnorm(*args).cpu(), rtol=1e-5, atol=1e-6,
                 what="noise_sqnorm")


@pytest.mark.parametrize("mode", ["plain", "scaled"], ids=["plain", "adaptive"])
def test_sqnorm(case, mode):
    ops, device, n, dtype = case
    args = SPECS["sqnorm"].args(n, dtype, device, mode)
    assert_close(ops.sqnorm(*args).cpu(), REF.sqnorm(*args).cpu(), rtol=1e-5, atol=1e-6, what="sqnorm")


def test_sqnorm_tiny_and_zero(case):
    ops, device, n, dtype = case
    for x in (torch.full((n,), 1e-20, device=device), torch.zeros(n, device=device)):
        got = ops.sqnorm([x.to(dtype)])
        assert torch.isfinite(got).all()
        assert_close(got.cpu(), REF.sqnorm([x.to(dtype)]).cpu(), rtol=1e-5, atol=0, what="sqnorm tiny")


@pytest.mark.parametrize("save_backup", [True, False])
@pytest.mark.parametrize("noisy", [True, False], ids=["noise", "no-noise"])
def test_perturb(case, save_backup, noisy):
    ops, device, n, dtype = case
    args = SPECS["perturb"].args(n, dtype, device, seed=12345 if noisy else None, save_backup=save_backup)
    out, ref = _pair(args)
    gaps = contract.gaps_of(out[0])
    ops.perturb(*out)
    REF.perturb(*ref)
    assert_close(out[1].cpu(), ref[1].cpu(), rtol=0, atol=0, what="perturb theta0")
    _check_theta(out[0], ref[0], gaps, dtype, "perturb theta")


def test_fill_noise(case):
    ops, device, n, dtype = case
    out, ref = _pair(SPECS["fill_noise"].args(n, dtype, device, seed=42))
    ops.fill_noise(*out)
    REF.fill_noise(*ref)
    assert_close(out[0].cpu(), ref[0].cpu(), **TOL[torch.float32], what="fill_noise")


@pytest.mark.parametrize("mode", ["ascent", "adaptive", "hmc"])
def test_leapfrog(case, mode):
    ops, device, n, dtype = case
    out, ref = _pair(SPECS["leapfrog"].args(n, dtype, device, mode))
    theta, grad, kick, drift, momentum, precond = out
    gaps = contract.gaps_of(theta)
    ops.leapfrog(theta, grad, kick, drift, momentum=momentum, precond=precond)  # by keyword, as the schema names them
    REF.leapfrog(*ref)
    _check_theta(out[0], ref[0], gaps, dtype, "leapfrog theta")
    if mode == "hmc":
        assert_close(out[4].cpu(), ref[4].cpu(), **TOL[torch.float32], what="leapfrog momentum")


# (a, b): an ordinary update, a sample 60 nats below the running max (tiny b), one 60 above (tiny a).
SCALARS = [(0.8, 1.3), (1.0, 8.7e-27), (8.7e-27, 1.0)]


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("ab", SCALARS, ids=["plain", "tiny-b", "tiny-a"])
def test_tilt_accumulate(case, first, ab):
    ops, device, n, dtype = case
    out, ref = _pair(SPECS["tilt_accumulate"].args(n, dtype, device, first=first, a=ab[0], b=ab[1], seed=777))
    gaps = contract.gaps_of(out[5])
    ops.tilt_accumulate(*out)
    REF.tilt_accumulate(*ref)
    assert_close(out[0].cpu(), ref[0].cpu(), rtol=2e-6, atol=1e-30, what="tilt_accumulate A")
    _check_theta(out[5], ref[5], gaps, dtype, "tilt_accumulate theta")


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_finalize(case, first):
    ops, device, n, dtype = case
    out, ref = _pair(SPECS["finalize"].args(n, dtype, device, first=first))
    gaps = contract.gaps_of(out[6])
    ops.finalize(*out)
    REF.finalize(*ref)
    assert_close(out[1].cpu(), ref[1].cpu(), **TOL[dtype], what="finalize grad")
    _check_theta(out[6], ref[6], gaps, dtype, "finalize theta", exact=True)


# -- the contract itself --------------------------------------------------------------------------

NAMESPACES = sorted({resolve_backend(name, device).ops.namespace for name, device in BACKENDS})


@pytest.mark.parametrize("ns", NAMESPACES)
def test_registered_schemas_are_the_tables(ns):
    """Every fused namespace defines exactly the table's schema for each op (one schema, both namespaces)."""
    for op in contract.OPS:
        got = contract.registered(ns, op.name)._schema
        assert str(got) == str(torch._C.parse_schema(f"{ns}::{op.schema}")), f"{ns}::{op.name}"
        assert torch.Tag.pt2_compliant_tag in contract.registered(ns, op.name).tags


def test_namespaces_share_one_schema_per_op():
    if len(NAMESPACES) < 2:
        pytest.skip(f"only {NAMESPACES} registered here")
    for op in contract.OPS:
        bare = {str(contract.registered(ns, op.name)._schema).split("::", 1)[1] for ns in NAMESPACES}
        assert bare == {op.schema}, op.name


def _signature(fn):
    return [(p.name, p.default is not inspect.Parameter.empty) for p in inspect.signature(fn).parameters.values()]


def test_reference_implements_the_tables_signatures():
    """The oracle takes each op's schema arguments by the schema's names (keywords work on every backend)."""
    for op in contract.OPS:
        want = [(a.name, a.has_default_value()) for a in op.parsed.arguments]
        assert _signature(getattr(REF, op.name)) == want, op.name
