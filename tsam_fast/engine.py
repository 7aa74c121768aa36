"""The step engine: the one owner of a TSAM step, whatever drives it.

A step is a fixed sequence of gradient evaluations (docs/design.md §8). ``StepConfig`` is the validated,
immutable description of that sequence; ``StepRun`` runs one step of it: it moves the parameters to the
first evaluation point, and after each evaluation's loss is recorded it makes the move that evaluation
calls for (the ascent step, a leapfrog step, or the tilt update fused with the next sample's random
start); the last one leaves the tilted gradient in ``.grad`` and the parameters back at theta0, and
``finish`` hands the base optimizer its step. ``TSAM.step(closure)`` and the closure-free loop
(``TSAM.begin_step``) are two drivers of this same object.

Everything a step needs is decided in ``StepRun.__init__``: the buckets and their backends, the per-group
scalars, the finiteness policy (``Guard``). The step's scalars stay on the step's device as 0-dim
tensors; the only host read is the guard's optional finiteness verdict in ``finish``.

Abandoning a step at any point -- an exception, a ``break`` out of the loop, the run object being
dropped, a misuse error -- leaves the parameters exactly at theta0, no gradients, and the optimizer
state (step counter, base-optimizer state) unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import weakref
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from . import rng

__all__ = ["StepConfig", "Evaluation", "StepRun", "NonFiniteLossError", "SAMPLERS", "STARTS"]

SAMPLERS = ("ascent", "random", "hmc")
STARTS = ("gaussian", "sphere", "ball", "none")
RADIUS_MODES = ("absolute", "relative")
ROLES = ("origin", "ascent", "leapfrog", "score", "sample")
SELECTS = ("sample", "top")
# Added to norms before dividing, as in the widely used SAM implementations.
_NORM_EPS = 1e-12
_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


class NonFiniteLossError(RuntimeError):
    """A loss or gradient of the step was NaN or infinite; the step was undone (parameters back at theta0)."""


# -- validation -----------------------------------------------------------------------------------


def check_number(name: str, value, low: float = 0.0, allow_none: bool = False, strict: bool = False):
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
            (value <= low if strict else value < low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"invalid {name}={value!r}: expected a finite number {bound}")
    return float(value)


def check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"invalid {name}={value!r}: expected an integer >= {low}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"invalid {name}={value!r}: expected one of {', '.join(map(repr, choices))}")
    return value


def check_tilt(value):
    return value if callable(value) else check_number("tilt", value)


class Evaluation(NamedTuple):
    """One gradient evaluation of a step, as the user's loop sees it.

    ``index``: 0-based position in the step; ``sample``: the perturbation j it belongs to; ``role``:
    ``"ascent"`` (its gradient gives the ascent direction of sample j), ``"leapfrog"`` (an HMC step of
    sample j; ``substep`` is k of K), ``"sample"`` (its loss and gradient enter the tilted average) or,
    with ``shared_ascent``, ``"origin"`` (at theta0 itself, before any sample: its gradient, the plain
    gradient g0, gives the ascent direction every sample shares; ``sample`` is 0). With
    ``backward_samples``: ``"score"`` (a forward pass only -- no backward -- whose loss scores sample j),
    then ``"sample"`` evaluations at the samples drawn from the tilt weights (``sample`` is the drawn j;
    -1 in ``StepConfig.plan``, where it is not known yet).
    """

    @property
    def backward(self) -> bool:
        """Whether this evaluation needs a backward (False for a ``"score"``: forward only, under no_grad)."""
        return self.role != "score"

    index: int
    sample: int
    role: str
    substep: int = 0


@dataclass(frozen=True)
class StepConfig:
    """What a step does, validated once: sampler, start, counts and the step-wide constants."""

    num_samples: int = 3
    sampler: str = "ascent"
    start: str = "gaussian"
    noise_scale: float = 1.0
    adaptive: bool = False
    max_grad_norm: Optional[float] = None
    delta: float = 0.0
    hmc_steps: int = 1
    hmc_step_size: float = 0.01
    hmc_sigma: float = 1.0
    check_finite: bool = True
    radius_mode: str = "absolute"
    shared_ascent: bool = False
    backward_samples: Optional[int] = None
    backward_select: str = "sample"
    tilt_every: int = 1

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "num_samples", check_int("num_samples", self.num_samples, 1))
        set_(self, "sampler", check_choice("sampler", self.sampler, SAMPLERS))
        set_(self, "start", check_choice("start", self.start, STARTS))
        set_(self, "noise_scale", check_number("noise_scale", self.noise_scale))
        set_(self, "adaptive", bool(self.adaptive))
        if self.adaptive and self.sampler != "ascent":
            raise ValueError(f"adaptive=True scales the ascent step; it needs sampler='ascent' (got {self.sampler!r})")
        set_(self, "max_grad_norm", check_number("max_grad_norm", self.max_grad_norm, allow_none=True, strict=True))
        set_(self, "delta", check_number("delta", self.delta))
        set_(self, "hmc_steps", check_int("hmc_steps", self.hmc_steps, 1))
        set_(self, "hmc_step_size", check_number("hmc_step_size", self.hmc_step_size))
        set_(self, "hmc_sigma", check_number("hmc_sigma", self.hmc_sigma))
        set_(self, "check_finite", bool(self.check_finite))
        set_(self, "radius_mode", check_choice("radius_mode", self.radius_mode, RADIUS_MODES))
        set_(self, "shared_ascent", bool(self.shared_ascent))
        if self.shared_ascent and self.sampler != "ascent":
            raise ValueError(f"shared_ascent=True shares the ascent step of sampler='ascent' (got {self.sampler!r})")
        if self.backward_samples is not None:
            set_(self, "backward_samples", check_int("backward_samples", self.backward_samples, 1))
            if not (self.sampler == "random" or self.shared_ascent):
                raise ValueError(
                    "backward_samples scores the samples with forward passes only, but sampler="
                    f"{self.sampler!r} needs a gradient at every sample's start; use sampler='random', or "
                    "sampler='ascent' with shared_ascent=True")
        set_(self, "backward_select", check_choice("backward_select", self.backward_select, SELECTS))
        set_(self, "tilt_every", check_int("tilt_every", self.tilt_every, 1))
        if self.backward_select == "top" and (self.backward_samples or 0) > self.num_samples:
            raise ValueError(f"backward_select='top' backpropagates the {self.backward_samples} highest-weight of "
                             f"{self.num_samples} samples: backward_samples must be <= num_samples")
        set_(self, "plan", self._plan())

    def plan_at(self, step: int, cached: bool = True) -> Tuple[Evaluation, ...]:
        """The plan of step ``step``: with ``tilt_every = k > 1``, one evaluation at theta0 (its gradient
        corrected by the cached tilted correction) except every k-th step (and until a correction is
        cached), which is the full plan."""
        if self.tilt_every > 1 and cached and step % self.tilt_every:
            return (Evaluation(0, 0, "origin"),)
        return self.plan

    def _plan(self) -> Tuple[Evaluation, ...]:
        origin = self.shared_ascent or self.tilt_every > 1  # the periodic tilt needs g0 on its full steps
        # (sample, role, substep) in order; the index is the position, numbered once at the end
        steps: List[Tuple[int, str, int]] = [(0, "origin", 0)] if origin else []
        if self.backward_samples is not None:  # s forwards, K backwards (docs/design.md §9)
            steps += [(j, "score", 0) for j in range(self.num_samples)]
            steps += [(-1, "sample", 0)] * self.backward_samples
        elif self.shared_ascent:  # s + 1 evaluations (docs/design.md §9)
            steps += [(j, "sample", 0) for j in range(self.num_samples)]
        else:
            for j in range(self.num_samples):
                if self.sampler == "ascent":
                    steps.append((j, "ascent", 0))
                elif self.sampler == "hmc":
                    steps += [(j, "leapfrog", k) for k in range(self.hmc_steps)]
                steps.append((j, "sample", 0))
        return tuple(Evaluation(i, j, role, k) for i, (j, role, k) in enumerate(steps))

    @property
    def evaluations_per_step(self) -> int:
        return len(self.plan)

    @property
    def backward_passes(self) -> int:
        """Evaluations that run a backward (the others are forward-only scores)."""
        return sum(ev.backward for ev in self.plan)


# -- the tilt -------------------------------------------------------------------------------------


class TiltState:
    """Online log-sum-exp of the tilt, per distinct weight temperature tau = t - delta (docs/design.md §2).

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


