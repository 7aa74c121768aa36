"""The tilt's math, on device tensors (docs/design.md §2, §8.4): the online log-sum-exp of the weights, the
shifted exponents, the tilted loss. Pure: nothing here knows of buckets, ranks or the optimizer."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

__all__ = ["TiltState", "shifted", "tilted_loss", "weights_summary"]


class TiltState:
    """Online log-sum-exp of the tilt, per distinct weight temperature tau = t - delta.

    Kept in loss units so that no exponent overflows for finite losses: r is the loss at which tau L is
    largest so far (the max loss for tau >= 0, the min for tau < 0); r' = that after loss L;
    a = exp(tau (r - r')), e = exp(tau (L - r')) (both exponents <= 0); Z <- a Z + e; the accumulator
    update is A <- a A + e c g (c: the optional clip factor). Everything stays on the device.
    """

    def __init__(self, taus: List[float]):
        self.taus = taus  # per param group
        self.distinct = sorted(set(taus))
        self.ref: Dict[float, torch.Tensor] = {}
        self.z: Dict[float, torch.Tensor] = {}

    def update(self, loss: torch.Tensor, clip: Optional[torch.Tensor]):
        """Fold in one sample's loss; returns {tau: (a, b)} of ``A <- a A + b g`` (a unused at the first)."""
        out = {}
        for tau in self.distinct:
            if tau not in self.ref:  # first sample: A is overwritten, a is unused
                self.ref[tau], self.z[tau] = loss, torch.ones_like(loss)
                a = e = self.z[tau]
            elif tau == 0:  # plain average: every weight 1
                a = e = torch.ones_like(loss)
                self.z[tau] = self.z[tau] + 1
            else:
                ref = self.ref[tau]
                new = torch.maximum(ref, loss) if tau > 0 else torch.minimum(ref, loss)
                a, e = torch.exp((ref - new) * tau), torch.exp((loss - new) * tau)
                self.ref[tau], self.z[tau] = new, self.z[tau] * a + e
            out[tau] = (a, e if clip is None else e * clip)
        return out

    def inverse_normalizers(self) -> Dict[float, torch.Tensor]:
        return {tau: 1.0 / self.z[tau] for tau in self.distinct}


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


def weights_summary(losses: torch.Tensor, tau: float, tilt: float) -> Dict[str, torch.Tensor]:
    """The step's tilt, as reported (docs/design.md §2): the weights softmax(tau L), their effective sample
    size 1/sum(w^2) (1 to s; near s with a small loss range: the tilt is inert), the loss range and the
    tilted loss."""
    shift = shifted(losses, tau)
    weights = torch.softmax(shift, dim=0)
    return dict(weights=weights, ess=(weights * weights).sum().reciprocal(), loss_range=losses.max() - losses.min(),
                tilted=tilted_loss(losses, tilt, shift if tau == tilt else None))
