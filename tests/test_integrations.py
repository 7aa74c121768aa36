"""TSAM inside ordinary training loops: compiled models in the closure, LR schedulers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsam_fast import TSAM


def _pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    return a, b


def test_compiled_model_inside_the_closure():
    eager, model = _pair()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3)
    opts = [TSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, radius=0.1) for m in (eager, model)]
    for _ in range(3):
        opts[0].step(lambda: (l := eager(x).square().mean()).backward() or l)
        opts[1].step(lambda: (l := compiled(x).square().mean()).backward() or l)
    for p, q in zip(eager.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=10),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
], ids=["onecycle", "cosine", "plateau"])
def test_lr_schedulers_drive_the_base_optimizer(make):
    model, _ = _pair()
    x = torch.randn(4, 3)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = make(opt)
    lrs = []
    for _ in range(4):
        loss = opt.step(lambda: (l := model(x).square().mean()).backward() or l)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a loss that never improves: the lr halves after each step
        else:
            sched.step()
        lrs.append(opt.base_optimizer.param_groups[0]["lr"])
        assert torch.isfinite(loss)
    assert len(set(lrs)) > 1 and opt.param_groups is opt.base_optimizer.param_groups
