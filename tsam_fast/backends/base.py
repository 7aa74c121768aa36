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

#: the storage dtypes of the fused backends (their math is fp32)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Backend:
    """One implementation of the op contract, as the step engine uses it: each method takes a bucket
    (``tsam_fast.flat.Bucket``: ``param``, ``grad``, ``backup`` (theta0), ``acc``, ``momentum``, ``runs``,
    ``device``, ``dtype``) and the few scalars of the op, and runs the op over the bucket's buffers.

    ``ops`` is the contract itself over plain tensors (one callable per op, with the signatures of
    ``ReferenceOps``): the reference functions, ``torch.ops.tsam_fast`` (C++), or the Triton launchers.
    The op-level tests and benchmarks call ``backend.ops`` directly.
    """

    def __init__(self, name: str, ops, dtypes: Tuple[torch.dtype, ...] = FUSED_DTYPES):
        self.name = name
        self.ops = ops
        #: the parameter dtypes this backend runs
        self.dtypes = dtypes

    def held_bytes(self) -> int:
        """Bytes of buffers the backend itself keeps between ops; 0 unless the ops say otherwise."""
        return getattr(self.ops, "held_bytes", lambda: 0)()

    def noise_sqnorm(self, bucket, seed: int) -> torch.Tensor:
        """``sum(xi**2)`` over the bucket (generator only)."""
        return self.ops.noise_sqnorm(bucket.runs, seed, bucket.device)

    def grad_sqnorm(self, bucket, adaptive: bool = False) -> torch.Tensor:
        """``sum((T g)**2)``, T = |theta0| when ``adaptive`` else 1."""
        return self.ops.sqnorm(bucket.grad, bucket.backup if adaptive else None)

    def perturb(self, bucket, seed: Optional[int], coef: torch.Tensor, save_backup: bool = False) -> None:
        """The random start ``theta <- theta0 + coef * xi`` (``theta0 <- theta`` first if ``save_backup``)."""
        self.ops.perturb(bucket.param, bucket.backup, bucket.runs, seed, coef, save_backup)

    def draw_momentum(self, bucket, seed: int, sigma: torch.Tensor) -> None:
        """HMC's ``v <- sigma * xi``."""
        self.ops.fill_noise(bucket.momentum, bucket.runs, seed, sigma)

    def ascend(self, bucket, kick: torch.Tensor, one: torch.Tensor, adaptive: bool) -> None:
        """``theta <- theta + kick * P g`` (P = theta0**2 when ``adaptive``): the ascent sampler's move."""
        self.ops.leapfrog(bucket.param, bucket.grad, kick, one, None, bucket.backup if adaptive else None)

    def leapfrog(self, bucket, kick: torch.Tensor, drift: torch.Tensor) -> None:
        """HMC's ``v <- v + kick * g; theta <- theta + drift * v``."""
        self.ops.leapfrog(bucket.param, bucket.grad, kick, drift, bucket.momentum, None)

    def tilt_accumulate(self, bucket, a, b, first: bool, seed: Optional[int], coef) -> None:
        """``A <- a A + b g`` (``b g`` when ``first``) fused with the next start ``theta <- theta0 + coef xi``."""
        self.ops.tilt_accumulate(bucket.acc, bucket.grad, a, b, first, bucket.param, bucket.backup,
                                 bucket.runs, seed, coef)

    def finalize(self, bucket, a, b, inv_z, first: bool) -> None:
        """``grad <- (a A + b g) * inv_z`` and ``theta <- theta0``: the end of a step."""
        self.ops.finalize(bucket.acc, bucket.grad, a, b, inv_z, first, bucket.param, bucket.backup)


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
