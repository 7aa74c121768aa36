"""TSAM: Tilted Sharpness-Aware Minimization as a ``torch.optim`` optimizer.

The class is the thin API: construction and validation (the options of ``tsam_fast.options``), param
groups, state, and two drivers of the one step engine (``tsam_fast.engine``): ``step(closure)`` and the
closure-free ``begin_step()`` loop. The engine decides what happens in a step (docs/design.md §1-3, §8) and
reports it back (``StepResult``); the backend's fused ops (``tsam_fast.backends``) do the element-wise work.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from . import options
from .backends import Backend, BackendUnavailable, resolve_backend
from .checkpoint import CheckpointMixin
from .engine import NonFiniteLossError, Session, StepConfig, StepInputs, StepResult, StepRun
from .flat import FlatLayout, check_parameter
from .options import check_number

__all__ = ["TSAM", "NonFiniteLossError"]

# Hyperparameters a param group may override.
GROUP_KEYS = tuple(o.name for o in options.by_scope("group"))
_STEP_OPTIONS = tuple(o.name for o in options.by_scope("step"))


def _last_tilt(name: str, doc: str) -> property:
    """A diagnostic of the last step, read from its ``TiltReport`` (None before a step)."""
    return property(lambda self: getattr(self._last_tilt, name) if self._last_tilt is not None else None, doc=doc)


class TSAM(CheckpointMixin, torch.optim.Optimizer):
    __doc__ = r"""Tilted SAM (Li, Zhou & Bilmes, ICML 2025) around any ``torch.optim`` base optimizer.

    Each :meth:`step` draws ``num_samples`` perturbations :math:`\epsilon_j` around the parameters
    :math:`\theta`, evaluates the closure at :math:`\theta + \epsilon_j` and hands the base optimizer the
    tilted gradient :math:`\sum_j w_j \nabla L(\theta+\epsilon_j)` with :math:`w = \mathrm{softmax}(t L)`,
    accumulated online in log-sum-exp form (one fp32 accumulator, whatever ``num_samples``). The base
    optimizer then steps from the restored :math:`\theta`.

    Args:
        params: parameters or param groups (groups may override ``tilt``, ``rho``, ``radius`` and any
            base-optimizer option).
        base_optimizer: the base optimizer *class*, e.g. ``torch.optim.SGD``.
{options}
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    The closure evaluates the loss at the current (perturbed) parameters and calls ``backward()``;
    ``step`` zeroes the gradients before each call itself, and returns the tilted loss estimate
    ``(1/t) log mean_j exp(t L_j)`` (the mean at t = 0) as a 0-dim tensor. ``last_losses``,
    ``last_weights``, ``last_ess`` and ``last_loss_range`` describe the last step's tilt (device tensors, no
    host sync; :meth:`tilt_diagnostics` gathers them).
    """.replace("{options}", options.docstring())

    def __init__(self, params, base_optimizer, *, tilt: Union[float, Callable[[int], float]] = 1.0,
                 num_samples: int = 3, sampler: str = "ascent", start: str = "gaussian",
                 radius: float = 1.0, noise_scale: float = 1.0, rho: float = 0.05,
                 adaptive: bool = False, shared_ascent: bool = False, backward_samples: Optional[int] = None,
                 backward_select: str = "sample", tilt_every: int = 1, max_grad_norm: Optional[float] = None,
                 delta: float = 0.0,
                 hmc_steps: int = 1, hmc_step_size: float = 0.01, hmc_sigma: float = 1.0,
                 radius_mode: str = "absolute", seed: int = 0, backend: Union[str, Backend] = "auto",
                 check_finite: bool = True, grad_scaler: Optional["torch.amp.GradScaler"] = None,
                 process_group: Union[str, None, object] = "auto", shard_buffers: Optional[str] = None,
                 **base_kwargs):
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise TypeError("base_optimizer must be an optimizer class such as torch.optim.SGD "
                            f"(got {base_optimizer!r}); its options go in TSAM's keyword arguments")
        given = {name: value for name, value in locals().items() if name in options.names()}
        values = options.validate(given)  # every option checked (tsam_fast.options), then their rules
        self.config = StepConfig(**{name: values[name] for name in _STEP_OPTIONS})
        self.seed, self.backend = values["seed"], values["backend"]
        self.grad_scaler, self.process_group = values["grad_scaler"], values["process_group"]
        if shard_buffers is not None:
            warnings.warn("TSAM(shard_buffers=...) has no effect and will be removed: every layout now runs each "
                          "op once over the parameters' own storage (FSDP2's local shards included)",
                          DeprecationWarning, stacklevel=2)
        for key, value in base_kwargs.items():  # e.g. lr=nan passes torch's `lr < 0` checks
            values_ = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values_):
                raise ValueError(f"invalid {key}={value!r} for the base optimizer: expected finite numbers")
        defaults = dict({key: values[key] for key in GROUP_KEYS}, **base_kwargs)
        self._layout: Optional[FlatLayout] = None
        self._backends: Dict[Tuple[torch.device, torch.dtype], object] = {}
        self._step_count = 0
        self._session = Session()  # the engine's state between steps (tsam_fast.engine.session)
        self._last_tilt = None  # the last step's TiltReport: last_losses, last_weights, ... read from it
        self.last_origin_loss: Optional[torch.Tensor] = None  # shared_ascent: L(theta0) and ||g0||
        self.last_grad_norm: Optional[torch.Tensor] = None
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        # unsupported parameters, and a backend that cannot run one, fail here rather than at step 1
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                self._check_new_parameter(p, gi, pi)

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
                param_group[key] = options.option(key).check(key, param_group[key])
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
        run = self._session.live_run()
        return run.at_theta0() if run is not None else contextlib.nullcontext()

    @property
    def step_in_progress(self) -> Optional[StepRun]:
        """The step in progress (begun, not finished or abandoned), or None."""
        return self._session.live_run()

    def register_step_start_state(self, at_step_start: Callable) -> Callable[[], None]:
        """Register ``at_step_start()``, a context manager that puts some other state (e.g. batch-norm
        running statistics) back as the step in progress began, for :meth:`unperturbed`. Returns a function
        that unregisters it."""
        hooks = self._session.start_state
        hooks.append(at_step_start)
        return lambda: at_step_start in hooks and hooks.remove(at_step_start)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``; inside an evaluation of a step it zeroes the flat views and keeps them attached."""
        run = self._session.live_run()
        if run is not None and run.evaluation is not None:
            self._layout.zero_grads_in_step()
            return
        super().zero_grad(set_to_none)

    @property
    def closure_index(self) -> Optional[int]:
        """0-based index of the evaluation in progress during a step (closure call or closure-free loop);
        None outside one."""
        run = self._session.live_run()
        ev = run.evaluation if run is not None else None
        return ev.index if ev is not None else None

    @property
    def backward_passes_per_step(self) -> int:
        """Evaluations per step that run a backward (the rest, with ``backward_samples``, are forward only)."""
        return sum(ev.backward for ev in self._next_plan())

    def _next_plan(self):
        return self.config.plan_at(self._step_count, self._session.correction is not None)

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

    last_losses = _last_tilt("losses", "The last step's sample losses (averaged over the ranks), a device tensor; "
                                       "None before a step.")
    last_weights = _last_tilt("weights", "The last step's tilt weights softmax((t - delta) L) (group 0's tilt); "
                                         "computed when first read.")
    last_ess = _last_tilt("ess", "The effective sample size 1/sum(w^2) of the last step's weights (1 to s).")
    last_loss_range = _last_tilt("loss_range", "max - min of the last step's sample losses.")

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
        self._session.layout_dropped()
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

    def _inputs(self, layout: FlatLayout, by_closure: bool) -> StepInputs:
        """What the step about to begin reads: this optimizer's values as of now."""
        groups = self.param_groups
        for i, group in enumerate(groups):  # values a scheduler or user may have written since
            for key in ("rho", "radius"):
                check_number(f"param_groups[{i}] {key}", group[key])
        return StepInputs(layout=layout, config=self.config, session=self._session, step=self._step_count,
                          seed=self.seed, tilts=[self._tilt_at(g) for g in groups], rhos=[g["rho"] for g in groups],
                          radii=[g["radius"] for g in groups], backend_for=self._backend_for,
                          base_optimizer=self.base_optimizer, on_finish=self._finished, grad_scaler=self.grad_scaler,
                          process_group=self.process_group, by_closure=by_closure)

    def _finished(self, result: StepResult) -> None:
        """A step finished (the base optimizer stepped): count it and keep its diagnostics."""
        self._step_count += 1
        self._last_tilt = result.tilt
        if result.origin_loss is not None:
            self.last_origin_loss, self.last_grad_norm = result.origin_loss, result.grad_norm
        self._opt_called = True  # what torch's LR schedulers check for "optimizer.step() was called"

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
        return self._begin(by_closure=False)

    def _begin(self, by_closure: bool) -> StepRun:
        running = self._session.live_run()
        if running is not None:  # misuse: the step in progress is abandoned (theta0 back), none is started
            running.fail()
            if running.by_closure:
                raise RuntimeError("TSAM.step was called from inside its own closure (or begin_step() during a "
                                   "step(closure)); a step cannot start inside a step (the step in progress was "
                                   "abandoned: parameters restored to theta0)")
            raise RuntimeError("a TSAM step is already in progress: begin_step() (or step()) was called before the "
                               "previous run finished (it was abandoned: parameters restored to theta0, state "
                               "unchanged); finish a run with run.finish(), or run.abandon() it, before the next")
        if self._session.broken is not None:
            raise RuntimeError(
                f"TSAM will not start a step on this rank: {self._session.broken}, while the other ranks may have gone "
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
        return StepRun(self._inputs(layout, by_closure))

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
        run = self._begin(by_closure=True)
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
            run.fail()
            raise


def _step_option(name: str) -> property:
    return property(lambda self: getattr(self.config, name),
                    doc=f"The ``{name}`` option, as validated (read-only: the step options are fixed at construction).")


for _name in _STEP_OPTIONS:  # opt.num_samples, opt.sampler, ...: the table's step options
    setattr(TSAM, _name, _step_option(_name))


def _takes_backward(closure) -> bool:
    """Whether ``closure`` accepts a ``backward`` keyword (or any keyword)."""
    try:
        params = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: assume it does
        return True
    return any(p.name == "backward" or p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
