"""The reference ops: the op contract in plain PyTorch ops, the oracle of every backend.

``ReferenceOps`` is the oracle of every other backend. Written for clarity and exactness, not speed:
arithmetic in fp32 (float64 for float64 buffers), norms accumulated in fp64, results rounded once to the
buffer's dtype, noise from ``tsam_fast.rng`` (fp32 normals whatever the buffer dtype). The formulas are
those of docs/design.md §7. What ``backend="reference"`` actually runs is the chunked fast path built on
these ops, ``reference_fast.FastReferenceOps`` (its noise generator in ``noise``).
"""

from __future__ import annotations

import torch

from .. import rng
from .contract import run_triples

_F32 = torch.float32


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 buffers (the fused backends' contract); float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else _F32


def _noise(runs, seed, n, device):
    """The bucket's noise as one fp32 buffer of ``n`` elements (generated, never cached); 0 outside the runs."""
    xi = torch.zeros(n, dtype=_F32, device=device)
    for buf_off, glob_off, length in run_triples(runs):
        rng.normal(seed, glob_off, length, out=xi[buf_off:buf_off + length])
    return xi


def _gather(theta) -> torch.Tensor:
    """The flat space of a ``theta`` list as one new tensor (the oracle computes on it, then scatters)."""
    return torch.cat([t.reshape(-1) for t in theta]) if len(theta) else torch.empty(0)


def _scatter(theta, flat: torch.Tensor) -> None:
    """``theta`` (the list) <- ``flat``, tensor by tensor; nothing outside the tensors is written."""
    offset = 0
    for t in theta:
        t.copy_(flat[offset:offset + t.numel()])
        offset += t.numel()


class ReferenceOps:
    """The ops of the contract over plain tensors, with the schemas' arguments (``contract.OPS``; ``runs``
    are flat triples, ``theta`` a list of tensors). See ``Backend`` for how the step engine calls them.
    Each op computes on the flat space of ``theta`` gathered into one tensor and writes it back: the
    plainest statement of the formula, whatever the list."""

    @staticmethod
    def noise_sqnorm(runs, seed, device):
        """``sum(xi**2)`` over the runs, accumulated and returned in fp64 on ``device`` (the fused backends
        return it rounded to fp32; the engine rounds it to its scalar dtype, so float64 steps keep it)."""
        total = torch.zeros((), dtype=torch.float64, device=device)
        for _, glob_off, length in run_triples(runs):
            total += rng.normal(seed, glob_off, length, device=device).double().square().sum()
        return total

    @staticmethod
    def sqnorm(x, scale=None):
        """``sum((scale * x)**2)`` over the flat space of the list ``x`` (``scale`` may be None),
        accumulated in fp64: a 0-dim fp32 tensor (float64 for a float64 ``x``)."""
        y = _gather(x).double()
        if scale is not None:
            y = y * scale.double()
        return y.square().sum().to(_compute_dtype(x[0]))

    @staticmethod
    def _perturbed(theta0, runs, seed, coef):
        if seed is None:
            return theta0
        xi = _noise(runs, seed, theta0.numel(), theta0.device)
        ct = _compute_dtype(theta0)
        return theta0.to(ct) + coef.to(ct) * xi.to(ct)

    @staticmethod
    def perturb(theta, theta0, runs, seed, coef, save_backup):
        """``theta0 <- theta`` if ``save_backup``; then ``theta <- theta0 + coef * xi`` (``theta0`` if no seed)."""
        if save_backup:
            theta0.copy_(_gather(theta))
        _scatter(theta, ReferenceOps._perturbed(theta0, runs, seed, coef))

    @staticmethod
    def fill_noise(out, runs, seed, coef):
        """``out <- coef * xi`` (``out``: fp32, float64 for float64 buckets)."""
        out.copy_(coef.to(out.dtype) * _noise(runs, seed, out.numel(), out.device).to(out.dtype))

    @staticmethod
    def leapfrog(theta, grad, kick, drift, momentum=None, precond=None):
        """With ``momentum``: ``v <- v + kick*g; theta <- theta + drift*v``. Without: ``theta <- theta +
        drift*kick*P*g`` with ``P = precond**2`` (or 1)."""
        flat = _gather(theta)
        ct = _compute_dtype(flat)
        g = grad.to(ct)
        if momentum is None:
            step = kick.to(ct) * g
            if precond is not None:
                step = step * precond.to(ct).square()
        else:
            momentum.add_(kick.to(momentum.dtype) * g.to(momentum.dtype))
            step = momentum.to(ct)
        _scatter(theta, flat.to(ct) + drift.to(ct) * step)

    @staticmethod
    def _accumulated(acc, grad, a, b, first):
        ct = acc.dtype  # fp32, or float64 for float64 buckets
        update = b.to(ct) * grad.to(ct)
        return update if first else a.to(ct) * acc + update

    @staticmethod
    def tilt_accumulate(acc, grad, a, b, first, theta, theta0, runs, seed, coef):
        """``A <- a*A + b*g`` (``b*g`` when ``first``; A not read), then ``theta <- theta0 + coef*xi``."""
        acc.copy_(ReferenceOps._accumulated(acc, grad, a, b, first))
        ReferenceOps.perturb(theta, theta0, runs, seed, coef, save_backup=False)

    @staticmethod
    def finalize(acc, grad, a, b, inv_z, first, theta, theta0):
        """``grad <- (a*A + b*g) * inv_z`` (A not read when ``first``) and ``theta <- theta0``."""
        grad.copy_(ReferenceOps._accumulated(acc, grad, a, b, first) * inv_z.to(acc.dtype))
        _scatter(theta, theta0)


#: every floating dtype: the reference runs float64 buckets too (in float64 math)
REFERENCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


__all__ = ["ReferenceOps", "REFERENCE_DTYPES"]
