"""The guard: the step's finiteness and mixed-precision policy, in one place (docs/design.md §8.5).

Off, ``check_finite`` (raise and undo at the end of the step; one host read), or a GradScaler (an overflowed
gradient makes the scaler skip the step; an overflowed ascent or leapfrog gradient never moves the
parameters). The moves call its hooks at fixed points and never branch on the policy themselves.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["Guard", "NonFiniteLossError", "NORM_EPS"]

# Added to norms before dividing, as in the widely used SAM implementations.
NORM_EPS = 1e-12


class NonFiniteLossError(RuntimeError):
    """A loss or gradient of the step was NaN or infinite; the step was undone (parameters back at theta0)."""


class Guard:
    def __init__(self, layout, device: torch.device, dtype: torch.dtype, check_finite: bool, scaler, group, num):
        self.layout, self.device, self.dtype, self.group, self.num = layout, device, dtype, group, num
        self.check = check_finite
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        # all finite so far: a device flag, or a bool where the step's numbers are host floats
        self.finite = (True if num.host else torch.ones((), dtype=torch.bool, device=device)) if check_finite else None
        self.overflow = torch.zeros((), dtype=torch.bool, device=device) if self.scaler is not None else None

    # what a gradient statistic's finiteness means: the scaler's skip, or a recorded error
    def _gradient(self, value: torch.Tensor) -> Optional[torch.Tensor]:
        if self.scaler is not None:
            ok = torch.isfinite(value)
            self.overflow |= ~ok
            return ok
        if self.check:
            self.finite &= self.num.isfinite(value)
        return None

    def _grad_sum(self, which: str) -> torch.Tensor:
        """One plain sum over every bucket's ``grad`` or ``momentum`` (a squared norm overflows sooner)."""
        parts = [getattr(b, which).sum(dtype=self.dtype) for b in self.layout.buckets]
        return self.num.value(parts[0] if len(parts) == 1 else torch.stack([p.to(self.device) for p in parts]).sum())

    def _sanitize(self) -> None:
        for b in self.layout.buckets:
            b.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def inv_scale(self) -> torch.Tensor:
        """1 / the GradScaler's current scale (set once the user has scaled a loss)."""
        scale = self.scaler._get_scale_async()
        if scale is None:
            raise RuntimeError("grad_scaler was given but the closure (or loop) never called scaler.scale(loss): "
                               "backpropagate scaler.scale(loss) and record (or return) the unscaled loss")
        return 1.0 / scale.to(self.device, self.dtype)

    def loss(self, loss) -> None:
        if self.check:
            self.finite &= self.num.isfinite(loss)

    def ascent_step(self, sqnorm: torch.Tensor) -> torch.Tensor:
        """1 / ||g|| of the ascent direction (scale-free: a GradScaler's factor cancels); 0 when the
        gradient overflowed under a scaler (the sample stays at its random start)."""
        ok = self._gradient(sqnorm)
        inv = self.num.reciprocal(self.num.sqrt(sqnorm) + NORM_EPS)
        if ok is not None:
            inv = torch.where(ok, inv, 0.0)
            self._sanitize()
        return inv

    def leapfrog_kick(self, kick: torch.Tensor) -> torch.Tensor:
        """The kick uses the gradient's magnitude: unscaled under a scaler, 0 if the gradient overflowed."""
        if self.scaler is None:
            return kick
        ok = self._gradient(self._grad_sum("grad"))
        kick = torch.where(ok, kick * self.inv_scale(), 0.0)
        self._sanitize()
        return kick

    def after_leapfrogs(self) -> None:
        """Every kick went into v: with check_finite, one sum of v checks them all."""
        if self.scaler is None and self.check:
            self._gradient(self._grad_sum("momentum"))

    def clip_norm(self, sqnorm: torch.Tensor) -> torch.Tensor:
        """The sample gradient's norm in unscaled units (its finiteness recorded)."""
        norm = self.num.sqrt(sqnorm)
        self._gradient(norm)
        return norm * self.inv_scale() if self.scaler is not None else norm

    def after_samples(self, clipped: bool) -> None:
        """NaN/inf in any sample's gradient reaches the weighted sum (0 * inf is NaN too): one sum of the
        final gradient catches it, unless clipping already measured every sample's gradient."""
        if self.check and self.scaler is None and not clipped:
            self._gradient(self._grad_sum("grad"))

    def failed(self, out_of_step: Optional[torch.Tensor] = None) -> Tuple[bool, bool]:
        """The step's one host read: (was any loss or gradient non-finite (check_finite only), did an
        all-reduce pair evaluations of different steps across the ranks (``out_of_step``, a device flag:
        multi-rank runs only)). On a sharded model each rank checked its own shard's gradients: one
        all-reduce makes the finiteness verdict every rank's."""
        if self.num.host:  # one process: no shard group, no tags
            return (self.check and not self.finite), False
        flags = []
        if self.check:
            bad = ~self.finite
            if self.layout.shard_group is not None:
                bad = bad.to(self.dtype)
                torch.distributed.all_reduce(bad, group=self.group)
                bad = bad > 0
            flags.append(bad)
        if out_of_step is not None:
            flags.append(out_of_step)
        if not flags:
            return False, False
        read = torch.stack(flags).tolist() if len(flags) > 1 else [bool(flags[0])]
        return (bool(read[0]) if self.check else False), (bool(read[-1]) if out_of_step is not None else False)

    def base_step(self, base_optimizer) -> None:
        if self.scaler is None:
            base_optimizer.step()
            return
        self._mark_overflow()
        self.scaler.step(base_optimizer)  # unscale_ once; skips the update on inf/NaN

    def _mark_overflow(self) -> None:
        """Make an overflow seen at an ascent/leapfrog gradient visible to the scaler's inf check: a NaN in
        one element of the final gradient when (and only when) it happened. No host read."""
        # a parameter the scaler will look at: one with a gradient this step (the others have grad None)
        p = next((p for p in self.layout.params if p.grad is not None and p.grad.numel()), None)
        if p is not None:
            flag = self.overflow.to(p.device, non_blocking=p.device.type != "cpu")
            p.grad[(0,) * p.grad.dim()].add_(torch.where(flag, float("nan"), 0.0).to(p.grad.dtype))