# -- the finiteness policy ------------------------------------------------------------------------


class Guard:
    """The step's finiteness policy, in one place: off, ``check_finite`` (raise and undo at the end of the
    step; one host read), or a GradScaler (an overflowed gradient makes the scaler skip the step; an
    overflowed ascent or leapfrog gradient never moves the parameters). The engine calls these hooks at
    fixed points and never branches on the policy itself."""

    def __init__(self, run: "StepRun", check_finite: bool, scaler):
        self.run = run
        self.check = check_finite
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        device = run.device
        self.finite = torch.ones((), dtype=torch.bool, device=device) if check_finite else None
        self.overflow = torch.zeros((), dtype=torch.bool, device=device) if self.scaler is not None else None

    # what a gradient statistic's finiteness means: the scaler's skip, or a recorded error
    def _gradient(self, value: torch.Tensor) -> Optional[torch.Tensor]:
        if self.scaler is not None:
            ok = torch.isfinite(value)
            self.overflow |= ~ok
            return ok
        if self.check:
            self.finite &= torch.isfinite(value)
        return None

    def _grad_sum(self, which: str) -> torch.Tensor:
        """One plain sum over every bucket's ``grad`` or ``momentum`` (a squared norm overflows sooner)."""
        run = self.run
        parts = [getattr(b, which).sum(dtype=run.dtype) for b in run.buckets]
        return parts[0] if len(parts) == 1 else torch.stack([p.to(run.device) for p in parts]).sum()

    def _sanitize(self) -> None:
        for b in self.run.buckets:
            b.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def inv_scale(self) -> torch.Tensor:
        """1 / the GradScaler's current scale (set once the user has scaled a loss)."""
        scale = self.scaler._get_scale_async()
        if scale is None:
            raise RuntimeError("grad_scaler was given but the closure (or loop) never called scaler.scale(loss): "
                               "backpropagate scaler.scale(loss) and record (or return) the unscaled loss")
        return 1.0 / scale.to(self.run.device, self.run.dtype)

    def loss(self, loss: torch.Tensor) -> None:
        if self.check:
            self.finite &= torch.isfinite(loss)

    def ascent_step(self, sqnorm: torch.Tensor) -> torch.Tensor:
        """1 / ||g|| of the ascent direction (scale-free: a GradScaler's factor cancels); 0 when the
        gradient overflowed under a scaler (the sample stays at its random start)."""
        ok = self._gradient(sqnorm)
        inv = (sqnorm.sqrt() + _NORM_EPS).reciprocal()
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
        norm = sqnorm.sqrt()
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
        flags = []
        if self.check:
            bad = ~self.finite
            if self.run.layout.shard_group is not None:
                bad = bad.to(self.run.dtype)
                torch.distributed.all_reduce(bad, group=self.run.pg)
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
        p = next((p for p in self.run.layout.params if p.grad is not None and p.grad.numel()), None)
        if p is not None:
            flag = self.overflow.to(p.device, non_blocking=p.device.type != "cpu")
            p.grad[(0,) * p.grad.dim()].add_(torch.where(flag, float("nan"), 0.0).to(p.grad.dtype))


# -- one step -------------------------------------------------------------------------------------


class _Slot(NamedTuple):
    """A bucket with the backend that runs it and the index of its per-group scalars."""

    bucket: object
    backend: object
    group: int


