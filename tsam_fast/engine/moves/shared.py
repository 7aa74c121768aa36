"""The evaluation at theta0 itself, role ``"origin"`` (docs/design.md §9): ``shared_ascent``'s one ascent
gradient, and the plain gradient g0 the periodic tilt splits its tilted gradient by.

Its gradient g0 is plain ERM's (``StepResult.origin_loss``, ``grad_norm``). With ``shared_ascent`` it gives
every sample's ascent step: the ascended point theta0 + rho g0/||T g0|| is the centre ("anchor") of all the
random starts, theta_j = anchor + c xi_j. With ``tilt_every > 1`` it is kept (``periodic.keep_g0``).
"""

from __future__ import annotations

import torch

from . import periodic
from .ascent import ascend

__all__ = ["after_origin"]


def after_origin(step, ev, loss: torch.Tensor) -> None:
    cfg = step.config
    seed, noise = step.noise(0)
    named = {"g0": step.grad_parts()}
    if cfg.shared_ascent and cfg.adaptive:
        named["ascent"] = step.grad_parts(True)
    if noise is not None:
        named["noise"] = noise
        if cfg.radius_mode == "relative":
            named["theta"] = [t.backend.param_sqnorm(t.bucket) for t in step.targets]
    got = step.reduce(named)[1]  # one collective for them all
    if "theta" in got:
        step.theta_norm = step.num.sqrt(got["theta"])
    step.origin_loss, step.grad_norm = loss, step.num.sqrt(got["g0"])  # g0 comes for free: ERM's
    if cfg.tilt_every > 1:
        periodic.keep_g0(step, got["g0"])
    if cfg.shared_ascent:
        ascend(step, step.guard.ascent_step(got.get("ascent", got["g0"])))
        for t in step.targets:
            t.bucket.gather(t.bucket.anchor)
    step.move_to(0, seed, step.coefs(0, got.get("noise")))
