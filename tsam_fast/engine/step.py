"""The step's working set and its random starts (docs/design.md §8.7).

``Step`` is what the moves (``tsam_fast.engine.moves``) read and write during one step: the buckets with
the backends that run them, the per-group scalars, the guard, the collectives, the tilt, the sample losses
and where each sample's start is. Its scalars stay on the step's device as 0-dim tensors. The random starts
-- the noise's norm, the start's coefficient per group, the move to a start -- are here too: every variant
begins its samples with them.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .. import rng
from .collectives import Collectives, loss_group
from .guard import Guard
from . import numbers
from .numbers import DeviceNumbers, HostNumbers
from .session import StepInputs
from .tilt import TiltState

__all__ = ["Target", "Step"]


class Target(NamedTuple):
    """Where a move's op runs: a bucket, the backend that runs its ops and the index of its group's scalars."""

    bucket: object
    backend: object
    group: int


class Step:
    def __init__(self, inputs: StepInputs, describe):
        cfg = self.config = inputs.config
        self.layout = inputs.layout
        self.buckets = self.layout.buckets
        self.device = self.buckets[0].device  # where the step's scalars live
        # their dtype: fp32, or float64 when a bucket is float64 (its step keeps float64 precision)
        self.dtype = torch.float64 if any(b.dtype == torch.float64 for b in self.buckets) else torch.float32
        self.k, self.seed = inputs.step, inputs.seed
        self.tilts, self.rhos, self.radii = inputs.tilts, inputs.rhos, inputs.radii
        self.taus = [t - cfg.delta for t in self.tilts]
        self.targets = [Target(b, inputs.backend_for(b.device, b.dtype), b.group_index) for b in self.buckets]
        self.group0 = self.buckets[0].group_index
        self.pg, self.world = loss_group(inputs.process_group)
        session = self.session = inputs.session
        # which step and evaluation each all-reduce of the losses belongs to (docs/design.md §6.1): this
        # run's number among the runs begun since construction or load_state_dict
        self.attempt = session.attempts
        session.attempts += 1
        # constant step scalars (1, 0, HMC sizes), kept across steps: never written to
        self.constants: Dict = session.constants.setdefault((self.device, self.dtype), {})
        # the scalars' kind (tsam_fast.engine.numbers): host floats where they are on the host already
        host = (numbers.HOST_ON_CPU and self.world == 1 and self.layout.shard_group is None and inputs.grad_scaler is None
                and all(b.device.type == "cpu" for b in self.buckets))
        self.num = HostNumbers if host else DeviceNumbers
        self._args: Dict = {}  # host floats: per scalar dtype, a ring of 0-dim tensors the ops read them from
        self.guard = Guard(self.layout, self.device, self.dtype, cfg.check_finite, inputs.grad_scaler, self.pg,
                           self.num)
        self.comms = Collectives(self.targets, self.device, self.dtype, self.pg, self.world, self.layout.shard_group,
                                 self.guard, cfg, self.seed, self.attempt, session, self.constants, describe)
        self.tilt = TiltState(self.taus, self.num)
        self.losses: List[torch.Tensor] = []
        self.position = -1  # the evaluation whose move is being made (its tag)
        self.theta_norm: Optional[torch.Tensor] = None  # ||theta0|| for radius_mode="relative"
        self.origin_loss: Optional[torch.Tensor] = None  # L(theta0) and ||g0||, when the plan evaluates theta0
        self.grad_norm: Optional[torch.Tensor] = None
        # the periodic tilt: a step between full ones evaluates theta0 once and adds the cached correction
        self.reuses_correction = cfg.tilt_every > 1 and session.correction is not None and self.k % cfg.tilt_every != 0
        if cfg.tilt_every > 1 and not self.reuses_correction:
            session.correction = None  # this full step rewrites the cache; valid again once it finishes
        self.g0_sqnorm: Optional[torch.Tensor] = None  # tilt_every: ||g0||^2 of this full step
        self.correction = None  # tilt_every: beta of this full step, kept once its evaluations are done
        self.plan = list(cfg.plan_at(self.k, self.reuses_correction))  # a tilt-sampled backward fills in its draws
        self.starts: Dict[int, Tuple[Optional[int], List[torch.Tensor]]] = {}  # j -> (seed, coefs) of its start

    # -- scalars ----------------------------------------------------------------------------------

    def scalar(self, x: float):
        """A constant of the step (1, 0, HMC sizes) as the step's kind of number."""
        if self.num.host:
            return x
        t = self.constants.get(x)
        if t is None:
            t = self.constants[x] = torch.full((), x, dtype=self.dtype, device=self.device)
        return t

    def to_bucket(self, value, bucket) -> torch.Tensor:
        """A step scalar as an op's argument for a bucket: a 0-dim tensor on its device, in its scalar dtype
        (fp32 unless the bucket is float64); a no-op in the usual case of one device and dtype. A host float
        is written into the next of four 0-dim CPU tensors: valid until four more arguments are made, more
        than any op takes (CPU ops run at once and keep none)."""
        dtype = torch.float64 if bucket.dtype == torch.float64 else torch.float32
        if self.num.host:
            ring = self._args.get(dtype)
            if ring is None:
                ring = self._args[dtype] = [0, [torch.zeros((), dtype=dtype) for _ in range(4)]]
            ring[0] = (ring[0] + 1) % 4
            return ring[1][ring[0]].fill_(value)
        if bucket.device == self.device and dtype == self.dtype:
            return value
        return value.to(bucket.device, dtype, non_blocking=bucket.device.type != "cpu")

    def as_tensor(self, value) -> torch.Tensor:
        """A step scalar for the user (a result, a diagnostic): a 0-dim tensor of the step's dtype."""
        return torch.tensor(value, dtype=self.dtype) if self.num.host else value

    def per_group(self, values: List[torch.Tensor], target: Target) -> torch.Tensor:
        return self.to_bucket(values[target.group], target.bucket)

    # -- reductions -------------------------------------------------------------------------------

    def reduce(self, named: Dict[str, List[torch.Tensor]], loss=None):
        """(loss averaged over the ranks, {name: global sum}): ``Collectives.reduce`` at this evaluation, the
        sums as the step's kind of number."""
        loss, totals = self.comms.reduce(named, loss, self.position)
        if self.num.host:
            totals = {name: self.num.value(total) for name, total in totals.items()}
        return loss, totals

    def grad_parts(self, adaptive: bool = False) -> List[torch.Tensor]:
        return [t.backend.grad_sqnorm(t.bucket, adaptive) for t in self.targets]

    def grad_sqnorm(self, adaptive: bool = False) -> torch.Tensor:
        return self.reduce({"grad": self.grad_parts(adaptive)})[1]["grad"]

    # -- the random starts (docs/design.md §3) ------------------------------------------------------

    def noise(self, j: int):
        """Seed and per-bucket partial ``sum(xi**2)`` of sample j's random start (None, None for no start)."""
        if self.config.start == "none":
            return None, None
        seed = rng.stream_seed(self.seed, self.k, j, rng.STREAM_START)
        return seed, [t.backend.noise_sqnorm(t.bucket, seed) for t in self.targets]

    def coefs(self, j: int, sqnorm: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """Per-group coefficient c of sample j's random start theta0 + c * xi, from the global ||xi||^2."""
        cfg = self.config
        if sqnorm is None:
            return [self.scalar(0.0)] * len(self.radii)
        num = self.num
        inv_norm = num.reciprocal(num.clamp_min(num.sqrt(sqnorm), 1e-30))
        if self.theta_norm is not None:  # radius_mode="relative": r ||theta0|| (docs/design.md §3)
            inv_norm = inv_norm * self.theta_norm
        if cfg.start == "ball":  # radius r * u^(1/d), u ~ U(0, 1) drawn on the host from its own stream
            u = rng.host_uniform(rng.stream_seed(self.seed, self.k, j, rng.STREAM_RADIUS))
            shrink = rng.log_uniform_radius(u, self.layout.trainable_numel)
        coefs: Dict[float, torch.Tensor] = {}
        out = []
        for r in self.radii:
            if r not in coefs:
                if cfg.start == "gaussian":  # noise_scale * xi, clipped to norm r
                    coefs[r] = num.clamp_max(inv_norm * r, cfg.noise_scale)
                elif cfg.start == "sphere":
                    coefs[r] = inv_norm * r
                else:
                    coefs[r] = inv_norm * (r * shrink)
            out.append(coefs[r])
        return out

    def move_to(self, j: int, seed: Optional[int], coefs: List[torch.Tensor]) -> None:
        """theta <- sample j's start (around theta0, or the anchor with ``shared_ascent``); remembered, so a
        tilt-sampled backward can come back to it."""
        self.starts[j] = (seed, coefs)
        for t in self.targets:
            t.backend.perturb(t.bucket, seed, self.per_group(coefs, t), base=t.bucket.anchor)

    def first_start(self) -> None:
        """theta0 saved, and the parameters moved to the first evaluation's point: sample 0's start, or
        theta0 itself when the plan begins at the origin (a move with no noise)."""
        self.layout.reshard()  # FSDP2: no module computes with stale unsharded copies
        for b in self.buckets:
            b.pull()
        seed, parts = self.noise(0) if self.plan[0].role != "origin" else (None, None)
        sqnorm = None
        if parts is not None and self.config.radius_mode == "relative":  # one collective for both
            got = self.reduce({"noise": parts, "theta": [t.backend.param_sqnorm(t.bucket) for t in self.targets]})[1]
            sqnorm, self.theta_norm = got["noise"], self.num.sqrt(got["theta"])
        elif parts is not None:
            sqnorm = self.reduce({"noise": parts})[1]["noise"]
        coefs = self.coefs(0, sqnorm)
        self.starts[0] = (seed, coefs)
        for t in self.targets:
            t.backend.perturb(t.bucket, seed, self.per_group(coefs, t), save_backup=True)
