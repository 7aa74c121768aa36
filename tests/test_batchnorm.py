"""The batch-norm recipe: running statistics update once per TSAM step (first closure call only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsam_fast import TSAM, bn_update_once_per_step


def net(momentum):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 2), nn.BatchNorm1d(2, momentum=momentum))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_running_stats_update_once_per_step(momentum):
    x = torch.randn(8, 3, 8, 8)
    model = net(momentum)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.0, num_samples=3, radius=0.1, backend="reference")
    handle = bn_update_once_per_step(model, opt)
    forwards = []

    def closure():
        forwards.append(opt.closure_index)
        loss = model(x).square().mean()
        loss.backward()
        return loss

    # lr=0: parameters stay at theta0, so the expected statistics are those of ONE forward at the
    # first sample's point, which the closure-call log lets us replay on a copy.
    first_point = {}
    original = closure

    def logging_closure():
        if opt.closure_index == 0:
            first_point.update({k: v.clone() for k, v in model.state_dict().items()})
        return original()

    opt.step(logging_closure)
    assert forwards == [0, 1, 2, 3, 4, 5]
    replay = net(momentum)
    replay.load_state_dict(first_point)
    replay.train()
    with torch.no_grad():
        replay(x)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(replay.named_buffers())[name]), name
    assert int(model[1].num_batches_tracked) == 1

    # outside a step (and after removing the recipe) every forward updates the statistics again
    model(x)
    assert int(model[1].num_batches_tracked) == 2
    handle.remove()
    opt.step(closure)
    assert int(model[1].num_batches_tracked) == 2 + 6


def test_recipe_needs_batch_norm():
    model = nn.Linear(2, 2)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    with pytest.raises(ValueError, match="no batch-norm layer"):
        bn_update_once_per_step(model, opt)
