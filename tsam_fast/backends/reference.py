"""The reference backend: the op contract in plain PyTorch ops. It is the oracle of every other backend.

Written for clarity and exactness, not speed: all arithmetic in fp32 (norms accumulated in fp64),
results rounded once to the buffer's dtype, noise from ``tsam_fast.rng``. It runs on any device
PyTorch supports and is the fallback when no fused backend is available.
"""

from __future__ import annotations

import torch

from .. import rng
from .base import Backend

_F32 = torch.float32


def _noise(runs, seed, n, device):
    """The bucket's noise as one fp32 buffer of ``n`` elements (generated, never cached); 0 outside the runs."""
    xi = torch.zeros(n, dtype=_F32, device=device)
    for buf_off, glob_off, length in runs:
        rng.normal(seed, glob_off, length, out=xi[buf_off:buf_off + length])
    return xi


class ReferenceBackend(Backend):
    name = "reference"

    def noise_sqnorm(self, runs, seed, device):
        total = torch.zeros((), dtype=torch.float64, device=device)
        for _, glob_off, length in runs:
            total += rng.normal(seed, glob_off, length, device=device).double().square().sum()
        return total.to(_F32)

    def sqnorm(self, x, scale=None):
        y = x.double()
        if scale is not None:
            y = y * scale.double()
        return y.square().sum().to(_F32)

    def perturb(self, theta, theta0, runs, seed, coef, save_backup):
        if save_backup:
            theta0.copy_(theta)
        if seed is None:
            theta.copy_(theta0)
            return
        xi = _noise(runs, seed, theta.numel(), theta.device)
        theta.copy_(theta0.to(_F32) + coef * xi)

    def fill_noise(self, out, runs, seed, coef):
        out.copy_(coef * _noise(runs, seed, out.numel(), out.device))

    def leapfrog(self, theta, grad, kick, drift, momentum=None, precond=None):
        g = grad.to(_F32)
        if momentum is None:
            step = kick * g
            if precond is not None:
                step = step * precond.to(_F32).square()
        else:
            momentum.add_(kick * g)
            step = momentum
        theta.copy_(theta.to(_F32) + drift * step)

    def _accumulated(self, acc, grad, a, b, first):
        update = b * grad.to(_F32)
        return update if first else a * acc + update

    def tilt_accumulate(self, acc, grad, a, b, first, theta, theta0, runs, seed, coef):
        acc.copy_(self._accumulated(acc, grad, a, b, first))
        self.perturb(theta, theta0, runs, seed, coef, save_backup=False)

    def finalize(self, acc, grad, a, b, inv_z, first, theta, theta0):
        grad.copy_(self._accumulated(acc, grad, a, b, first) * inv_z)
        theta.copy_(theta0)
