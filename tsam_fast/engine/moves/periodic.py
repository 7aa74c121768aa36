"""The periodic tilt, ``tilt_every = k`` (docs/design.md §9): the full step every k-th step caches the
tilted gradient's part orthogonal to the plain gradient; the steps between evaluate theta0 once and add it.

A full step keeps g0 (in the bucket's ``cache``) and ||g0||^2 at its origin evaluation; when its
evaluations are done, ``cache_correction`` turns the cache into v = G - (G.g0 / ||g0||^2) g0, valid for
the next steps once the step finishes (``Session.correction``). A step between: g <- g + (||g|| / ||g0||) v.
"""

from __future__ import annotations

import torch

__all__ = ["keep_g0", "cache_correction", "after_reusing_correction"]


def keep_g0(step, g0_sqnorm: torch.Tensor) -> None:
    step.g0_sqnorm = g0_sqnorm
    for t in step.targets:
        t.bucket.cache.copy_(t.bucket.grad)


def cache_correction(step) -> None:
    """At the end of a full step's evaluations: v and ||g0||^2 (cached once the step finishes)."""
    dots = [_dot(t.bucket.grad, t.bucket.cache) for t in step.targets]
    alpha = step.reduce({"dot": dots})[1]["dot"] / step.num.clamp_min(step.g0_sqnorm, 1e-30)
    for t in step.targets:
        t.bucket.cache.mul_(-step.to_bucket(alpha, t.bucket)).add_(t.bucket.grad)
    step.correction = step.g0_sqnorm


def after_reusing_correction(step, ev, loss: torch.Tensor) -> None:
    """A step between full ones: g <- g + (||g|| / ||g0||) v, with v and g0 of the last full step."""
    loss, totals = step.reduce({"grad": step.grad_parts()}, loss)
    step.losses.append(loss)
    scale = step.num.sqrt(totals["grad"] / step.num.clamp_min(step.session.correction, 1e-30))
    for t in step.targets:
        t.bucket.grad.addcmul_(t.bucket.cache, step.to_bucket(scale, t.bucket))
    step.guard.after_samples(clipped=False)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) with an fp32 (float64) accumulator."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.dot(a, b)
    return torch.dot(a.float(), b.float())
