"""The tilt-sampled backward, ``backward_samples = K`` (docs/design.md §9): the s samples are scored by
forward passes only (role ``"score"``), then K of them, drawn from the tilt weights, are backpropagated
(role ``"sample"``) and their gradients averaged into the tilted gradient's estimate."""

from __future__ import annotations

from typing import List

import torch

from ... import rng
from ..plan import Evaluation
from ..tilt import shifted
from .samples import clip_factor

__all__ = ["after_score", "after_backprop"]


def after_score(step, ev, loss: torch.Tensor) -> None:
    """A forward-only evaluation scored sample j: average its loss over the ranks (with the next start's
    norm, one collective) and move to the next start; after the last, draw the samples to backpropagate."""
    j = ev.sample
    last = j + 1 == step.config.num_samples
    step.layout.reshard()  # FSDP2's root stays unsharded after a forward without backward
    seed, noise = (None, None) if last else step.noise(j + 1)
    loss, totals = step.reduce({"noise": noise} if noise is not None else {}, loss)
    step.losses.append(loss)
    if not last:
        step.move_to(j + 1, seed, step.coefs(j + 1, totals.get("noise")))
        return
    _draw(step)


def _draw(step) -> None:
    """K samples to backpropagate: drawn from w = softmax(tau L) with replacement (``sample``: each then
    weighs 1/K, so the expected gradient is the tilted one), or the K of largest weight (``top``:
    weighted w_i / their sum; biased towards the worst samples, like a larger tilt). One host read: the
    weights (the drawn indices pick the seeds of the starts to regenerate). The drawn samples are written
    into the step's plan, where they were -1."""
    cfg = step.config
    if len(set(step.taus)) > 1:
        raise ValueError("backward_samples draws one set of samples for all parameters, so every param group "
                         f"must use the same tilt (got {sorted(set(step.taus))} after delta)")
    losses = torch.tensor(step.losses, dtype=step.dtype) if step.num.host else torch.stack(step.losses)
    w = torch.softmax(shifted(losses, step.taus[0]), dim=0)
    host = w.double().tolist()  # the option's one host read per step (tests/test_no_host_sync.py pins it)
    k_draws = cfg.backward_samples
    if cfg.backward_select == "top":
        drawn = sorted(range(len(host)), key=lambda i: -host[i])[:k_draws]
        top = w[drawn]
        weights = [step.num.value(x) for x in top / top.sum()]
    else:
        drawn = [_inverse_cdf(host, rng.host_uniform(rng.stream_seed(step.seed, step.k, d, rng.STREAM_SELECT)))
                 for d in range(k_draws)]
        weights = [step.scalar(1.0 / k_draws)] * k_draws
    first = len(step.plan) - k_draws
    for d, j in enumerate(drawn):
        step.plan[first + d] = Evaluation(first + d, j, "sample")
    step.drawn, step.draw_weights = drawn, weights
    step.move_to(drawn[0], *step.starts[drawn[0]])


def after_backprop(step, ev, loss: torch.Tensor) -> None:
    """The d-th drawn sample's gradient, weighted, into A; then the next drawn start, or the end."""
    cfg = step.config
    d = ev.index - (len(step.plan) - cfg.backward_samples)
    clip = clip_factor(step, step.grad_sqnorm()) if cfg.max_grad_norm is not None else None
    b = step.draw_weights[d] if clip is None else step.draw_weights[d] * clip
    one, first = step.scalar(1.0), d == 0
    if d + 1 < cfg.backward_samples:
        seed, coefs = step.starts[step.drawn[d + 1]]
        for t in step.targets:
            t.backend.tilt_accumulate(t.bucket, step.to_bucket(one, t.bucket), step.to_bucket(b, t.bucket), first, seed,
                                      step.per_group(coefs, t), base=t.bucket.anchor)
        return
    for t in step.targets:
        t.backend.finalize(t.bucket, step.to_bucket(one, t.bucket), step.to_bucket(b, t.bucket), step.to_bucket(one, t.bucket), first)
    step.guard.after_samples(clipped=clip is not None)


def _inverse_cdf(weights: List[float], u: float) -> int:
    """The index i with cumsum(w)[i-1] <= u < cumsum(w)[i] (the last index if rounding leaves u beyond)."""
    total = 0.0
    for i, w in enumerate(weights):
        total += w
        if u < total:
            return i
    return len(weights) - 1
