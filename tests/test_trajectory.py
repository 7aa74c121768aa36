"""Trajectory parity: a fused backend trains a toy model for several TSAM steps and, step by step, its
tilted loss, per-sample losses and every parameter follow the reference backend's (same seed, same noise).
One test over a table of cases: fused backend x model x sampler config x the backend it is compared with.

* ``cpp`` (CPU): 20 steps of every model (MLP, CNN, a net with a frozen layer, the same net with a bf16
  bias in two param groups) and every config below, against the reference on the CPU. The element ops
  match the reference bit for bit; only the normals (a few ulp) and the order of the double norm sums
  differ (measured max |diff| 7.5e-8 after 20 steps), hence rtol 1e-5, atol 1e-6.
* ``triton``: 5 steps of the small net (in Triton's interpreter on CPU tensors without a GPU, which is
  slow), against the reference on the same device (rtol 2e-5, atol 2e-6), and for two configs against the
  C++ backend on the CPU (the same tolerance in the interpreter; rtol 1e-4, atol 1e-5 from CUDA). On a GPU
  the CUDA trajectory is also compared with the CPU reference (rtol 1e-4, atol 1e-5): those cases are
  listed, and skipped, without CUDA.

bf16 parameters are compared within a bf16 rounding (``conftest.TOL``).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

import tsam_fast

from conftest import DTYPE_IDS, TOL, assert_close, fused_backends, interpreted
from tables import CONFIGS, TOYS, Config, one_thread  # noqa: F401  (one_thread: the fixture below)

pytestmark = pytest.mark.usefixtures("one_thread")

# Options every trajectory shares; each config adds its sampler, sample count, tilt and radius.
BASE = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, rho=0.05, seed=7)

TRAJECTORY_CONFIGS: List[Config] = [
    CONFIGS["ascent"].but(num_samples=3, tilt=1.0, radius=0.05, noise_scale=0.01),
    CONFIGS["sam"].but(tilt=0.0),
    CONFIGS["ascent-adaptive"].but(id="ascent-adaptive-ball-clip", start="ball", max_grad_norm=0.5, tilt=5.0,
                                   radius=0.02),
    CONFIGS["random-delta"].but(num_samples=4, tilt=20.0, delta=1.0, radius=0.05, noise_scale=0.02),
    CONFIGS["hmc-sphere"].but(tilt=2.0, radius=0.03),
    CONFIGS["hmc"].but(num_samples=3, hmc_steps=1, tilt=5.0, radius=0.1, noise_scale=0.01),
    CONFIGS["two-groups"].but(num_samples=3, tilt=1.0, radius=0.05, noise_scale=0.01),
    CONFIGS["ascent-shared-adaptive"].but(num_samples=3, tilt=2.0, radius=0.05, noise_scale=0.01),
]
BY_ID = {c.id: c for c in TRAJECTORY_CONFIGS}

# The model with a bf16 bias runs the two-group config only (its bias lands in the second group).
MIXED = "frozen-net-bf16"
PLANS = {
    # backend: (models, steps, configs also compared with the C++ backend on the CPU)
    "cpp": (("mlp", "cnn", "frozen-net", MIXED), 20, ()),
    "triton": (("frozen-net", MIXED), 5, ("ascent", "hmc-sphere")),
}
CPU_REFERENCE_FROM_CUDA = ("ascent",)  # configs whose CUDA trajectory is also compared with the CPU reference

TOLERANCES = {
    ("cpp", "cpu", "reference", "cpu"): dict(rtol=1e-5, atol=1e-6),
    ("triton", "cpu", "reference", "cpu"): dict(rtol=2e-5, atol=2e-6),
    ("triton", "cuda", "reference", "cuda"): dict(rtol=2e-5, atol=2e-6),
    ("triton", "cpu", "cpp", "cpu"): dict(rtol=2e-5, atol=2e-6),
    ("triton", "cuda", "cpp", "cpu"): dict(rtol=1e-4, atol=1e-5),
    ("triton", "cuda", "reference", "cpu"): dict(rtol=1e-4, atol=1e-5),
}


def _backends():
    """(backend, device, skip reason or None): the fused backends that run here, and the expected ones
    that do not (the CUDA cases without a GPU, the interpreter's with one), listed as skipped."""
    here = fused_backends()
    out = [(b, d, None) for b, d in here]
    info = tsam_fast.backend_info()
    for b, d in (("cpp", "cpu"), ("triton", "cpu"), ("triton", "cuda")):
        if (b, d) in here:
            continue
        if d == "cuda" and not torch.cuda.is_available():
            why = "needs a CUDA GPU"
        elif not info[b].available:
            why = f"{b} backend unavailable: {info[b].reason}"
        else:
            why = f"{b} does not run on {d} here (triton on CPU tensors needs TRITON_INTERPRET=1)"
        out.append((b, d, why))
    return out


def _cases():
    for backend, device, why in _backends():
        models, steps, vs_cpp = PLANS[backend]
        marks = [pytest.mark.skip(reason=why)] if why else []
        for model in models:
            for cfg in TRAJECTORY_CONFIGS:
                if model == MIXED and cfg.id != "two-groups":
                    continue
                oracles = [("reference", device)]
                if cfg.id in vs_cpp and model != MIXED:
                    oracles.append(("cpp", "cpu"))
                if device == "cuda" and cfg.id in CPU_REFERENCE_FROM_CUDA and model != MIXED:
                    oracles.append(("reference", "cpu"))
                for ob, od in oracles:
                    yield pytest.param(backend, device, model, cfg, ob, od, steps, marks=marks,
                                       id=f"{backend}-{device}-{model}-{cfg.id}-vs-{ob}-{od}")


CASES = list(_cases())

_HISTORIES: Dict[Tuple[str, str, str, str], list] = {}


def _history(backend: str, device: str, model_id: str, cfg: Config, steps: int):
    """Per step: (tilted loss, sample losses, [(dtype, parameter values)]), all on the CPU. Cached per
    (backend, device, model, config): a shorter trajectory is the prefix of a longer one."""
    key = (backend, device, model_id, cfg.id)
    if key in _HISTORIES and len(_HISTORIES[key]) >= steps:
        return _HISTORIES[key][:steps]
    toy = TOYS[model_id]
    model = toy.model(device=device)
    opt = cfg.build(model, backend=backend, **BASE)
    assert opt.backend_name(device) == backend
    closure = toy.closure(model, toy.batch(device=device))
    history = []
    for _ in range(steps):
        tilted = opt.step(closure)
        history.append((tilted.detach().cpu(), opt.last_losses.cpu(),
                        [(p.dtype, p.detach().float().cpu().clone()) for p in model.parameters()]))
    _HISTORIES[key] = history
    return history


@pytest.mark.parametrize("backend,device,model,cfg,oracle,oracle_device,steps", CASES)
def test_trajectory_matches(backend, device, model, cfg, oracle, oracle_device, steps):
    if oracle == "cpp" and not tsam_fast.backend_info()["cpp"].available:
        pytest.skip(f"cpp backend unavailable: {tsam_fast.backend_info()['cpp'].reason}")
    tol = TOLERANCES[(backend, device, oracle, oracle_device)]
    got = _history(backend, device, model, cfg, steps)
    want = _history(oracle, oracle_device, model, cfg, steps)
    assert len(got) == len(want) == steps
    where = f"{backend} on {device}{' (interpreted)' if interpreted(backend, device) else ''} vs {oracle} on " \
            f"{oracle_device}, {model}, {cfg.id}"
    for k, ((t1, l1, p1), (t2, l2, p2)) in enumerate(zip(got, want)):
        assert_close(t1, t2, **tol, what=f"{where}: step {k} tilted loss")
        assert_close(l1, l2, **tol, what=f"{where}: step {k} sample losses")
        assert len(p1) == len(p2)
        for i, ((dtype, a), (dtype2, b)) in enumerate(zip(p1, p2)):
            assert dtype == dtype2
            ptol = tol if dtype == torch.float32 else TOL[dtype]
            assert_close(a, b, **ptol, what=f"{where}: step {k} parameter {i} ({DTYPE_IDS[dtype]})")
