"""Tilt diagnostics (effective sample size, loss range) and the relative radius's geometry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsam_fast import TSAM

from conftest import assert_close


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 2))


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)


def _closure(model, x, y, seen=None):
    def closure():
        if seen is not None:
            seen.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("tilt,num_samples", [(0.0, 4), (1.0, 3), (50.0, 5), (400.0, 2)])
def test_ess_and_loss_range_follow_their_definitions(tilt, num_samples):
    """ESS = 1 / sum(w^2) of softmax(t L) recomputed here from the sample losses; in [1, s]; exactly s at t = 0."""
    model, (x, y) = _model(), _data()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, tilt=tilt, num_samples=num_samples, radius=0.5,
               start="sphere", sampler="random")
    for _ in range(3):
        opt.step(_closure(model, x, y))
        losses = opt.last_losses.double()
        w = torch.exp(tilt * (losses - losses.max()))
        w = w / w.sum()
        diag = opt.tilt_diagnostics()
        assert diag["ess"] is opt.last_ess and diag["loss_range"] is opt.last_loss_range
        assert_close(diag["ess"], 1 / (w * w).sum(), rtol=1e-5, atol=0, what="ESS")
        assert_close(diag["loss_range"], losses.max() - losses.min(), rtol=1e-6, atol=0, what="loss range")
        assert_close(diag["max_weight"], w.max(), rtol=1e-5, atol=0, what="max weight")
        assert 1 - 1e-6 <= float(diag["ess"]) <= num_samples + 1e-5
        assert float(diag["loss_range"]) > 0, "samples at radius 0.5 should differ"
    if tilt == 0:
        assert float(opt.last_ess) == pytest.approx(num_samples, rel=1e-6)
    if tilt == 400.0:  # a large tilt on distinct losses puts (almost) all the weight on one sample
        assert float(opt.last_ess) < 1.2


def test_tilt_diagnostics_before_any_step_is_an_error():
    opt = TSAM(_model().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="no TSAM step has finished yet"):
        opt.tilt_diagnostics()


@pytest.mark.parametrize("start", ["sphere", "gaussian", "ball"])
@pytest.mark.parametrize("radius", [0.01, 0.2])
def test_relative_radius_is_a_fraction_of_the_weights_norm(start, radius):
    """radius_mode="relative": the start theta - theta0 has norm r ||theta0|| (sphere), at most that
    (gaussian: clipped; ball: inside), for every sample of every step, with theta0 the step's own."""
    model, (x, y) = _model(), _data()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, sampler="random", num_samples=3, start=start,
               radius=radius, radius_mode="relative", noise_scale=0.05)
    for _ in range(3):
        theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        seen = []
        opt.step(_closure(model, x, y, seen))
        for point in seen:
            norm, want = (point - theta0).norm(), radius * theta0.norm()
            if start == "sphere":
                assert_close(norm, want, rtol=1e-5, atol=0, what="sphere start's norm")
            else:
                assert float(norm) <= float(want) * (1 + 1e-5)
                assert float(norm) > 0


def test_relative_radius_scales_with_the_weights():
    """Scaling every weight by c scales the relative start by c (the absolute one does not change)."""
    starts = {}
    for mode in ("absolute", "relative"):
        for c in (1.0, 3.0):
            model, (x, y) = _model(), _data()
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(c)
            theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
            seen = []
            opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, sampler="random", num_samples=1,
                       start="sphere", radius=0.1, radius_mode=mode)
            opt.step(_closure(model, x, y, seen))
            starts[mode, c] = seen[0] - theta0
    assert_close(starts["relative", 3.0], 3 * starts["relative", 1.0], rtol=1e-5, atol=1e-7, what="relative")
    assert_close(starts["absolute", 3.0], starts["absolute", 1.0], rtol=1e-5, atol=1e-7, what="absolute")


def test_invalid_radius_mode():
    with pytest.raises(ValueError, match=r"radius_mode='per_tensor'.*'absolute', 'relative'"):
        TSAM(_model().parameters(), torch.optim.SGD, lr=0.1, radius_mode="per_tensor")
