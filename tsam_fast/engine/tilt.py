"""The tilt's math, on device tensors (docs/design.md §2, §8.4): the online log-sum-exp of the weights, the
shifted exponents, the tilted loss. Pure: nothing here knows of buckets, ranks or the optimizer."""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional

import torch

__all__ = ["TiltState", "TiltReport", "shifted", "tilted_loss"]


class TiltState:
    """Online log-sum-exp of the tilt, per distinct weight temperature tau = t - delta.

    Kept in loss units so that no exponent overflows for finite losses: r is the loss at which tau L is
    largest so far (the max loss for tau >= 0, the min for tau < 0); r' = that after loss L;
    a = exp(tau (r - r')), e = exp(tau (L - r')) (both exponents <= 0); Z <- a Z + e; the accumulator
    update is A <- a A + e c g (c: the optional clip factor). The state is the step's kind of number: on
    the device, or host floats on a CPU step.
    """

    def __init__(self, taus: List[float], num):
        self.taus, self.num = taus, num  # per param group; the step's kind of number (engine.numbers)
        self.distinct = sorted(set(taus))
        self.ref: Dict[float, torch.Tensor] = {}
        self.z: Dict[float, torch.Tensor] = {}

    def update(self, loss: torch.Tensor, clip: Optional[torch.Tensor]):
        """Fold in one sample's loss; returns {tau: (a, b)} of ``A <- a A + b g`` (a unused at the first)."""
        out, num = {}, self.num
        for tau in self.distinct:
            if tau not in self.ref:  # first sample: A is overwritten, a is unused
                self.ref[tau], self.z[tau] = loss, num.one_like(loss)
                a = e = self.z[tau]
            elif tau == 0:  # plain average: every weight 1
                a = e = num.one_like(loss)
                self.z[tau] = self.z[tau] + 1
            else:
                ref = self.ref[tau]
                new = num.maximum(ref, loss) if tau > 0 else num.minimum(ref, loss)
                a, e = num.exp((ref - new) * tau), num.exp((loss - new) * tau)
                self.ref[tau], self.z[tau] = new, self.z[tau] * a + e
            out[tau] = (a, e if clip is None else e * clip)
        return out

    def inverse_normalizers(self) -> Dict[float, object]:
        return {tau: 1.0 / self.z[tau] for tau in self.distinct}


def _tilted_host(losses: List[float], tilt: float, num) -> float:
    """``tilted_loss`` of host floats, in float64 (the same formula: no overflow, no cancellation)."""
    if tilt == 0:
        return sum(losses) / len(losses)
    top = functools.reduce(num.maximum, losses)
    return top + math.log1p(sum(math.expm1((x - top) * tilt) for x in losses) / len(losses)) / tilt


def shifted(losses: torch.Tensor, tau: float) -> torch.Tensor:
    """tau * (L - r) with r the loss maximising tau * L: softmax-equivalent to tau * L, never overflowing."""
    if tau == 0:
        return torch.zeros_like(losses)
    return (losses - (losses.max() if tau > 0 else losses.min())) * tau


def tilted_loss(losses: torch.Tensor, tilt: float, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1/t) log mean_j exp(t L_j) (the mean at t = 0), shifted by the max loss: t L may overflow fp32 for
    finite L; log mean exp(x) as log1p(mean(expm1(x))) has no cancellation for small t (x near 0).
    ``shift``: ``shifted(losses, tilt)`` if already computed."""
    if tilt == 0:
        return losses.mean()
    x = shifted(losses, tilt) if shift is None else shift
    return losses.max() + torch.log1p(torch.expm1(x).mean()) / tilt


class TiltReport:
    """A finished step's tilt (docs/design.md §2): the tilted loss, and, computed when first read (a step
    that nobody inspects pays for none of it), the weights softmax(tau L), their effective sample size
    1/sum(w^2) (1 to s; near s with a small loss range: the tilt is inert) and the loss range."""

    def __init__(self, losses, tau: float, tilt: float, num=None, dtype: torch.dtype = torch.float32):
        self._tau = tau
        if num is not None and num.host:  # host floats: the tilted loss in float64, then one tensor each
            self.losses = torch.tensor(losses, dtype=dtype)
            self.tilted = torch.tensor(_tilted_host(losses, tilt, num), dtype=dtype)
            return
        self.losses = losses
        self._shift = shifted(losses, tau)
        self.tilted = tilted_loss(losses, tilt, self._shift if tau == tilt else None)

    @functools.cached_property
    def weights(self) -> torch.Tensor:
        shift = self.__dict__.get("_shift")
        return torch.softmax(shifted(self.losses, self._tau) if shift is None else shift, dim=0)

    @functools.cached_property
    def ess(self) -> torch.Tensor:
        return (self.weights * self.weights).sum().reciprocal()

    @functools.cached_property
    def loss_range(self) -> torch.Tensor:
        return self.losses.max() - self.losses.min()
