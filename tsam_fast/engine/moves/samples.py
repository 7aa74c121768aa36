"""Every sample's gradient into the tilted sum (docs/design.md §2): the move after a ``"sample"``
evaluation of the full algorithm -- all the ``random`` sampler does, and the last move of each ascent or HMC
sample. The tilt update is fused with the next sample's random start; the last one leaves the tilted
gradient in ``.grad`` and the parameters at theta0."""

from __future__ import annotations

import torch

__all__ = ["after_sample", "CLIP_EPS", "clip_factor"]

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def clip_factor(step, sqnorm: torch.Tensor) -> torch.Tensor:
    """min(1, max_grad_norm / ||g||): this sample's gradient clipped to the global norm."""
    norm = step.guard.clip_norm(sqnorm)
    return step.num.clamp_max(step.config.max_grad_norm / (norm + CLIP_EPS), 1.0)


def after_sample(step, ev, loss: torch.Tensor) -> None:
    cfg = step.config
    j = ev.sample
    last = j + 1 == cfg.num_samples
    # the step's collectives for this sample, packed: the loss, the clip norm, the next start's norm
    named = {"clip": step.grad_parts()} if cfg.max_grad_norm is not None else {}
    seed, noise = (None, None) if last else step.noise(j + 1)
    if noise is not None:
        named["noise"] = noise
    loss, totals = step.reduce(named, loss)
    step.losses.append(loss)
    clip = clip_factor(step, totals["clip"]) if cfg.max_grad_norm is not None else None
    weights = step.tilt.update(loss, clip)
    first = j == 0
    if not last:
        coefs = step.coefs(j + 1, totals.get("noise"))
        for t in step.targets:
            a, b = weights[step.taus[t.group]]
            t.backend.tilt_accumulate(t.bucket, step.to_bucket(a, t.bucket), step.to_bucket(b, t.bucket), first, seed,
                                      step.per_group(coefs, t), base=t.bucket.anchor)
        return
    inv_z = step.tilt.inverse_normalizers()
    for t in step.targets:
        tau = step.taus[t.group]
        a, b = weights[tau]
        t.backend.finalize(t.bucket, step.to_bucket(a, t.bucket), step.to_bucket(b, t.bucket), step.to_bucket(inv_z[tau], t.bucket), first)
    step.guard.after_samples(clipped=cfg.max_grad_norm is not None)
