"""TSAM: Tilted Sharpness-Aware Minimization as a ``torch.optim`` optimizer.

The class is the thin API: construction and validation, param groups, state, and two drivers of the one
step engine (``tsam_fast.engine``): ``step(closure)`` and the closure-free ``begin_step()`` loop. The
engine decides what happens in a step (docs/design.md §1-3, §8); the backend's fused ops
(``tsam_fast.backends``) do the element-wise work over flat buffers (``tsam_fast.flat``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .backends import BACKENDS, Backend, BackendUnavailable, resolve_backend
from .engine import (NonFiniteLossError, StepConfig, StepRun, check_choice, check_number, check_tilt,
                     live_run, register_run)
from .flat import FlatLayout, check_parameter

__all__ = ["TSAM", "NonFiniteLossError"]

# Hyperparameters a param group may override.
GROUP_KEYS = ("tilt", "rho", "radius")
_CONFIG_FIELDS = tuple(StepConfig.__dataclass_fields__)


class TSAM(torch.optim.Optimizer):
    r"""Tilted SAM (Li, Zhou & Bilmes, ICML 2025) around any ``torch.optim`` base optimizer.

    Each :meth:`step` draws ``num_samples`` perturbations :math:`\epsilon_j` around the parameters
    :math:`\theta`, evaluates the closure at :math:`\theta + \epsilon_j` and hands the base optimizer the
    tilted gradient :math:`\sum_j w_j \nabla L(\theta+\epsilon_j)` with
    :math:`w = \mathrm{softmax}(t \cdot L)`, accumulated online in log-sum-exp form (one fp32
    accumulator, whatever ``num_samples``). The base optimizer then steps from the restored
    :math:`\theta`.

    Args:
        params: parameters or param groups (groups may override ``tilt``, ``rho``, ``radius`` and any
            base-optimizer option).
        base_optimizer: the base optimizer *class*, e.g. ``torch.optim.SGD``.
        tilt: t >= 0, or a callable ``step -> t`` (``tsam_fast.schedules``). 0 averages the samples'
            gradients; large t approaches the worst sample's gradient (SAM's objective).
        num_samples: s >= 1 perturbations per step.
        sampler: ``"ascent"`` (random start, then one normalized ascent step of length ``rho``: 2
            closure calls per sample), ``"random"`` (the random start only: 1 call) or ``"hmc"``
            (random start, then ``hmc_steps`` leapfrog steps: 1 + hmc_steps calls).
        start: random start over all trainable parameters jointly: ``"gaussian"`` (noise_scale * xi
            clipped to norm ``radius``), ``"sphere"`` (norm exactly ``radius``), ``"ball"`` (uniform in
            the ball of radius ``radius``) or ``"none"``.
        radius, noise_scale, rho: r, the Gaussian scale, the ascent step length.
        radius_mode: ``"absolute"`` (default, the paper's code): ``radius`` is a length. ``"relative"``: a
            fraction of ``||theta0||``, the L2 norm of all trainable parameters at the start of the step
            (beyond the paper; a radius that follows the weights' scale, e.g. ``radius=0.01`` moves them
            by 1%; one extra reduction per step, packed with the first start's).
        adaptive: ASAM-style ascent, scaled element-wise by ``|theta|`` (``ascent`` only).
        shared_ascent: (``ascent`` only; beyond the paper, docs/design.md §9) one gradient at theta0 itself
            gives the normalised ascent step all samples share: ``theta_j = theta0 + rho g0/||g0|| + eps_j``,
            s + 1 evaluations per step instead of 2s (the first, role ``"origin"``, unperturbed). Its loss
            and gradient norm, plain ERM's, are kept as ``last_origin_loss`` / ``last_grad_norm``. Costs one
            more parameter-sized buffer (the ascended point).
        backward_samples: K (beyond the paper, docs/design.md §9; ``random`` sampler, or ``ascent`` with
            ``shared_ascent``): score the s samples with forward passes only (role ``"score"``, run under
            ``torch.no_grad()``), then backpropagate K of them drawn from softmax(t L) with replacement, each
            weighted 1/K: the expected gradient is the tilted gradient. About s forwards + K (+1 with
            ``shared_ascent``) forward/backward passes per step, and one host read (the weights). The
            closure must take a ``backward`` argument: ``def closure(backward=True): loss = ...; if
            backward: loss.backward(); return loss``; in the closure-free loop, ``ev.backward`` says it.
        backward_select: ``"sample"`` (default: the unbiased draw above) or ``"top"`` (the K samples of
            largest weight, weighted by their renormalised weights: deterministic, biased towards the worst
            samples as a larger tilt would be; with K = s it is the exact tilted gradient).
        tilt_every: k (beyond the paper, in the spirit of LookSAM): the full step every k-th step, with one
            more evaluation at theta0 (role ``"origin"``, unless ``shared_ascent`` already has it) whose
            gradient g0 splits the tilted gradient G: the part orthogonal to g0, v, is cached (one more
            parameter-sized buffer). The k - 1 steps between evaluate theta0 once and step with
            ``g + (||g|| / ||g0||) v``. k = 1 (default) is the full algorithm every step. The cache is not in
            the state_dict: after a load (or a failed full step) the next step is a full one.
        max_grad_norm: clip each sample's gradient to this global norm before it is accumulated.
        delta: the weights use ``softmax((t - delta) * L)`` (the paper's correction when the sampler
            is already tilted by delta); the reported tilted loss uses t.
        hmc_steps, hmc_step_size, hmc_sigma: K leapfrog steps, step size alpha, momentum scale sigma.
        seed: the noise seed; with the step counter it fixes every perturbation (saved in state_dict).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (see ``tsam_fast.backend_info()``), or a
            ``tsam_fast.backends.Backend`` object (an implementation of the op contract of your own; the
            benchmarks use it to time the plain reference ops).
        check_finite: raise :class:`NonFiniteLossError` (and undo the step) when a loss or gradient is
            NaN/inf. This reads one flag on the host at the end of each step and, unless
            ``max_grad_norm`` already measures every sample's gradient, sums the final gradient once (one
            read of it; ``hmc`` also sums its momentum once per sample); ``False`` makes the step free of host syncs, and non-finite values then propagate
            as in any torch optimizer. With ``grad_scaler``, gradient overflow is the scaler's to handle
            (the step is skipped, not raised); non-finite losses still raise.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 mixed precision (see the README's recipe): the
            closure backpropagates ``scaler.scale(loss)`` and returns the unscaled loss; ``step`` ends with
            ``scaler.step(base_optimizer)`` (unscale once, skip the update if the tilted gradient has an
            inf/NaN) and the caller runs ``scaler.update()`` after it. A sample whose gradient overflows
            makes the step skip with the parameters restored; the ascent and leapfrog steps never move
            the parameters along an overflowed gradient.
        process_group: data parallelism (docs/design.md §6): each sample's loss is averaged over the ranks
            of this group (one scalar all-reduce per sample, no host sync on NCCL) before it enters the
            tilt, so every rank derives the same weights; the gradients are already averaged by DDP or
            FSDP2 and every rank draws the same noise from the same seed. On an FSDP2 model every norm is
            a sum of local shards' sums over the shard dimension, packed into the same all-reduce. ``"auto"`` (default) uses the default
            group when ``torch.distributed`` is initialized with more than one rank; ``None`` never
            all-reduces (e.g. independent models per rank).
        shard_buffers: deprecated, no effect (FSDP2's local shards are worked on in place, one op over all).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    The closure evaluates the loss at the current (perturbed) parameters and calls ``backward()``;
    ``step`` zeroes the gradients before each call itself. ``step`` returns the tilted loss estimate
    ``(1/t) log mean_j exp(t L_j)`` (the mean at t = 0) as a 0-dim tensor; ``last_losses`` and
    ``last_weights`` hold the last step's per-sample losses and weights (group 0's tilt), ``last_ess``
    their effective sample size ``1 / sum(w**2)`` (1 to s) and ``last_loss_range`` the losses' max - min,
    all device tensors (no host sync); :meth:`tilt_diagnostics` gathers them.
    """

    def __init__(self, params, base_optimizer, *, tilt: Union[float, Callable[[int], float]] = 1.0,
                 num_samples: int = 3, sampler: str = "ascent", start: str = "gaussian",
                 radius: float = 1.0, noise_scale: float = 1.0, rho: float = 0.05,
                 adaptive: bool = False, shared_ascent: bool = False, backward_samples: Optional[int] = None,
                 backward_select: str = "sample", tilt_every: int = 1, max_grad_norm: Optional[float] = None,
                 delta: float = 0.0,
                 hmc_steps: int = 1, hmc_step_size: float = 0.01, hmc_sigma: float = 1.0,
                 radius_mode: str = "absolute", seed: int = 0, backend: str = "auto", check_finite: bool = True,
                 grad_scaler: Optional["torch.amp.GradScaler"] = None,
                 process_group: Union[str, None, object] = "auto", shard_buffers: Optional[str] = None,
                 **base_kwargs):
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise TypeError("base_optimizer must be an optimizer class such as torch.optim.SGD "
                            f"(got {base_optimizer!r}); its options go in TSAM's keyword arguments")
        self.config = StepConfig(num_samples=num_samples, sampler=sampler, start=start, noise_scale=noise_scale,
                                 adaptive=adaptive, max_grad_norm=max_grad_norm, delta=delta, hmc_steps=hmc_steps,
                                 hmc_step_size=hmc_step_size, hmc_sigma=hmc_sigma, check_finite=check_finite,
                                 radius_mode=radius_mode, shared_ascent=shared_ascent,
                                 backward_samples=backward_samples, backward_select=backward_select,
                                 tilt_every=tilt_every)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"invalid seed={seed!r}: expected an integer")
        self.seed = int(seed)
        if not isinstance(backend, Backend):
            check_choice("backend", backend, ("auto",) + BACKENDS)
        self.backend = backend
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler (got {type(grad_scaler).__name__})")
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        if shard_buffers is not None:
            check_choice("shard_buffers", shard_buffers, ("auto", "packed", "in_place"))
            warnings.warn("TSAM(shard_buffers=...) has no effect and will be removed: every layout now runs each "
                          "op once over the parameters' own storage (FSDP2's local shards included)",
                          DeprecationWarning, stacklevel=2)
        for key, value in base_kwargs.items():  # e.g. lr=nan passes torch's `lr < 0` checks
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"invalid {key}={value!r} for the base optimizer: expected finite numbers")
        defaults = dict(tilt=check_tilt(tilt), rho=check_number("rho", rho),
                        radius=check_number("radius", radius), **base_kwargs)
        self._layout: Optional[FlatLayout] = None
        self._backends: Dict[Tuple[torch.device, torch.dtype], object] = {}
        self._step_count = 0
        self._attempts = 0  # runs begun (finished or not) since construction or load_state_dict: the tags
        self._tags_seen = False  # the first tagged all-reduce is checked at once (tsam_fast.engine)
        self._broken: Optional[str] = None  # several ranks: why a step failed here; no further step until a load
        self._step_start_state: list = []  # context managers that put other state (batch-norm statistics)
        # back as the step began, for unperturbed() (tsam_fast.batchnorm)
        self._run = None  # weak reference to the step in progress (tsam_fast.engine.live_run)
        self._correction = None  # tilt_every > 1: ||g0||^2 of the cached correction (tsam_fast.engine)
        self._constants: Dict = {}  # (device, dtype) -> constant step scalars (tsam_fast.engine.StepRun)
        self.last_losses: Optional[torch.Tensor] = None
        self.last_weights: Optional[torch.Tensor] = None
        self.last_ess: Optional[torch.Tensor] = None
        self.last_origin_loss: Optional[torch.Tensor] = None  # shared_ascent: L(theta0) and ||g0||
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.last_loss_range: Optional[torch.Tensor] = None
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        # unsupported parameters, and a backend that cannot run one, fail here rather than at step 1
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                self._check_new_parameter(p, gi, pi)

    def __getattr__(self, name: str):
        """The step options (``num_samples``, ``sampler``, ``start``, ...) read from the immutable config."""
        config = self.__dict__.get("config")
        if config is not None and name in _CONFIG_FIELDS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _check_new_parameter(self, p: torch.Tensor, gi: int, pi: int) -> None:
        if check_parameter(p, gi, pi) is not None:  # an FSDP2 shard (docs/design.md §6)
            if self.grad_scaler is not None:
                raise ValueError(
                    f"parameter {pi} of group {gi} is sharded (FSDP2): grad_scaler (fp16 loss scaling) is not "
                    "supported on sharded models, whose overflow checks would be per shard. Train in bf16 "
                    "instead: fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                    "reduce_dtype=torch.float32)) needs no loss scaling")
            if self.process_group is None:
                raise ValueError(
                    f"parameter {pi} of group {gi} is sharded (FSDP2), but process_group=None: a sharded "
                    "model's sample losses must be averaged over its ranks. Use process_group='auto' (default) "
                    "or the group FSDP2 trains over")

        if p.requires_grad:
            try:
                self._backend_for(p.device, p.dtype)
            except BackendUnavailable as exc:
                raise BackendUnavailable(f"parameter {pi} of group {gi} ({p.dtype}, shape {tuple(p.shape)} on "
                                         f"{p.device}): {exc}") from None

    # -- param groups and state -----------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        for key in GROUP_KEYS:
            if key in param_group:
                param_group[key] = check_tilt(param_group[key]) if key == "tilt" else \
                    check_number(key, param_group[key])
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key in GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        param_group["params"] = params = [params] if isinstance(params, torch.Tensor) else list(params)
        for pi, p in enumerate(params):  # before the base optimizer takes the group: nothing half-added
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but parameter {pi} of the new group is a "
                                f"{type(p).__name__}")
            self._check_new_parameter(p, len(self.param_groups), pi)
        self.base_optimizer.add_param_group(param_group)
        self._invalidate_layout()

    def unperturbed(self):
        """A context manager for a consistent checkpoint from inside a step (a preemption signal handler,
        a callback between evaluations, another thread): the parameters are at theta0 for its duration and
        back at the step's current point, bit for bit, after it; the step goes on as if nothing happened.
        Outside a step it does nothing. Save inside it::

            with opt.unperturbed():
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

        (``state_dict()`` values share the parameters' storage: write them, or copy them, inside the
        block.) It holds one copy of the perturbed parameters meanwhile. With a batch-norm policy installed
        (``tsam_fast.batchnorm``) the layers' running statistics are put back as the step began, too;
        other buffers a step's forwards change are the model's business."""
        run = live_run(self)
        return run.at_theta0() if run is not None else contextlib.nullcontext()

    def state_dict(self) -> dict:
        """The base optimizer's state_dict plus ``"tsam"``: the step counter and seed.

        Callable tilts (schedules) are code, not state: they are saved as None and the optimizer's
        own schedule is kept on load. Taken during a step, it is the state as of theta0 (a step changes
        the state only when it finishes), like a plain optimizer's before its ``step()``; the model's
        parameters are perturbed then: save the model inside ``with opt.unperturbed():``.
        """
        sd = self.base_optimizer.state_dict()
        for group in sd["param_groups"]:
            if callable(group.get("tilt")):
                group["tilt"] = None
        sd["tsam"] = {"step": self._step_count, "seed": self.seed}
        # also in every group: torch.distributed.checkpoint keeps only "state" and "param_groups"
        for group in sd["param_groups"]:
            group.update(tsam_step=self._step_count, tsam_seed=self.seed)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        groups = [dict(g) for g in sd.get("param_groups", ())]
        in_groups = [{"step": g.pop("tsam_step"), "seed": g.pop("tsam_seed")} for g in groups
                     if "tsam_step" in g and "tsam_seed" in g]
        sd["param_groups"] = groups
        tsam = sd.pop("tsam", None) or (in_groups[0] if in_groups else None)
        if tsam is None:
            raise ValueError("not a TSAM state_dict (no 'tsam' entry); for a plain base-optimizer "
                             "state_dict use opt.base_optimizer.load_state_dict(...)")
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in sd.get("state", {}).items():
            if not isinstance(index, int) or index >= len(params):
                continue  # the base optimizer reports group/parameter count mismatches itself
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                    raise ValueError(
                        f"this state_dict does not fit the optimizer's parameters: parameter {index} has shape "
                        f"{tuple(params[index].shape)} but its saved {key!r} has shape {tuple(value.shape)}; "
                        "load it into an optimizer built on the same model")
        tilts = [g["tilt"] for g in self.param_groups]
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group, tilt in zip(self.param_groups, tilts):
            if group.get("tilt") is None:
                group["tilt"] = tilt
        self._step_count = int(tsam["step"])
        self.seed = int(tsam["seed"])
        self._attempts = 0  # every rank resumes from here: their runs are numbered alike again
        self._broken = None
        self._invalidate_layout()

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy``: everything but the flat layout, the backend handles and a step in
        progress, which are rebuilt on the next step (a deep copy owns copies of the parameters, so it
        repacks those)."""
        state = dict(self.__dict__)
        state["_layout"] = None
        state["_backends"] = {}
        state["_run"] = None
        state["_constants"] = {}
        state["_correction"] = None
        state["_step_start_state"] = []  # hooks of the original model's layers
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_run", None)
        self.__dict__.setdefault("_attempts", 0)
        self.__dict__.setdefault("_tags_seen", False)
        self.__dict__.setdefault("_broken", None)
        self.__dict__.setdefault("_step_start_state", [])
        self.__dict__.setdefault("_constants", {})
        self.__dict__.setdefault("_correction", None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``; inside an evaluation of a step it zeroes the flat views and keeps them attached."""
        run = live_run(self)
        if run is not None and run.evaluation is not None:
            self._layout.zero_grads_in_step()
            return
        super().zero_grad(set_to_none)

    @property
    def closure_index(self) -> Optional[int]:
        """0-based index of the evaluation in progress during a step (closure call or closure-free loop);
        None outside one."""
        run = live_run(self)
        ev = run.evaluation if run is not None else None
        return ev.index if ev is not None else None

    @property
    def backward_passes_per_step(self) -> int:
        """Evaluations per step that run a backward (the rest, with ``backward_samples``, are forward only)."""
        return sum(ev.backward for ev in self._next_plan())

    def _next_plan(self):
        return self.config.plan_at(self._step_count, self._correction is not None)

    @property
    def evaluations_per_step(self) -> int:
        """Gradient evaluations (closure calls) one step makes: 2s for ``ascent`` (s + 1 with
        ``shared_ascent``), s for ``random``, s(1 + hmc_steps) for ``hmc``; with ``tilt_every``, the next
        step's."""
        return len(self._next_plan())

    def tilt_diagnostics(self) -> Dict[str, torch.Tensor]:
        """The last step's tilt, as device tensors (no host sync): ``ess`` (effective sample size of the
        weights, 1/sum(w^2): s when they are uniform, 1 when one sample has them all), ``max_weight``,
        ``loss_range`` (max - min of the sample losses), ``losses``, ``weights``. An ESS that stays near s
        means the tilt is inert: the samples' losses differ too little for t to tell them apart; raise t or
        the radius (``radius_mode="relative"`` sets it from the weights' scale). Sum them over an epoch on
        the device and read them once::

            ess = ess + opt.tilt_diagnostics()["ess"]     # each step
            print(ess.item() / steps)                     # once per epoch
        """
        if self.last_weights is None:
            raise RuntimeError("no TSAM step has finished yet: tilt_diagnostics() describes the last step")
        return dict(ess=self.last_ess, max_weight=self.last_weights.max(), loss_range=self.last_loss_range,
                    losses=self.last_losses, weights=self.last_weights)

    @property
    def step_count(self) -> int:
        """Completed TSAM steps (the noise counter; saved in state_dict)."""
        return self._step_count

    def extra_memory_bytes(self) -> int:
        """Bytes of the optimizer's own buffers (theta0, the accumulator, HMC momentum) plus what its
        backends keep between ops."""
        if self._layout is None:
            return 0
        buckets = self._layout.buckets  # a backend object may serve several optimizers: count ours only
        held = sum(be.held_bytes(buckets) for be in {id(be): be for be in self._backends.values()}.values())
        return sum(b.state_bytes() for b in self._layout.buckets) + held

    def backend_name(self, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> str:
        """The name of the backend that runs this optimizer's ops for ``dtype`` parameters on ``device``."""
        return self._backend_for(torch.device(device), dtype).name

    def _backend_for(self, device: torch.device, dtype: torch.dtype = torch.float32):
        key = (device, dtype)
        backend = self._backends.get(key)
        if backend is None:
            if isinstance(self.backend, Backend):
                if dtype not in self.backend.dtypes:
                    raise BackendUnavailable(f"backend {self.backend.name!r} does not run {dtype} parameters")
                backend = self.backend
            else:
                backend = resolve_backend(self.backend, device.type, dtype)
            self._backends[key] = backend
        return backend

    def _invalidate_layout(self) -> None:
        self._correction = None  # its cache lived in the layout's buckets
        if self._layout is not None:
            self._layout.remove_hooks()
            self._layout = None

    def _ensure_layout(self) -> FlatLayout:
        layout = self._layout
        if layout is not None and (layout.signature != FlatLayout.signature_of(self.param_groups)
                                   or layout.stale() is not None):
            # params added, frozen or unfrozen, or a parameter's tensor replaced (p.data = ..., model.to(),
            # vector_to_parameters): lay out again, over the tensors as they are now (gradients copied over)
            self._invalidate_layout()
            layout = None
        if layout is None:
            layout = self._layout = FlatLayout(self.param_groups)
        for bucket in layout.buckets:
            bucket.ensure_state(self.config.sampler == "hmc", self.config.shared_ascent, self.config.tilt_every > 1)
        return layout

    # -- the step -------------------------------------------------------------------------------

    def _tilt_at(self, group) -> float:
        t = group["tilt"]
        if callable(t):
            return check_number("tilt (from the schedule)", t(self._step_count))
        return check_number("tilt", t)  # param_groups may have been edited since construction

    def begin_step(self) -> StepRun:
        """Start a step driven by your own loop (no closure): the parameters move to the first evaluation
        point and the returned run hands out the step's evaluations::

            run = opt.begin_step()
            for ev in run:              # ev.index, ev.sample, ev.role ("ascent" | "leapfrog" | "sample")
                loss = criterion(model(x), y)
                loss.backward()         # or scaler.scale(loss).backward(), accelerator.backward(loss), ...
                run.record(loss)        # the (unscaled) loss of this evaluation, after its backward
            tilted_loss = run.finish()  # the base optimizer's step

        Gradients are zeroed before each evaluation; several backwards within one evaluation accumulate
        (micro-batches). Leaving the loop early (break, exception) or dropping the run abandons the step:
        parameters back at theta0 exactly, no gradients, optimizer state unchanged.
        """
        running = live_run(self)
        if running is not None:  # misuse: the step in progress is abandoned (theta0 back), none is started
            running._fail()
            if running.by_closure:
                raise RuntimeError("TSAM.step was called from inside its own closure (or begin_step() during a "
                                   "step(closure)); a step cannot start inside a step (the step in progress was "
                                   "abandoned: parameters restored to theta0)")
            raise RuntimeError("a TSAM step is already in progress: begin_step() (or step()) was called before the "
                               "previous run finished (it was abandoned: parameters restored to theta0, state "
                               "unchanged); finish a run with run.finish(), or run.abandon() it, before the next")
        if self._broken is not None:
            raise RuntimeError(
                f"TSAM will not start a step on this rank: {self._broken}, while the other ranks may have gone "
                "on with that step's collectives, which a later step of this rank would pair wrongly (the ranks' "
                "parameters would drift apart silently). Parameters are at theta0 of that step. Stop this rank "
                "(the others then fail in their pending collective, at the latest at the process group's "
                "timeout) and resume every rank from the last checkpoint: load_state_dict clears this.")
        layout = self._ensure_layout()
        if not layout.buckets:
            if not any(g["params"] for g in self.param_groups):
                raise ValueError("TSAM has no trainable parameters: its param groups are empty; pass the model's "
                                 "parameters (e.g. model.parameters()) when constructing it")
            raise ValueError("TSAM has no trainable parameters (all have requires_grad=False)")
        run = StepRun(self, layout, self.config)
        register_run(self, run)
        return run

    def _initializing_state(self) -> bool:
        """``step()`` without a closure is an error, except the call torch.distributed.checkpoint makes to
        create the base optimizer's state before loading into it: no step in progress, every learning rate
        0 and every trainable parameter's gradient present and zero. That call steps the base optimizer
        alone (which moves nothing) and is not a TSAM step (the step counter does not advance)."""
        if live_run(self) is not None or any(float(g.get("lr", 0.0)) != 0.0 for g in self.param_groups):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.requires_grad]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads if g is not None]
        return bool(grads) and len(local) == len(grads) and not any(bool(g.any()) for g in local)

    @torch.no_grad()
    def step(self, closure=None) -> torch.Tensor:
        """One TSAM step; the closure evaluates the loss at the current (perturbed) parameters, calls
        ``backward()`` and returns the loss. Returns the tilted loss estimate (0-dim tensor, no host sync)."""
        if closure is None:
            if self._initializing_state():
                self.base_optimizer.step()
                return None
            raise ValueError("TSAM.step needs a closure that evaluates the loss and calls backward(): "
                             "opt.step(lambda: (loss := criterion(model(x), y)).backward() or loss); "
                             "or drive the step yourself with opt.begin_step()")
        scores = self.config.backward_samples is not None
        if scores and not _takes_backward(closure):
            raise TypeError("backward_samples scores samples with forward passes only: the closure must take a "
                            "`backward` argument and skip loss.backward() when it is False, e.g. "
                            "def closure(backward=True): loss = criterion(model(x), y); backward and "
                            "loss.backward(); return loss")
        run = self.begin_step()
        run.by_closure = True
        try:
            for ev in run:
                if not ev.backward:
                    loss = closure(backward=False)  # under this method's no_grad: a forward only
                else:
                    with torch.enable_grad():
                        loss = closure(backward=True) if scores else closure()
                run.record(loss)
            return run.finish()
        except BaseException:
            run._fail()
            raise


def _takes_backward(closure) -> bool:
    """Whether ``closure`` accepts a ``backward`` keyword (or any keyword)."""
    try:
        params = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: assume it does
        return True
    return any(p.name == "backward" or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
