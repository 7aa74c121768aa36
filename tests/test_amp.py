"""Mixed precision: ``torch.autocast`` inside the closure (bf16 on CPU and CUDA, fp16 on CUDA) with the
fused backend against the reference backend, and training under autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsam_fast import TSAM

from conftest import assert_close
from tables import CONFIGS, TOYS, assert_unchanged, positions, snapshot

CUDA = torch.cuda.is_available()
AUTOCAST_CASES = [("cpu", torch.bfloat16)] + ([("cuda", torch.bfloat16), ("cuda", torch.float16)] if CUDA else [])
AUTOCAST_IDS = [f"{d}-{str(t).split('.')[-1]}" for d, t in AUTOCAST_CASES]


def _task(device):
    """The GELU MLP toy (20-64-64-3, 128 points, 3 classes) on ``device``: model, x, y."""
    toy = TOYS["gelu-mlp"]
    x, y = toy.batch(device)
    return toy.model(device), x, y


def _train_autocast(device, dtype, backend, steps, **kw):
    model, x, y = _task(device)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9, seed=5, num_samples=3, tilt=2.0,
               rho=0.05, radius=0.02, backend=backend, **kw)

    def closure():
        with torch.autocast(device_type=device, dtype=dtype):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(steps)]
    return losses, [p.detach().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_autocast_fused_matches_reference(device, dtype):
    """Same autocast forward, same noise: the fused backend's trajectory is the reference backend's.
    Low-precision matmuls turn an ulp of difference in the perturbed weights into a low-precision
    rounding of the loss now and then, so the bound is a few bf16/fp16 ulps, not fp32 ones."""
    got, got_p = _train_autocast(device, dtype, "auto", 5)
    want, want_p = _train_autocast(device, dtype, "reference", 5)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert_close(torch.tensor(got), torch.tensor(want), rtol=tol, atol=tol, what="tilted losses")
    for a, b in zip(got_p, want_p):
        assert_close(a, b, rtol=tol, atol=tol, what="parameters")


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_autocast_trains(device, dtype):
    losses, _ = _train_autocast(device, dtype, "auto", 30)
    assert losses[-1] < 0.6 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


# -- fp16 recipe: torch.amp.GradScaler ------------------------------------------------------------

SCALER_CASES = [
    CONFIGS["ascent"].but(num_samples=3),
    CONFIGS["ascent-clip"],  # 2 samples, max_grad_norm=0.5
    CONFIGS["random"].but(num_samples=3),
    CONFIGS["hmc"],  # 2 samples, 2 leapfrog steps
]
SCALER_DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
INIT_SCALE = 2.0 ** 12  # a power of two: scaling and unscaling are exact


def _scaled_training(device, cfg, steps, use_scaler=True, inject=None):
    """TSAM with the README's GradScaler recipe; ``inject=(step, call)`` writes an inf into one scaled
    gradient at that closure call. Returns the model, optimizer, scaler and per-step snapshots."""
    model, x, y = _task(device)
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE, growth_interval=10**6) if use_scaler else None
    opt = cfg.build(model, lr=0.2, momentum=0.9, seed=11, tilt=2.0, rho=0.05, radius=0.02, grad_scaler=scaler)
    step = 0

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if inject == (step, opt.closure_index):
            model[2].weight.grad[3, 7] = float("inf")
        return loss  # unscaled: the tilt weights use the true losses

    snaps = []
    for step in range(steps):
        before = dict(params=[p.detach().clone() for p in model.parameters()],
                      state={k: v.clone() for k, v in _momenta(opt).items()},
                      scale=scaler.get_scale() if scaler else None)
        opt.step(closure)
        if scaler:
            scaler.update()
        snaps.append(before)
    return model, opt, scaler, snaps


def _momenta(opt):
    return {i: opt.state[p]["momentum_buffer"] for i, p in enumerate(opt.param_groups[0]["params"])
            if "momentum_buffer" in opt.state.get(p, {})}


@pytest.mark.parametrize("device", SCALER_DEVICES)
@pytest.mark.parametrize("cfg", [c.param() for c in SCALER_CASES])
def test_grad_scaler_matches_unscaled_training(device, cfg):
    """Without overflow the scaled recipe follows the unscaled trajectory: the ascent direction is
    normalised, HMC kicks and the clip threshold are unscaled, and the scaler unscales the final gradient."""
    got, *_ = _scaled_training(device, cfg, 4)
    want, *_ = _scaled_training(device, cfg, 4, use_scaler=False)
    for a, b in zip(got.parameters(), want.parameters()):
        assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-5, atol=1e-6, what=f"{cfg.id} parameters")


@pytest.mark.parametrize("device", SCALER_DEVICES)
@pytest.mark.parametrize("cfg,call", positions(*SCALER_CASES))
def test_grad_scaler_overflow_skips_the_step(device, cfg, call):
    """An inf in the gradient of any closure call: no error, the parameters and the base optimizer's
    state stay as they were, the scale is backed off, and the next step trains normally."""
    model, opt, scaler, snaps = _scaled_training(device, cfg, 3, inject=(1, call))
    skipped_from, after_skip = snaps[1], snaps[2]
    for a, b in zip(skipped_from["params"], after_skip["params"]):
        assert torch.equal(a, b), "a skipped step moved the parameters"
    assert skipped_from["state"].keys() == after_skip["state"].keys()
    for k in skipped_from["state"]:
        assert torch.equal(skipped_from["state"][k], after_skip["state"][k]), "a skipped step changed momentum"
    assert after_skip["scale"] == skipped_from["scale"] * 0.5, "the scale was not backed off"
    assert scaler.get_scale() == after_skip["scale"]
    assert any(not torch.equal(a, p) for a, p in zip(after_skip["params"], model.parameters())), \
        "the step after the skip did not train"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.step_count == 3  # TSAM counts attempts: the retry draws fresh noise


def test_grad_scaler_must_be_a_grad_scaler():
    model, _, _ = _task("cpu")
    with pytest.raises(TypeError, match="torch.amp.GradScaler"):
        TSAM(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=object())


def test_grad_scaler_closure_must_scale():
    model, x, y = _task("cpu")
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, sampler="hmc", num_samples=1,
               grad_scaler=torch.amp.GradScaler("cpu"))
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"never called scaler\.scale\(loss\)"):
        opt.step(lambda: (l := nn.functional.cross_entropy(model(x), y)).backward() or l)
    assert_unchanged(snap)


@pytest.mark.parametrize("sampler", ["ascent", "hmc"])
def test_grad_scaler_sees_an_overflow_when_the_first_parameter_is_unused(sampler):
    """The overflow seen at an ascent/leapfrog gradient must reach the scaler through a parameter that has
    a gradient: here the optimizer's first parameter gets none (an unused layer), so it cannot carry it."""
    model, x, y = _task("cpu")
    unused = nn.Linear(3, 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    opt = TSAM(list(unused.parameters()) + list(model.parameters()), torch.optim.SGD, lr=0.2, momentum=0.9,
               seed=1, sampler=sampler, num_samples=2, radius=0.02, grad_scaler=scaler)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if opt.closure_index == 0:  # the first ascent / leapfrog gradient only
            model[0].weight.grad[0, 0] = float("inf")
        return loss

    snap = snapshot(model)
    opt.step(closure)
    scaler.update()
    assert_unchanged(snap)  # the step was skipped
    assert scaler.get_scale() == INIT_SCALE / 2


@pytest.mark.parametrize("device", SCALER_DEVICES)
def test_grad_scaler_fp16_autocast_trains(device):
    """The README's recipe end to end: fp16 autocast in the closure, a GradScaler, 30 steps; the loss
    ends within 0.05 nats of the same training in fp32 (about 5% of where it starts, while it falls by
    more than 40%), and the scale stays finite and positive."""
    results = {}
    for amp in (True, False):
        model, x, y = _task(device)
        scaler = torch.amp.GradScaler(device) if amp else None
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9, seed=5, num_samples=3, tilt=2.0,
                   rho=0.05, radius=0.02, grad_scaler=scaler)

        def closure():
            with torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            (scaler.scale(loss) if amp else loss).backward()
            return loss

        losses = []
        for _ in range(30):
            losses.append(opt.step(closure).item())
            if amp:
                scaler.update()
        results[amp] = losses
        if amp:
            assert 0 < scaler.get_scale() < float("inf")
    fp16, fp32 = results[True], results[False]
    assert fp16[-1] < 0.6 * fp16[0], f"loss went {fp16[0]:.3f} -> {fp16[-1]:.3f}"
    assert abs(fp16[-1] - fp32[-1]) < 0.05, (fp16[-1], fp32[-1])
