"""``sampler="hmc"``: sample j's K leapfrog steps from its start (docs/design.md §3): v ~ N(0, sigma^2 I)
before the first kick; kick-drift steps with the half kicks of neighbours merged."""

from __future__ import annotations

import torch

from ... import rng

__all__ = ["after_leapfrog"]


def after_leapfrog(step, ev, loss: torch.Tensor) -> None:
    cfg = step.config
    if ev.substep == 0:
        mseed = rng.stream_seed(step.seed, step.k, ev.sample, rng.STREAM_MOMENTUM)
        sigma = step.scalar(cfg.hmc_sigma)
        for t in step.targets:
            t.backend.draw_momentum(t.bucket, mseed, step.to_bucket(sigma, t.bucket))
    kick = step.guard.leapfrog_kick(step.scalar(cfg.hmc_step_size * (0.5 if ev.substep == 0 else 1.0)))
    alpha = step.scalar(cfg.hmc_step_size)
    for t in step.targets:
        t.backend.leapfrog(t.bucket, step.to_bucket(kick, t.bucket), step.to_bucket(alpha, t.bucket))
    if ev.substep == cfg.hmc_steps - 1:
        step.guard.after_leapfrogs()
