"""The op contract: the fused operations a tsam_fast backend implements.

The optimizer (``tsam_fast.optimizer``) decides *what* happens in a TSAM step; a backend only knows
*how* to run these ops over the flat buffers of one (param group, device, dtype) bucket. Every op
is one pass over the bucket's ``d`` elements, so a backend launches one kernel per op.

Conventions shared by all ops:

* ``theta``, ``theta0`` (the backup of the step's starting point) and ``grad`` are 1-D contiguous
  buffers in the parameter dtype (fp32, bf16 or fp16). ``acc`` (the tilt accumulator ``A``) and
  ``momentum`` (HMC's ``v``) are fp32. All arithmetic is fp32; each result is rounded once to the
  dtype of the buffer it is stored in.
* Every scalar argument (``coef``, ``kick``, ``a``, ``b``, ``inv_z``) is a 0-dim fp32 tensor on the
  buffer's device: it is usually the result of a device reduction, and reading it on the host would
  stall a GPU. Reductions return 0-dim fp32 tensors on the buffer's device.
* ``runs`` maps buffer positions to the global element index of the noise (spec section 4): a tuple
  of ``(buffer_offset, global_offset, length)``; element ``buffer_offset + k`` of the bucket is global
  element ``global_offset + k``. ``seed`` is a 63-bit int (``rng.stream_seed``); ``seed=None`` means
  "no noise" (the ``start="none"`` case), and the op must then not spend time on the generator.
* ``xi`` below is the stream's standard normal noise (``rng.normal``), regenerated where needed and
  never stored by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

Runs = Sequence[Tuple[int, int, int]]


class Backend:
    """Base class of the backends: documents each op; subclasses implement all of them."""

    #: registry name, e.g. "reference"
    name: str = ""

    def held_bytes(self) -> int:
        """Bytes of buffers the backend itself keeps between ops (e.g. cached noise); 0 by default."""
        return 0

    def noise_sqnorm(self, runs: Runs, seed: int, device: torch.device) -> torch.Tensor:
        """``sum(xi**2)`` over the bucket's elements (generator only, no memory traffic)."""
        raise NotImplementedError

    def sqnorm(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum((scale * x)**2)`` in fp32 or better; ``scale`` (same dtype as ``x``) may be None."""
        raise NotImplementedError

    def perturb(self, theta, theta0, runs: Runs, seed: Optional[int], coef, save_backup: bool) -> None:
        """Random start. If ``save_backup``: ``theta0 <- theta`` first. Then ``theta <- theta0 + coef * xi``."""
        raise NotImplementedError

    def fill_noise(self, out, runs: Runs, seed: int, coef) -> None:
        """``out <- coef * xi`` (HMC's momentum draw; ``out`` is fp32)."""
        raise NotImplementedError

    def leapfrog(self, theta, grad, kick, drift, momentum=None, precond=None) -> None:
        """One leapfrog position step. With ``momentum`` (HMC): ``v <- v + kick*g; theta <- theta + drift*v``.

        Without (the ``ascent`` sampler: zero momentum): ``theta <- theta + drift * kick * P * g`` with
        ``P = precond**2`` element-wise (ASAM's ``|theta0|**2``) or 1 when ``precond`` is None.
        """
        raise NotImplementedError

    def tilt_accumulate(self, acc, grad, a, b, first: bool, theta, theta0, runs: Runs,
                        seed: Optional[int], coef) -> None:
        """Online tilt update fused with the next sample's random start.

        ``A <- a*A + b*g`` (``A <- b*g`` when ``first``; ``A`` is not read then), and
        ``theta <- theta0 + coef * xi``.
        """
        raise NotImplementedError

    def finalize(self, acc, grad, a, b, inv_z, first: bool, theta, theta0) -> None:
        """Last tilt update fused with the end of the step.

        ``grad <- (a*A + b*g) * inv_z`` (``A`` not read when ``first``) and ``theta <- theta0``.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here: ``available``, on which device types, and why (not)."""

    name: str
    available: bool
    devices: Tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        where = ", ".join(self.devices) or "-"
        return f"{self.name:<10} {state:<12} devices: {where:<12} {self.reason}"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""