class StepRun:
    """One TSAM step in progress. Made by ``TSAM.begin_step()``; iterate it for the evaluations, call
    :meth:`record` with each evaluation's loss after its backward, then :meth:`finish`::

        run = opt.begin_step()
        for ev in run:                     # ev.role: "ascent" | "leapfrog" | "sample"
            loss = criterion(model(x), y)
            loss.backward()                # or accelerator.backward(loss), manual_backward(loss), ...
            run.record(loss)
        tilted_loss = run.finish()         # the base optimizer's step
    """

    def __init__(self, opt, layout, config: StepConfig):
        self.opt, self.layout, self.config = opt, layout, config
        self.buckets = layout.buckets
        self.device = self.buckets[0].device  # where the step's scalars live
        # their dtype: fp32, or float64 when a bucket is float64 (its step keeps float64 precision)
        self.dtype = torch.float64 if any(b.dtype == torch.float64 for b in self.buckets) else torch.float32
        self.k = opt._step_count
        groups = opt.param_groups
        for i, group in enumerate(groups):  # values a scheduler or user may have written since
            for key in ("rho", "radius"):
                check_number(f"param_groups[{i}] {key}", group[key])
        self.tilts = [opt._tilt_at(group) for group in groups]
        self.taus = [t - config.delta for t in self.tilts]
        self.slots = [_Slot(b, opt._backend_for(b.device, b.dtype), b.group_index) for b in self.buckets]
        self.group0 = self.buckets[0].group_index
        self.pg, self.world = _loss_group(opt.process_group)
        # which step and evaluation each all-reduce of the losses belongs to (docs/design.md §6.1): this
        # run's number among the runs begun since construction or load_state_dict, and what each such
        # all-reduce brought back (evaluation position, summed tag bits), read once at the end of the step
        self.attempt = opt._attempts
        opt._attempts += 1
        self._tagged: List[Tuple[int, torch.Tensor]] = []
        self._out_of_step: Optional[torch.Tensor] = None
        # a sharded model's norms are sums over the shard group; packed with the loss's all-reduce when that
        # group spans the same ranks (FSDP2 on a 1-D mesh), else one collective each (HSDP)
        self.shard_group = layout.shard_group
        self.one_group = self.shard_group is not None and _same_ranks(self.shard_group, self.pg)
        self.guard = Guard(self, config.check_finite, opt.grad_scaler)
        self.tilt = TiltState(self.taus)
        self.losses: List[torch.Tensor] = []
        self.theta_norm: Optional[torch.Tensor] = None  # ||theta0|| for radius_mode="relative"
        self._g0_sqnorm: Optional[torch.Tensor] = None  # tilt_every: ||g0||^2 of this full step
        self._correction: Optional[torch.Tensor] = None  # ... and the cache's, once this step finishes
        # constant step scalars (1, 0, HMC sizes), kept by the optimizer across steps: never written to
        self._scalars: Dict[float, torch.Tensor] = opt._constants.setdefault((self.device, self.dtype), {})
        # the periodic tilt: a step between full ones evaluates theta0 once and adds the cached correction
        self.between = config.tilt_every > 1 and opt._correction is not None and self.k % config.tilt_every != 0
        if config.tilt_every > 1 and not self.between:
            opt._correction = None  # this full step rewrites the cache; valid again once it finishes
        self.plan = list(config.plan_at(self.k, self.between))  # a tilt-sampled backward fills in its draws
        self._starts: Dict[int, Tuple[Optional[int], List[torch.Tensor]]] = {}  # j -> (seed, coefs) of its start
        self._position = 0          # index of the next evaluation
        self._awaiting = False      # an evaluation was handed out and its loss not recorded yet
        self._iterating = False
        self._backed_up = False
        self._theta0_view = False   # inside at_theta0(): the parameters are at theta0 for a checkpoint
        self.by_closure = False     # driven by TSAM.step(closure): error messages speak of the closure
        self.state = "running"      # -> "evaluated" -> "finished"; or "abandoned"
        self.result: Optional[torch.Tensor] = None
        self._begin()

    # -- driving it -------------------------------------------------------------------------------

    @property
    def evaluations(self) -> Tuple[Evaluation, ...]:
        """The step's evaluations, in order (drawn samples of a tilt-sampled backward: -1 until drawn)."""
        return tuple(self.plan)

    @property
    def evaluation(self) -> Optional[Evaluation]:
        """The evaluation in progress (handed out, loss not recorded yet), else None."""
        return self.plan[self._position] if self._awaiting else None

    def __iter__(self) -> Iterator[Evaluation]:
        if self._iterating or self._position:
            self._fail()
            raise RuntimeError("a TSAM step is iterated once: this run's loop was already started (the step is "
                               "abandoned; call opt.begin_step() for a new one)")
        self._iterating = True
        return self._evaluations()

    def _evaluations(self) -> Iterator[Evaluation]:
        plan = self.plan
        try:
            while self._position < len(plan):
                self._require("running", "hand out the next evaluation")
                if plan[self._position].backward:  # a score has no backward: nothing to zero
                    self.layout.begin_call()
                self._awaiting = True
                yield plan[self._position]
                if self._awaiting:
                    self._fail()
                    raise RuntimeError(
                        f"evaluation {self._position} ({plan[self._position].role}) of the TSAM step was not "
                        "recorded: call run.record(loss) after its backward, before the next one (the step was "
                        "abandoned: parameters restored)")
        except GeneratorExit:  # the loop was left early: break, an exception, or the loop object dropped
            self._fail()
            raise

    def record(self, loss) -> None:
        """The loss of the evaluation in progress, after its backward: validates both, then makes the move
        this evaluation calls for."""
        try:
            if self.state != "running" or not self._awaiting:
                raise RuntimeError(self._record_misuse())
            loss = self._checked_loss(loss)
            ev = self.plan[self._position]
            if ev.backward and not self.layout.end_call():
                where = ("during the closure: it must call loss.backward() (TSAM zeroes gradients before each call "
                         "itself)") if self.by_closure else (
                    "in this evaluation: call loss.backward() (or your trainer's backward) before record(loss)")
                raise RuntimeError(
                    f"no parameter received a gradient {where}, on a loss computed from the parameters TSAM "
                    "was given. If the model's parameters were replaced after TSAM was constructed "
                    "(load_state_dict(..., assign=True), module.to(...) onto another device, re-created layers), "
                    "construct TSAM again on model.parameters().")
            # a copy: the user may later overwrite a buffer of their own
            if loss.dim():
                loss = loss.reshape(())
            loss = loss.detach().to(device=self.device, dtype=self.dtype, copy=True,
                                    non_blocking=self.device.type != "cpu")
            self.guard.loss(loss)
            self._awaiting = False
            self._position += 1
            with torch.no_grad():
                self._after(ev, loss)
        except BaseException:
            self._fail()
            raise

    def finish(self) -> torch.Tensor:
        """End the step: the base optimizer's update from theta0 with the tilted gradient. Returns the tilted
        loss estimate (0-dim tensor)."""
        if self.state != "evaluated":
            done = self.state in ("finished", "abandoned")
            position = self._position
            self._fail()
            if done:
                raise RuntimeError(f"this TSAM step was already {self.state}; begin a new one with opt.begin_step()")
            raise RuntimeError(
                f"finish() was called after {position} of the step's {len(self.plan)} evaluations; record "
                "every evaluation's loss first (the step was abandoned: parameters restored, state unchanged)")
        opt = self.opt
        self.layout.end_step()
        losses = torch.stack(self.losses)
        tau0, tilt0 = self.taus[self.group0], self.tilts[self.group0]
        opt.last_losses = losses
        shift = shifted(losses, tau0)
        opt.last_weights = weights = torch.softmax(shift, dim=0)
        # the tilt diagnostics (docs/design.md §2): 1 <= ESS <= s; ESS near s with a small loss range means
        # the tilt is inert (the step is an average of the samples)
        opt.last_ess = (weights * weights).sum().reciprocal()
        opt.last_loss_range = losses.max() - losses.min()
        tilted = tilted_loss(losses, tilt0, shift if tau0 == tilt0 else None)
        self._release()
        failed, out_of_step = self.guard.failed(self._out_of_step)  # the step's one host read
        if out_of_step:
            error = self._desync_error()
            self._fail()
            raise error
        if failed:
            self.state = "abandoned"
            for p in self.layout.params:
                p.grad = None
            raise NonFiniteLossError(
                f"an evaluation of TSAM step {self.k} gave a non-finite loss or gradient (sample losses "
                f"{losses.tolist()}); the parameters were restored and the optimizer state is unchanged. Lower "
                "the learning rate, rho or radius, or check the data (check_finite=False lets non-finite values "
                "through).")
        self.guard.base_step(opt.base_optimizer)
        opt._step_count += 1
        if self._correction is not None:  # a full step of the periodic tilt: its correction is cached
            opt._correction = self._correction
        opt._opt_called = True  # what torch's LR schedulers check for "optimizer.step() was called"
        self.state = "finished"
        self.result = tilted
        return tilted

    @contextlib.contextmanager
    def at_theta0(self) -> Iterator[None]:
        """The parameters at theta0 for the duration (a checkpoint from inside the step: a signal handler,
        a callback), then back at the point they were at, bit for bit (docs/design.md §8.2). Gradients and
        the step's own state are not touched; nested uses are no-ops."""
        if not self._backed_up or self._theta0_view or self.state not in ("running", "evaluated"):
            yield
            return
        # quiet writes (docs/design.md §8.2): a forward of this evaluation may have saved the parameters for
        # its backward, which then reads them back exactly as they were
        with torch.no_grad():
            here = []
            for b in self.buckets:
                point = torch.empty(b.numel, dtype=b.dtype, device=b.device)
                b.gather(point)
                here.append(point)
                b.scatter(b.backup_parts, quiet=True)
        self._theta0_view = True
        try:
            with contextlib.ExitStack() as stack:  # other state as the step began (batch-norm statistics)
                for at_start in list(self.opt._step_start_state):
                    stack.enter_context(at_start())
                yield
        finally:
            self._theta0_view = False
            with torch.no_grad():
                for b, point in zip(self.buckets, here):
                    b.scatter(list(point.split(b.sizes)), quiet=True)

    def abandon(self) -> None:
        """Undo the step: parameters back to theta0 exactly, no gradients left behind, state unchanged.
        Idempotent. On several ranks, a deliberate abandon must happen on every rank at the same evaluation
        (their collectives so far were paired); an error's abandon (:meth:`_fail`) is taken as one rank's."""
        if self.state in ("finished", "abandoned"):
            return
        self.state = "abandoned"
        self._awaiting = False
        self.layout.active = False
        if self._backed_up:
            for b in self.buckets:
                b.restore()
        for p in self.layout.params:
            p.grad = None
        self._release()

    def _fail(self) -> None:
        """:meth:`abandon` on an error path (an exception in an evaluation, misuse, the loop left early, the
        run dropped). On several ranks the others may be inside this step's collectives, which no later step
        of this rank can pair correctly: the optimizer refuses further steps (docs/design.md §6.1) until
        ``load_state_dict`` resumes every rank from a checkpoint."""
        live = self.state in ("running", "evaluated")
        self.abandon()
        if live and self.world > 1 and self.opt._broken is None:
            self.opt._broken = (f"step {self.k} was abandoned on this rank by an error at evaluation "
                                f"{self._position} of {len(self.plan)}")

    def __del__(self):
        try:
            self._fail()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _release(self) -> None:
        if self.opt._run is not None and self.opt._run() is self:
            self.opt._run = None

    def _require(self, state: str, what: str) -> None:
        if self.state != state:
            raise RuntimeError(f"cannot {what}: this TSAM step was {self.state}")

    def _record_misuse(self) -> str:
        if self.state != "running":
            return f"record() on a TSAM step that was {'fully recorded' if self.state == 'evaluated' else self.state}"
        if not self._iterating:
            return "record() before the step's loop: iterate the run (for ev in run: ...) and record inside it"
        return (f"the loss of evaluation {self._position - 1} was already recorded: record each evaluation once, "
                "after its backward (the step was abandoned: parameters restored)")

    def _checked_loss(self, loss) -> torch.Tensor:
        # the messages speak of what the user wrote: a closure (TSAM.step) or a record() call
        given, must = ("the closure returned", "the closure must return") if self.by_closure else \
            ("record() got", "record() takes")
        if loss is None:
            raise ValueError(f"{given} None: it must {'return' if self.by_closure else 'be'} the loss (after "
                             "calling loss.backward())")
        if not isinstance(loss, torch.Tensor):
            if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
                loss = torch.tensor(float(loss))
            else:
                raise TypeError(f"{must} the loss as a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{must} a scalar loss, got shape {tuple(loss.shape)}; reduce it (e.g. .mean()) "
                             "before backward")
        if not loss.is_floating_point():
            raise TypeError(f"{given} a {loss.dtype} loss; {'return' if self.by_closure else 'pass'} the "
                            "floating-point loss tensor")
        return loss

    # -- the moves ----------------------------------------------------------------------------------

    def _scalar(self, x: float) -> torch.Tensor:
        t = self._scalars.get(x)
        if t is None:
            t = self._scalars[x] = torch.full((), x, dtype=self.dtype, device=self.device)
        return t

    def _on(self, value: torch.Tensor, bucket) -> torch.Tensor:
        """A step scalar on a bucket's device, in its scalar dtype (fp32 unless the bucket is float64); a
        no-op in the usual case of one device and dtype."""
        dtype = torch.float64 if bucket.dtype == torch.float64 else torch.float32
        if bucket.device == self.device and dtype == self.dtype:
            return value
        return value.to(bucket.device, dtype, non_blocking=bucket.device.type != "cpu")

    def _per_group(self, values: List[torch.Tensor], slot: _Slot) -> torch.Tensor:
        return self._on(values[slot.group], slot.bucket)

    def _total(self, parts: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """The sum of per-bucket reductions, in the step's scalar dtype on its device (None if no parts)."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0] if parts[0].dtype == self.dtype else parts[0].to(self.dtype)
        return torch.stack([p.to(self.device, self.dtype, non_blocking=self.device.type != "cpu")
                            for p in parts]).sum()

    def _reduce(self, norms: List[List[torch.Tensor]], loss: Optional[torch.Tensor] = None):
        """Global values from local ones, with one collective per process group (docs/design.md §6).

        ``norms``: per-slot partial sums of squares -> their sum over all trainable parameters (a sharded
        bucket's part is summed over the shard group, a replicated bucket's counted once). ``loss``: averaged
        over the data-parallel ranks (every rank then derives the same tilt weights). Returns (loss, norms)."""
        sharded = [self._total([x for x, s in zip(parts, self.slots) if s.bucket.sharded]) for parts in norms]
        plain = [self._total([x for x, s in zip(parts, self.slots) if not s.bucket.sharded]) for parts in norms]
        dist = torch.distributed
        average = self.world > 1 and loss is not None
        shared = self.shard_group is not None and bool(norms)
        with_loss = average and shared and self.one_group  # FSDP2 on a 1-D mesh: one all-reduce for all
        if average:  # the loss, (the shard norms if the group is the same,) a non-finite flag, the tag bits
            tag = self._tag_bits()
            head = [loss] + (sharded if with_loss else [])
            if self.guard.check:  # a rank's non-finite loss at an evaluation whose loss is not averaged
                head.append((~self.guard.finite).to(self.dtype))
            packed = torch.cat([torch.stack(head), tag])
            dist.all_reduce(packed, group=self.pg)
            n = len(packed) - len(tag)
            loss = packed[0]
            if with_loss:
                sharded = list(packed[1:1 + len(sharded)])
            if self.guard.check:
                self.guard.finite &= packed[n - 1] == 0
            self._check_tag(packed[n:], tag)
        if not with_loss:
            if shared:
                packed = torch.stack(sharded)
                dist.all_reduce(packed, group=self.shard_group)
                sharded = list(packed)
        if average:
            loss = loss / self.world
        totals = [a if b is None else b if a is None else a + b for a, b in zip(sharded, plain)]
        return loss, totals

    def _tag_bits(self) -> torch.Tensor:
        """This evaluation's tag as 0/1 values (docs/design.md §6.1): the configuration's fingerprint, the
        run's number and the evaluation's position, _TAG_BITS bits each, on the step's device (cached)."""
        cache = self._scalars
        parts = []
        for kind, value in (("config", _fingerprint(self.config, self.opt.seed)), ("attempt", self.attempt),
                            ("position", self._position - 1)):
            value &= (1 << _TAG_BITS[kind]) - 1
            bits = cache.get((kind, value))
            if bits is None:
                bits = cache[(kind, value)] = torch.tensor([(value >> i) & 1 for i in range(_TAG_BITS[kind])],
                                                           dtype=self.dtype, device=self.device)
            parts.append(bits)
        return torch.cat(parts)

    def _check_tag(self, summed: torch.Tensor, own: torch.Tensor) -> None:
        """Every rank's bit i is the same iff the sum is 0 or the world size where this rank has 0 or 1:
        any rank that differs in any bit is seen by every rank. Kept on the device until the step's end."""
        off = (summed != own * self.world).any()
        self._out_of_step = off if self._out_of_step is None else self._out_of_step | off
        self._tagged.append((self._position - 1, summed))
        if not self.opt._tags_seen:  # the first one since construction: read at once, so that options that
            self.opt._tags_seen = True  # differ between ranks fail every rank here, in the same collective
            error = self._desync_error()
            if error is not None:
                raise error

    def _desync_error(self) -> Optional[RuntimeError]:
        """The error for an all-reduce that paired this rank's evaluation with another step or evaluation
        on another rank (read once, at the end of the step, with check_finite's read); None if all agree."""
        for position, summed in self._tagged:
            own = self._tag_bits_at(position)
            if bool((summed != own * self.world).any()):
                return RuntimeError(_desync_message(self, position, summed, own))
        return None

    def _tag_bits_at(self, position: int) -> torch.Tensor:
        saved, self._position = self._position, position + 1
        try:
            return self._tag_bits()
        finally:
            self._position = saved

    def _grad_parts(self, adaptive: bool = False) -> List[torch.Tensor]:
        return [s.backend.grad_sqnorm(s.bucket, adaptive) for s in self.slots]

    def _grad_sqnorm(self, adaptive: bool = False) -> torch.Tensor:
        return self._reduce([self._grad_parts(adaptive)])[1][0]

    def _noise(self, j: int):
        """Seed and per-slot partial ``sum(xi**2)`` of sample j's random start (None, None for no start)."""
        if self.config.start == "none":
            return None, None
        seed = rng.stream_seed(self.opt.seed, self.k, j, rng.STREAM_START)
        return seed, [s.backend.noise_sqnorm(s.bucket, seed) for s in self.slots]

    def _coefs(self, j: int, sqnorm: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """Per-group coefficient c of sample j's random start theta0 + c * xi, from the global ||xi||^2."""
        cfg, opt = self.config, self.opt
        groups = opt.param_groups
        if sqnorm is None:
            return [self._scalar(0.0)] * len(groups)
        inv_norm = sqnorm.sqrt().clamp_min(1e-30).reciprocal()
        if self.theta_norm is not None:  # radius_mode="relative": r ||theta0|| (docs/design.md §3)
            inv_norm = inv_norm * self.theta_norm
        if cfg.start == "ball":  # radius r * u^(1/d), u ~ U(0, 1) drawn on the host from its own stream
            u = rng.host_uniform(rng.stream_seed(opt.seed, self.k, j, rng.STREAM_RADIUS))
            shrink = rng.log_uniform_radius(u, self.layout.trainable_numel)
        coefs: Dict[float, torch.Tensor] = {}
        out = []
        for group in groups:
            r = group["radius"]
            if r not in coefs:
                if cfg.start == "gaussian":  # noise_scale * xi, clipped to norm r
                    coefs[r] = torch.clamp_max(inv_norm * r, cfg.noise_scale)
                elif cfg.start == "sphere":
                    coefs[r] = inv_norm * r
                else:
                    coefs[r] = inv_norm * (r * shrink)
            out.append(coefs[r])
        return out

    def _begin(self) -> None:
        self.layout.begin_step()
        try:
            with torch.no_grad():
                self.layout.reshard()  # FSDP2: no module computes with stale unsharded copies
                for b in self.buckets:
                    b.pull()
                seed, parts = self._noise(0) if self.plan[0].role != "origin" else (None, None)
                sqnorm = None
                if parts is not None and self.config.radius_mode == "relative":  # one collective for both
                    sqnorm, theta = self._reduce([parts, [s.backend.param_sqnorm(s.bucket) for s in self.slots]])[1]
                    self.theta_norm = theta.sqrt()
                elif parts is not None:
                    sqnorm = self._reduce([parts])[1][0]
                coefs = self._coefs(0, sqnorm)
                self._starts[0] = (seed, coefs)
                for s in self.slots:
                    s.backend.perturb(s.bucket, seed, self._per_group(coefs, s), save_backup=True)
            self._backed_up = True
        except BaseException:
            self._fail()
            raise

    def _after(self, ev: Evaluation, loss: torch.Tensor) -> None:
        if ev.role == "ascent":
            self._ascend(self.guard.ascent_step(self._grad_sqnorm(self.config.adaptive)))
        elif ev.role == "origin":
            self._origin(loss)
        elif ev.role == "leapfrog":
            self._leapfrog(ev)
        elif ev.role == "score":
            self._score(ev.sample, loss)
        elif self.config.backward_samples is not None:
            self._backprop(ev.index - (len(self.plan) - self.config.backward_samples))
        else:
            self._sample(ev.sample, loss)

    def _ascend(self, inv: torch.Tensor) -> None:
        """theta <- theta + rho * P g / ||T g|| (P = T^2, T = |theta0| if adaptive; else 1); ``inv`` = 1/||T g||."""
        by_rho: Dict[float, torch.Tensor] = {}
        for group in self.opt.param_groups:
            if group["rho"] not in by_rho:
                by_rho[group["rho"]] = inv * group["rho"]
        kicks = [by_rho[group["rho"]] for group in self.opt.param_groups]
        one = self._scalar(1.0)
        for s in self.slots:
            s.backend.ascend(s.bucket, self._per_group(kicks, s), self._on(one, s.bucket), self.config.adaptive)

    def _origin(self, loss: torch.Tensor) -> None:
        """The evaluation at theta0 itself. Its gradient g0 is plain ERM's (``last_origin_loss``,
        ``last_grad_norm``). With ``shared_ascent`` it gives every sample's ascent step: the ascended point
        theta0 + rho g0/||T g0|| is the centre ("anchor") of all the random starts, theta_j = anchor + c xi_j.
        With ``tilt_every > 1`` it is kept, to cache the tilted gradient's part orthogonal to it. Between the
        periodic tilt's full steps it is the step's only evaluation (:meth:`_corrected`)."""
        if self.between:
            self._corrected(loss)
            return
        cfg, opt = self.config, self.opt
        seed, noise = self._noise(0)
        plain = self._grad_parts()
        named = {"g0": plain}
        if cfg.shared_ascent and cfg.adaptive:
            named["ascent"] = self._grad_parts(True)
        if noise is not None:
            named["noise"] = noise
            if cfg.radius_mode == "relative":
                named["theta"] = [s.backend.param_sqnorm(s.bucket) for s in self.slots]
        got = dict(zip(named, self._reduce(list(named.values()))[1]))  # one collective for them all
        if "theta" in got:
            self.theta_norm = got["theta"].sqrt()
        opt.last_origin_loss, opt.last_grad_norm = loss, got["g0"].sqrt()  # g0 comes for free: ERM's
        if cfg.tilt_every > 1:
            self._g0_sqnorm = got["g0"]
            for s in self.slots:
                s.bucket.cache.copy_(s.bucket.grad)
        if cfg.shared_ascent:
            self._ascend(self.guard.ascent_step(got.get("ascent", got["g0"])))
            for s in self.slots:
                s.bucket.gather(s.bucket.anchor)
        self._move_to(0, seed, self._coefs(0, got.get("noise")))

    # -- the periodic tilt (``tilt_every``, docs/design.md §9) --------------------------------------------

    def _cache_correction(self) -> None:
        """At the end of a full step: cache v = G - (G.g0 / ||g0||^2) g0, the tilted gradient's part
        orthogonal to the plain gradient (in the buffer that held g0), and ||g0||^2."""
        dots = [_dot(s.bucket.grad, s.bucket.cache) for s in self.slots]
        alpha = self._reduce([dots])[1][0] / self._g0_sqnorm.clamp_min(1e-30)
        for s in self.slots:
            s.bucket.cache.mul_(-self._on(alpha, s.bucket)).add_(s.bucket.grad)
        self._correction = self._g0_sqnorm

    def _corrected(self, loss: torch.Tensor) -> None:
        """A step between full ones: g <- g + (||g|| / ||g0||) v, with v and g0 of the last full step."""
        loss, (sqnorm,) = self._reduce([self._grad_parts()], loss)
        self.losses.append(loss)
        scale = (sqnorm / self.opt._correction.clamp_min(1e-30)).sqrt()
        for s in self.slots:
            s.bucket.grad.addcmul_(s.bucket.cache, self._on(scale, s.bucket))
        self.guard.after_samples(clipped=False)
        self.state = "evaluated"

    def _evaluated(self) -> None:
        """The last evaluation's move is made: the step awaits ``finish``."""
        if self.config.tilt_every > 1:
            self._cache_correction()
        self.state = "evaluated"

    def _move_to(self, j: int, seed: Optional[int], coefs: List[torch.Tensor]) -> None:
        """theta <- sample j's start (around theta0, or the anchor with ``shared_ascent``); remembered, so a
        tilt-sampled backward can come back to it."""
        self._starts[j] = (seed, coefs)
        for s in self.slots:
            s.backend.perturb(s.bucket, seed, self._per_group(coefs, s), base=s.bucket.anchor)

    # -- the tilt-sampled backward (``backward_samples``, docs/design.md §9) ----------------------------

    def _score(self, j: int, loss: torch.Tensor) -> None:
        """A forward-only evaluation scored sample j: average its loss over the ranks (with the next start's
        norm, one collective) and move to the next start; after the last, draw the samples to backpropagate."""
        last = j + 1 == self.config.num_samples
        self.layout.reshard()  # FSDP2's root stays unsharded after a forward without backward
        seed, noise = (None, None) if last else self._noise(j + 1)
        loss, totals = self._reduce([noise] if noise is not None else [], loss)
        self.losses.append(loss)
        if not last:
            self._move_to(j + 1, seed, self._coefs(j + 1, totals[0] if noise is not None else None))
            return
        self._draw()

    def _draw(self) -> None:
        """K samples to backpropagate: drawn from w = softmax(tau L) with replacement (``sample``: each then
        weighs 1/K, so the expected gradient is the tilted one), or the K of largest weight (``top``:
        weighted w_i / their sum; biased towards the worst samples, like a larger tilt). One host read: the
        weights (the drawn indices pick the seeds of the starts to regenerate)."""
        cfg = self.config
        if len(set(self.taus)) > 1:
            raise ValueError("backward_samples draws one set of samples for all parameters, so every param group "
                             f"must use the same tilt (got {sorted(set(self.taus))} after delta)")
        w = torch.softmax(shifted(torch.stack(self.losses), self.taus[0]), dim=0)
        host = w.double().tolist()  # the option's one host read per step (tests/test_no_host_sync.py pins it)
        k_draws = cfg.backward_samples
        if cfg.backward_select == "top":
            drawn = sorted(range(len(host)), key=lambda i: -host[i])[:k_draws]
            top = w[drawn]
            weights = list(top / top.sum())
        else:
            drawn = [_inverse_cdf(host, rng.host_uniform(rng.stream_seed(self.opt.seed, self.k, d, rng.STREAM_SELECT)))
                     for d in range(k_draws)]
            weights = [self._scalar(1.0 / k_draws)] * k_draws
        first = len(self.plan) - k_draws
        for d, j in enumerate(drawn):
            self.plan[first + d] = Evaluation(first + d, j, "sample")
        self.drawn, self._draw_weights = drawn, weights
        self._move_to(drawn[0], *self._starts[drawn[0]])

    def _backprop(self, d: int) -> None:
        """The d-th drawn sample's gradient, weighted, into A; then the next drawn start, or the end."""
        cfg = self.config
        clip = None
        if cfg.max_grad_norm is not None:
            norm = self.guard.clip_norm(self._grad_sqnorm())
            clip = torch.clamp_max(cfg.max_grad_norm / (norm + _CLIP_EPS), 1.0)
        b = self._draw_weights[d] if clip is None else self._draw_weights[d] * clip
        one, first = self._scalar(1.0), d == 0
        if d + 1 < cfg.backward_samples:
            seed, coefs = self._starts[self.drawn[d + 1]]
            for s in self.slots:
                s.backend.tilt_accumulate(s.bucket, self._on(one, s.bucket), self._on(b, s.bucket), first, seed,
                                          self._per_group(coefs, s), base=s.bucket.anchor)
            return
        for s in self.slots:
            s.backend.finalize(s.bucket, self._on(one, s.bucket), self._on(b, s.bucket), self._on(one, s.bucket), first)
        self.guard.after_samples(clipped=clip is not None)
        self._evaluated()

    def _leapfrog(self, ev: Evaluation) -> None:
        """``hmc``: v ~ N(0, sigma^2 I) before the first kick; K kick-drift steps with the half kicks of
        neighbours merged."""
        cfg = self.config
        if ev.substep == 0:
            mseed = rng.stream_seed(self.opt.seed, self.k, ev.sample, rng.STREAM_MOMENTUM)
            sigma = self._scalar(cfg.hmc_sigma)
            for s in self.slots:
                s.backend.draw_momentum(s.bucket, mseed, self._on(sigma, s.bucket))
        kick = self.guard.leapfrog_kick(self._scalar(cfg.hmc_step_size * (0.5 if ev.substep == 0 else 1.0)))
        alpha = self._scalar(cfg.hmc_step_size)
        for s in self.slots:
            s.backend.leapfrog(s.bucket, self._on(kick, s.bucket), self._on(alpha, s.bucket))
        if ev.substep == cfg.hmc_steps - 1:
            self.guard.after_leapfrogs()

    def _sample(self, j: int, loss: torch.Tensor) -> None:
        cfg = self.config
        last = j + 1 == cfg.num_samples
        # the step's collectives for this sample, packed: the loss, the clip norm, the next start's norm
        norms = [self._grad_parts()] if cfg.max_grad_norm is not None else []
        seed, noise = (None, None) if last else self._noise(j + 1)
        if noise is not None:
            norms.append(noise)
        loss, totals = self._reduce(norms, loss)
        self.losses.append(loss)
        clip = None
        if cfg.max_grad_norm is not None:
            norm = self.guard.clip_norm(totals.pop(0))
            clip = torch.clamp_max(cfg.max_grad_norm / (norm + _CLIP_EPS), 1.0)
        ab = self.tilt.update(loss, clip)
        first = j == 0
        if not last:
            coefs = self._coefs(j + 1, totals[0] if noise is not None else None)
            for s in self.slots:
                a, b = ab[self.taus[s.group]]
                s.backend.tilt_accumulate(s.bucket, self._on(a, s.bucket), self._on(b, s.bucket), first, seed,
                                          self._per_group(coefs, s), base=s.bucket.anchor)
            return
        inv_z = self.tilt.inverse_normalizers()
        for s in self.slots:
            tau = self.taus[s.group]
            a, b = ab[tau]
            s.backend.finalize(s.bucket, self._on(a, s.bucket), self._on(b, s.bucket),
                               self._on(inv_z[tau], s.bucket), first)
        self.guard.after_samples(clipped=cfg.max_grad_norm is not None)
        self._evaluated()


# bits of each field of an all-reduce's tag (docs/design.md §6.1): runs and positions that differ by less
# than 256 are always told apart; two different configurations collide with probability 2**-16
_TAG_BITS = {"config": 16, "attempt": 8, "position": 8}


@functools.lru_cache(maxsize=8)
def _fingerprint(config: StepConfig, seed: int) -> int:
    """What must agree across ranks for their steps to be the same step: the step's options and the seed."""
    fields = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
    return zlib.crc32(repr((fields, seed)).encode())


def _tag_fields(bits: List[float]) -> Dict[str, int]:
    out, i = {}, 0
    for kind, n in _TAG_BITS.items():
        out[kind] = sum(int(round(b)) << k for k, b in enumerate(bits[i:i + n]))
        i += n
    return out


def _desync_message(run: "StepRun", position: int, summed: torch.Tensor, own: torch.Tensor) -> str:
    mine = _tag_fields(own.tolist())
    where = (f"TSAM step {run.k}: the ranks are out of step. This rank's all-reduce of evaluation {position} "
             f"({run.plan[position].role}) of its run {run.attempt}")
    if run.world == 2:  # the other rank's tag is the sum minus ours
        theirs = _tag_fields((summed - own).tolist())
        if theirs["config"] != mine["config"]:
            what = ("paired with a rank whose TSAM configuration differs (sampler, num_samples, seed, tilt_every, "
                    "backward_samples, ...): construct TSAM with the same options on every rank")
        else:
            what = (f"paired with the other rank's evaluation {theirs['position']} of its run "
                    f"{theirs['attempt'] + (run.attempt & ~255)}")
    else:
        what = "paired with a different evaluation, run or configuration on another rank"
    return (f"{where} {what}. A rank that catches an error in a step and goes on to its next batch, or a "
            "configuration that differs between ranks, does this; the collectives cannot be paired again. "
            "Parameters are back at theta0 and the optimizer state is unchanged on this rank, and every rank "
            "raises this at the end of the step: stop, and resume every rank from the last checkpoint (loading "
            "TSAM's state_dict renumbers the runs on every rank).")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) with an fp32 (float64) accumulator."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.dot(a, b)
    return torch.dot(a.float(), b.float())


def _inverse_cdf(weights: List[float], u: float) -> int:
    """The index i with cumsum(w)[i-1] <= u < cumsum(w)[i] (the last index if rounding leaves u beyond)."""
    total = 0.0
    for i, w in enumerate(weights):
        total += w
        if u < total:
            return i
    return len(weights) - 1


def _same_ranks(a, b) -> bool:
    """Whether two process groups (None: the default group) span the same ranks."""
    dist = torch.distributed
    ranks = [dist.get_process_group_ranks(g if g is not None else dist.group.WORLD) for g in (a, b)]
    return ranks[0] == ranks[1]


def _loss_group(process_group):
    """(group, world size) over which sample losses are averaged; world size 1 means no all-reduce."""
    if process_group is None:
        return None, 1
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if process_group == "auto":
            return None, 1
        raise RuntimeError("TSAM(process_group=...) was given but torch.distributed is not initialized; "
                           "call torch.distributed.init_process_group first, or pass process_group=None")
    group = None if process_group == "auto" else process_group
    return group, dist.get_world_size(group)


def live_run(opt) -> Optional[StepRun]:
    """The optimizer's step in progress (held weakly: a dropped run abandons itself), or None."""
    ref = opt._run
    run = ref() if ref is not None else None
    return run if run is not None and run.state in ("running", "evaluated") else None


def register_run(opt, run: StepRun) -> None:
    opt._run = weakref.ref(run)
