"""The periodic tilt, ``tilt_every = k`` (docs/design.md §9): the full step every k-th step caches how its
tilted gradient departs from the plain gradient; the steps between evaluate theta0 once and apply it.

A full step keeps g0 (in the bucket's ``cache``) and ||g0||^2 at its origin evaluation; when its
evaluations are done, ``cache_correction`` splits the tilted gradient G along g0, G = beta g0 + v with
beta = G.g0 / ||g0||^2 and v orthogonal to g0, and turns the cache into v / ||g0||, valid for the next
steps once the step finishes (``Session.correction`` holds beta). A step between:
g <- beta g + ||g|| (v / ||g0||), which is G itself when g is g0.
"""

from __future__ import annotations

import torch

__all__ = ["keep_g0", "cache_correction", "after_reusing_correction"]


def keep_g0(step, g0_sqnorm: torch.Tensor) -> None:
    step.g0_sqnorm = g0_sqnorm
    for t in step.targets:
        t.bucket.cache.copy_(t.bucket.grad)


def cache_correction(step) -> None:
    """At the end of a full step's evaluations: beta and v / ||g0|| (cached once the step finishes)."""
    dots = [_dot(t.bucket.grad, t.bucket.cache) for t in step.targets]
    inv = step.num.reciprocal(step.num.sqrt(step.num.clamp_min(step.g0_sqnorm, 1e-30)))  # 1 / ||g0||
    beta = step.reduce({"dot": dots})[1]["dot"] * inv * inv
    for t in step.targets:  # (G - beta g0) / ||g0||
        t.bucket.cache.mul_(-step.to_bucket(beta * inv, t.bucket)).addcmul_(t.bucket.grad, step.to_bucket(inv, t.bucket))
    step.correction = beta


def after_reusing_correction(step, ev, loss: torch.Tensor) -> None:
    """A step between full ones: g <- beta g + ||g|| (v / ||g0||), with beta, v and g0 of the last full step."""
    loss, totals = step.reduce({"grad": step.grad_parts()}, loss)
    step.losses.append(loss)
    norm, beta = step.num.sqrt(totals["grad"]), step.session.correction
    for t in step.targets:
        t.bucket.grad.mul_(step.to_bucket(beta, t.bucket)).addcmul_(t.bucket.cache, step.to_bucket(norm, t.bucket))
    step.guard.after_samples(clipped=False)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) with an fp32 (float64) accumulator."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.dot(a, b)
    return torch.dot(a.float(), b.float())
