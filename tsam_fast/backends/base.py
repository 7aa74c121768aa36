"""The backend as the step engine sees it: ``Backend``, the op contract applied to a bucket.

The optimizer (``tsam_fast.optimizer``) decides *what* happens in a TSAM step; a backend only knows
*how* to run the contract's ops over the flat buffers of one (param group, device, dtype) bucket. Every
op is one pass over the bucket's ``d`` elements, so a backend launches one kernel per op.

The ops themselves -- names, schemas, formulas, which buffers they write, sample inputs -- are declared
once in ``contract.py`` (docs/design.md §7). A ``Backend`` wraps one implementation of them (``ops``:
``ReferenceOps``, ``CppOps`` over ``torch.ops.tsam_fast``, ``TritonOps`` over the Triton launchers) and
maps each step-level move onto them: the bucket's buffers (``param`` = theta, ``backup`` = theta0,
``grad``, ``acc`` = A, ``momentum`` = v), its noise runs (a tuple of ``(buffer_offset, global_offset,
length)`` triples, passed to the ops as flat ``int[] runs``) and the op's scalars (0-dim fp32 device
tensors). ``seed=None`` means no noise (``start="none"``). Every move that writes ``param`` ends with
``bucket.publish()``: a no-op, except for a packed bucket of FSDP2 shards, whose moved values are then
copied out to the shards FSDP all-gathers from (``tsam_fast.bucket.Bucket``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .contract import flat_runs

Runs = Sequence[Tuple[int, int, int]]

#: the storage dtypes of the fused backends (their math is fp32)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Backend:
    """One implementation of the op contract, as the step engine uses it: each method takes a bucket
    (``tsam_fast.bucket.Bucket``: ``param``, ``grad``, ``backup`` (theta0), ``acc``, ``momentum``, ``runs``,
    ``device``, ``dtype``) and the few scalars of the op, and runs the op over the bucket's buffers.

    ``ops`` is the contract itself over plain tensors (one callable per op of ``contract.OPS``, taking
    the schema's arguments): the reference functions, ``torch.ops.tsam_fast`` (C++), or the Triton
    launchers. The op-level tests and benchmarks call ``backend.ops`` directly.
    """

    def __init__(self, name: str, ops, dtypes: Tuple[torch.dtype, ...] = FUSED_DTYPES):
        self.name = name
        self.ops = ops
        #: the parameter dtypes this backend runs
        self.dtypes = dtypes

    def held_bytes(self, buckets=None) -> int:
        """Bytes of buffers the backend itself keeps between ops (for ``buckets`` when given); 0 unless the
        backend says otherwise."""
        return 0

    def noise_sqnorm(self, bucket, seed: int) -> torch.Tensor:
        """``sum(xi**2)`` over the bucket (generator only)."""
        return self.ops.noise_sqnorm(flat_runs(bucket.noise_runs), seed, bucket.device)

    def param_sqnorm(self, bucket) -> torch.Tensor:
        """``sum(theta**2)`` (theta0, at the start of a step)."""
        return self.ops.sqnorm(bucket.theta, None)

    def grad_sqnorm(self, bucket, adaptive: bool = False) -> torch.Tensor:
        """``sum((T g)**2)``, T = |theta0| when ``adaptive`` else 1."""
        return self.ops.sqnorm(bucket.grads, bucket.backup if adaptive else None)

    def perturb(self, bucket, seed: Optional[int], coef: torch.Tensor, save_backup: bool = False,
                base: Optional[torch.Tensor] = None) -> None:
        """The random start ``theta <- theta0 + coef * xi`` (``theta0 <- theta`` first if ``save_backup``);
        around ``base`` instead of theta0 when given (``shared_ascent``'s ascended point)."""
        self.ops.perturb(bucket.theta, bucket.backup if base is None else base, flat_runs(bucket.runs), seed, coef,
                         save_backup)
        bucket.publish()

    def draw_momentum(self, bucket, seed: int, sigma: torch.Tensor) -> None:
        """HMC's ``v <- sigma * xi``."""
        self.ops.fill_noise(bucket.momentum, flat_runs(bucket.noise_runs), seed, sigma)

    def ascend(self, bucket, kick: torch.Tensor, one: torch.Tensor, adaptive: bool) -> None:
        """``theta <- theta + kick * P g`` (P = theta0**2 when ``adaptive``): the ascent sampler's move."""
        self.ops.leapfrog(bucket.theta, bucket.grad, kick, one, None, bucket.backup if adaptive else None)
        bucket.publish()

    def leapfrog(self, bucket, kick: torch.Tensor, drift: torch.Tensor) -> None:
        """HMC's ``v <- v + kick * g; theta <- theta + drift * v``."""
        self.ops.leapfrog(bucket.theta, bucket.grad, kick, drift, bucket.momentum, None)
        bucket.publish()

    def tilt_accumulate(self, bucket, a, b, first: bool, seed: Optional[int], coef,
                        base: Optional[torch.Tensor] = None) -> None:
        """``A <- a A + b g`` (``b g`` when ``first``) fused with the next start ``theta <- theta0 + coef xi``
        (around ``base`` when given)."""
        self.ops.tilt_accumulate(bucket.acc, bucket.grad, a, b, first, bucket.theta,
                                 bucket.backup if base is None else base, flat_runs(bucket.runs), seed, coef)
        bucket.publish()

    def finalize(self, bucket, a, b, inv_z, first: bool) -> None:
        """``grad <- (a A + b g) * inv_z`` and ``theta <- theta0``: the end of a step."""
        self.ops.finalize(bucket.acc, bucket.grad, a, b, inv_z, first, bucket.theta, bucket.backup)
        bucket.publish()


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
