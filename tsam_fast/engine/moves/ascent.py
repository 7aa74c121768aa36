"""``sampler="ascent"``: after sample j's ascent evaluation, one normalised ascent step from its start
(docs/design.md §3): theta <- theta + rho * P g / ||T g|| (P = T^2, T = |theta0| if ``adaptive``; else 1)."""

from __future__ import annotations

from typing import Dict

import torch

__all__ = ["after_ascent", "ascend"]


def after_ascent(step, ev, loss: torch.Tensor) -> None:
    ascend(step, step.guard.ascent_step(step.grad_sqnorm(step.config.adaptive)))


def ascend(step, inv: torch.Tensor) -> None:
    """The ascent move, given ``inv`` = 1/||T g|` (one kick per distinct rho; shared ascent uses it too)."""
    by_rho: Dict[float, torch.Tensor] = {}
    for rho in step.rhos:
        if rho not in by_rho:
            by_rho[rho] = inv * rho
    kicks = [by_rho[rho] for rho in step.rhos]
    one = step.scalar(1.0)
    for t in step.targets:
        t.backend.ascend(t.bucket, step.per_group(kicks, t), step.to_bucket(one, t.bucket), step.config.adaptive)
