"""The cases of tests/test_layout_golden.py (and of tests/record_layout_golden.py, which recorded them).

A model whose parameters make the layout work: odd sizes, a 1-element and an empty parameter, a
channels_last convolution (kept in its own memory format), a frozen layer between trainable ones (its
elements keep their global noise indices), a bf16 parameter (a second bucket) and a second param group.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from tsam_fast import TSAM

NOISE_BACKENDS = ("reference", "cpp")
TRAJECTORY_BACKENDS = ("reference", "cpp")
STEPS = 20

# name -> TSAM options; every case draws noise (the random starts) so the trajectories depend on it
CASES: Dict[str, dict] = {
    "ascent": dict(sampler="ascent", num_samples=3, tilt=1.0, radius=0.05, noise_scale=0.01),
    "random": dict(sampler="random", num_samples=3, tilt=5.0, radius=0.05, noise_scale=0.02),
    "hmc": dict(sampler="hmc", num_samples=2, hmc_steps=2, tilt=2.0, radius=0.03, start="sphere"),
    "shared-adaptive": dict(sampler="ascent", shared_ascent=True, adaptive=True, num_samples=3, tilt=2.0,
                            radius=0.05, noise_scale=0.01),
}


class LayoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.frozen = nn.Linear(7, 7)
        self.a = nn.Linear(5 * 4 * 4, 7)
        self.b = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.randn(1))
        self.empty = nn.Parameter(torch.zeros(0))
        self.low = nn.Parameter(torch.randn(11).to(torch.bfloat16))
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = F.avg_pool2d(h, 2).flatten(1)
        h = torch.tanh(self.frozen(torch.tanh(self.a(h))))
        out = self.b(h) * self.scale
        return out + self.low.float()[:3].sum() + self.empty.sum()


def make_model() -> nn.Module:
    torch.manual_seed(3)
    model = LayoutNet()
    model.conv.to(memory_format=torch.channels_last)
    return model


def batch():
    g = torch.Generator().manual_seed(4)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def groups(model: nn.Module):
    weights = [p for n, p in model.named_parameters() if p.dim() >= 2]
    others = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": weights}, {"params": others, "rho": 0.02, "tilt": 0.5}]


def _values(model: nn.Module) -> Dict[str, List[float]]:
    return {n: p.detach().double().reshape(-1).tolist() for n, p in model.named_parameters()}


def noise_points(backend: str) -> List[Dict[str, List[float]]]:
    """The parameters at each evaluation of one random-sampler step: theta0 + c xi_j, bit for bit."""
    model = make_model()
    opt = TSAM(groups(model), torch.optim.SGD, lr=0.1, sampler="random", num_samples=3, radius=0.1,
               noise_scale=0.5, seed=11, backend=backend)
    x, y = batch()
    points = []

    def closure():
        points.append(_values(model))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    return points


def trajectory(backend: str, case: str) -> Dict[str, List[float]]:
    model = make_model()
    opt = TSAM(groups(model), torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4, rho=0.05, seed=7,
               backend=backend, **CASES[case])
    x, y = batch()

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for _ in range(STEPS):
        opt.step(closure)
    return _values(model)
