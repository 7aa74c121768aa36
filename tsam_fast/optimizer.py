"""TSAM: Tilted Sharpness-Aware Minimization as a ``torch.optim`` optimizer.

The class decides *what* happens in a step (``TSAM_SPEC.md`` sections 2-3); the backend's fused ops
(``tsam_fast.backends``) do the element-wise work over flat buffers (``tsam_fast.flat``). The step's
scalars -- norms, the running max ``m`` and normaliser ``Z`` of the tilt, the losses and weights --
stay on the device as 0-dim tensors: the only host sync is the optional finiteness check at the end.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Optional, Union

import torch

from . import rng
from .backends import BACKENDS, resolve_backend
from .flat import FlatLayout, check_parameter

__all__ = ["TSAM", "NonFiniteLossError"]

SAMPLERS = ("ascent", "random", "hmc")
STARTS = ("gaussian", "sphere", "ball", "none")
# Hyperparameters a param group may override.
GROUP_KEYS = ("tilt", "rho", "radius")
# Added to norms before dividing, as in the widely used SAM implementations.
_NORM_EPS = 1e-12
_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


class NonFiniteLossError(RuntimeError):
    """A closure returned a NaN or infinite loss; the step was undone (parameters back at theta0)."""


def _check_number(name: str, value, low: float = 0.0, allow_none: bool = False, strict: bool = False):
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
            (value <= low if strict else value < low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"invalid {name}={value!r}: expected a finite number {bound}")
    return float(value)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"invalid {name}={value!r}: expected an integer >= {low}")
    return int(value)


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"invalid {name}={value!r}: expected one of {', '.join(map(repr, choices))}")
    return value


def _check_tilt(value):
    if callable(value):
        return value
    return _check_number("tilt", value)


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
        adaptive: ASAM-style ascent, scaled element-wise by ``|theta|`` (``ascent`` only).
        max_grad_norm: clip each sample's gradient to this global norm before it is accumulated.
        delta: the weights use ``softmax((t - delta) * L)`` (the paper's correction when the sampler
            is already tilted by delta); the reported tilted loss uses t.
        hmc_steps, hmc_step_size, hmc_sigma: K leapfrog steps, step size alpha, momentum scale sigma.
        seed: the noise seed; with the step counter it fixes every perturbation (saved in state_dict).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (see ``tsam_fast.backend_info()``).
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
        process_group: data parallelism (spec section 6): each sample's loss is averaged over the ranks
            of this group (one scalar all-reduce per sample, no host sync on NCCL) before it enters the
            tilt, so every rank derives the same weights; the gradients are already averaged by DDP and
            every rank draws the same noise from the same seed. ``"auto"`` (default) uses the default
            group when ``torch.distributed`` is initialized with more than one rank; ``None`` never
            all-reduces (e.g. independent models per rank).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    The closure evaluates the loss at the current (perturbed) parameters and calls ``backward()``;
    ``step`` zeroes the gradients before each call itself. ``step`` returns the tilted loss estimate
    ``(1/t) log mean_j exp(t L_j)`` (the mean at t = 0) as a 0-dim tensor; ``last_losses`` and
    ``last_weights`` hold the last step's per-sample losses and weights (group 0's tilt).
    """

    def __init__(self, params, base_optimizer, *, tilt: Union[float, Callable[[int], float]] = 1.0,
                 num_samples: int = 3, sampler: str = "ascent", start: str = "gaussian",
                 radius: float = 1.0, noise_scale: float = 1.0, rho: float = 0.05,
                 adaptive: bool = False, max_grad_norm: Optional[float] = None, delta: float = 0.0,
                 hmc_steps: int = 1, hmc_step_size: float = 0.01, hmc_sigma: float = 1.0,
                 seed: int = 0, backend: str = "auto", check_finite: bool = True,
                 grad_scaler: Optional["torch.amp.GradScaler"] = None,
                 process_group: Union[str, None, object] = "auto", **base_kwargs):
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise TypeError("base_optimizer must be an optimizer class such as torch.optim.SGD "
                            f"(got {base_optimizer!r}); its options go in TSAM's keyword arguments")
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.sampler = _check_choice("sampler", sampler, SAMPLERS)
        self.start = _check_choice("start", start, STARTS)
        self.noise_scale = _check_number("noise_scale", noise_scale)
        self.adaptive = bool(adaptive)
        if self.adaptive and sampler != "ascent":
            raise ValueError(f"adaptive=True scales the ascent step; it needs sampler='ascent' (got {sampler!r})")
        self.max_grad_norm = _check_number("max_grad_norm", max_grad_norm, allow_none=True, strict=True)
        self.delta = _check_number("delta", delta)
        self.hmc_steps = _check_int("hmc_steps", hmc_steps, 1)
        self.hmc_step_size = _check_number("hmc_step_size", hmc_step_size)
        self.hmc_sigma = _check_number("hmc_sigma", hmc_sigma)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"invalid seed={seed!r}: expected an integer")
        self.seed = int(seed)
        self.backend = _check_choice("backend", backend, ("auto",) + BACKENDS)
        self.check_finite = bool(check_finite)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler (got {type(grad_scaler).__name__})")
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        for key, value in base_kwargs.items():  # e.g. lr=nan passes torch's `lr < 0` checks
            values = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"invalid {key}={value!r} for the base optimizer: expected finite numbers")
        defaults = dict(tilt=_check_tilt(tilt), rho=_check_number("rho", rho),
                        radius=_check_number("radius", radius), **base_kwargs)
        self._layout: Optional[FlatLayout] = None
        self._backends: Dict[torch.device, object] = {}
        self._step_count = 0
        self._closure_index: Optional[int] = None
        self.last_losses: Optional[torch.Tensor] = None
        self.last_weights: Optional[torch.Tensor] = None
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        for gi, group in enumerate(self.param_groups):  # unsupported parameters fail here, not at step 1
            for pi, p in enumerate(group["params"]):
                check_parameter(p, gi, pi)
        # Resolve backends now: an explicitly requested backend that cannot run fails at construction.
        for device in {p.device for g in self.param_groups for p in g["params"]}:
            self._backend_for(device)

    # -- param groups and state -----------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        for key in GROUP_KEYS:
            if key in param_group:
                param_group[key] = _check_tilt(param_group[key]) if key == "tilt" else \
                    _check_number(key, param_group[key])
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
            check_parameter(p, len(self.param_groups), pi)
            self._backend_for(p.device)
        self.base_optimizer.add_param_group(param_group)
        self._invalidate_layout()

    def state_dict(self) -> dict:
        """The base optimizer's state_dict plus ``"tsam"``: the step counter and seed.

        Callable tilts (schedules) are code, not state: they are saved as None and the optimizer's
        own schedule is kept on load.
        """
        sd = self.base_optimizer.state_dict()
        for group in sd["param_groups"]:
            if callable(group.get("tilt")):
                group["tilt"] = None
        sd["tsam"] = {"step": self._step_count, "seed": self.seed}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if "tsam" not in state_dict:
            raise ValueError("not a TSAM state_dict (no 'tsam' entry); for a plain base-optimizer "
                             "state_dict use opt.base_optimizer.load_state_dict(...)")
        sd = dict(state_dict)
        tsam = sd.pop("tsam")
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
        self._invalidate_layout()

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy``: everything but the flat layout and the backend handles, which
        are rebuilt on the next step (a deep copy owns copies of the parameters, so it repacks those)."""
        state = dict(self.__dict__)
        state["_layout"] = None
        state["_backends"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``; inside a step's closure it zeroes the flat views and keeps them attached."""
        if self._closure_index is not None and self._layout is not None:
            self._layout.zero_grads_in_step()
            return
        super().zero_grad(set_to_none)

    @property
    def closure_index(self) -> Optional[int]:
        """0-based index of the closure call in progress during :meth:`step`; None outside a step."""
        return self._closure_index

    @property
    def evaluations_per_step(self) -> int:
        """Gradient evaluations (closure calls) one step makes: 2s for ``ascent``, s for ``random``,
        s(1 + hmc_steps) for ``hmc``."""
        per_sample = {"ascent": 2, "random": 1, "hmc": 1 + self.hmc_steps}[self.sampler]
        return self.num_samples * per_sample

    @property
    def step_count(self) -> int:
        """Completed TSAM steps (the noise counter; saved in state_dict)."""
        return self._step_count

    def extra_memory_bytes(self) -> int:
        """Bytes of the optimizer's own buffers (theta0, the fp32 accumulator, HMC momentum) plus what its
        backends keep between ops (the C++ backend's stored noise: 4 bytes per parameter)."""
        if self._layout is None:
            return 0
        held = sum(be.held_bytes() for be in {id(be): be for be in self._backends.values()}.values())
        return sum(b.state_bytes() for b in self._layout.buckets) + held

    def backend_name(self, device: Union[str, torch.device] = "cpu") -> str:
        """The name of the backend that runs this optimizer's ops for parameters on ``device``."""
        return self._backend_for(torch.device(device)).name

    def _backend_for(self, device: torch.device):
        if device not in self._backends:
            self._backends[device] = resolve_backend(self.backend, device.type)
        return self._backends[device]

    def _invalidate_layout(self) -> None:
        if self._layout is not None:
            self._layout.remove_hooks()
            self._layout = None

    def _ensure_layout(self) -> FlatLayout:
        layout = self._layout
        if layout is not None and layout.signature != FlatLayout.signature_of(self.param_groups):
            self._invalidate_layout()  # params added/frozen/unfrozen: repack (values are copied over)
            layout = None
        if layout is None:
            layout = self._layout = FlatLayout(self.param_groups)
        layout.verify()
        for bucket in layout.buckets:
            bucket.ensure_state(self.sampler == "hmc")
        return layout

    # -- the step -------------------------------------------------------------------------------

    def _tilt_at(self, group) -> float:
        t = group["tilt"]
        if callable(t):
            return _check_number("tilt (from the schedule)", t(self._step_count))
        return _check_number("tilt", t)  # param_groups may have been edited since construction

    @torch.no_grad()
    def step(self, closure=None) -> torch.Tensor:
        """One TSAM step; returns the tilted loss estimate (0-dim tensor, no host sync)."""
        if closure is None:
            raise ValueError("TSAM.step needs a closure that evaluates the loss and calls backward(): "
                             "opt.step(lambda: (loss := criterion(model(x), y)).backward() or loss)")
        if self._closure_index is not None:
            raise RuntimeError("TSAM.step was called from inside its own closure")
        layout = self._ensure_layout()
        if not layout.buckets:
            if not any(g["params"] for g in self.param_groups):
                raise ValueError("TSAM has no trainable parameters: its param groups are empty; pass the model's "
                                 "parameters (e.g. model.parameters()) when constructing it")
            raise ValueError("TSAM has no trainable parameters (all have requires_grad=False)")
        run = _Step(self, layout)
        s, k = self.num_samples, self._step_count
        layout.begin_step()
        self._closure_index = 0
        backed_up = False
        try:
            seed, coefs = run.start_coefficients(0)
            run.each(lambda be, b: be.perturb(b.param, b.backup, b.runs, seed, run.of(coefs, b), True))
            backed_up = True
            for j in range(s):
                if self.sampler == "ascent":
                    self._ascend(closure, run)
                elif self.sampler == "hmc":
                    self._leapfrog(closure, run, j)
                loss = run.evaluate(closure)
                if run.world > 1:  # every rank must derive the same weights: average the loss over ranks
                    torch.distributed.all_reduce(loss, group=run.group)
                    loss /= run.world
                run.losses[j] = loss
                clip = None
                if self.max_grad_norm is not None:
                    norm = run.global_sqnorm(lambda be, b: be.sqnorm(b.grad)).sqrt()
                    run.gradient_checked(norm)
                    if run.scaler is not None:  # the threshold is in unscaled units
                        norm = norm * run.inv_scale()
                    clip = torch.clamp_max(self.max_grad_norm / (norm + _CLIP_EPS), 1.0)
                a, b_ = run.tilt.update(loss, clip)
                if j + 1 < s:
                    seed, coefs = run.start_coefficients(j + 1)
                    run.each(lambda be, b: be.tilt_accumulate(
                        b.acc, b.grad, run.of(a, b), run.of(b_, b), j == 0, b.param, b.backup, b.runs, seed,
                        run.of(coefs, b)))
                else:
                    inv_z = run.tilt.inverse_normalizers()
                    run.each(lambda be, b: be.finalize(
                        b.acc, b.grad, run.of(a, b), run.of(b_, b), run.of(inv_z, b), j == 0, b.param, b.backup))
            if self.check_finite and run.scaler is None and self.max_grad_norm is None:
                # NaN/inf in any sample's gradient reaches the weighted sum (0 * inf is NaN too): one sum
                # of the final gradient catches it (a plain sum: a squared norm would overflow sooner)
                total = torch.stack([b.grad.sum(dtype=torch.float32).to(run.device) for b in layout.buckets]).sum()
                run.finite &= torch.isfinite(total)
        except BaseException:
            self._restore(layout, backed_up)
            raise
        finally:
            self._closure_index = None
        layout.end_step()
        losses = run.losses
        self.last_losses = losses
        tau0, tilt0 = run.tilt.taus[run.group0], run.tilts[run.group0]
        shifted = _shifted(losses, tau0)
        self.last_weights = torch.softmax(shifted, dim=0)
        if tilt0 > 0:  # (1/t) log mean exp(t L), shifted by max L (t * L may overflow fp32 for finite L)
            shifted = shifted if tau0 == tilt0 else _shifted(losses, tilt0)
            # log mean exp(x) as log1p(mean(expm1(x))): no cancellation for small t (x near 0)
            tilted = losses.max() + torch.log1p(torch.expm1(shifted).mean()) / tilt0
        else:
            tilted = losses.mean()
        if self.check_finite and not bool(run.finite):  # the step's one host sync; check_finite=False skips it
            for p in layout.params:
                p.grad = None
            raise NonFiniteLossError(
                f"a closure call of TSAM step {k} returned a non-finite loss or gradient "
                f"(sample losses {losses.tolist()}); the parameters were restored and the optimizer "
                "state is unchanged. Lower the learning rate, rho or radius, or check the data "
                "(check_finite=False lets non-finite values through).")
        if run.scaler is not None:
            run.mark_overflow()
            run.scaler.step(self.base_optimizer)  # unscale_ once; skips the update on inf/NaN
        else:
            self.base_optimizer.step()
        self._step_count += 1
        return tilted

    def _ascend(self, closure, run: "_Step") -> None:
        """``ascent``: theta <- theta + rho * P g / ||T g|| (P = T^2, T = |theta0| if adaptive; else 1)."""
        run.evaluate(closure)
        if self.adaptive:
            sq = run.global_sqnorm(lambda be, b: be.sqnorm(b.grad, b.backup))
        else:
            sq = run.global_sqnorm(lambda be, b: be.sqnorm(b.grad))
        ok = run.gradient_checked(sq)
        inv = 1.0 / (sq.sqrt() + _NORM_EPS)  # scale-free: a GradScaler's factor cancels
        if run.scaler is not None:  # an overflowed gradient gives no direction: stay at the random start
            inv = torch.where(ok, inv, 0.0)
            run.sanitize_grads()
        kicks = [group["rho"] * inv for group in self.param_groups]
        one = run.one
        run.each(lambda be, b: be.leapfrog(b.param, b.grad, run.of(kicks, b), one.to(b.device),
                                           precond=b.backup if self.adaptive else None))

    def _leapfrog(self, closure, run: "_Step", j: int) -> None:
        """``hmc``: v ~ N(0, sigma^2 I), then K kick-drift steps with the half kicks of neighbours merged."""
        mseed = rng.stream_seed(self.seed, run.k, j, rng.STREAM_MOMENTUM)
        sigma, alpha = run.scalar(self.hmc_sigma), run.scalar(self.hmc_step_size)
        run.each(lambda be, b: be.fill_noise(b.momentum, b.runs, mseed, sigma.to(b.device)))
        for step in range(self.hmc_steps):
            run.evaluate(closure)
            kick = run.scalar(self.hmc_step_size * (0.5 if step == 0 else 1.0))
            if run.scaler is not None:  # the kick uses the gradient's magnitude: unscale it
                ok = run.gradient_checked(torch.stack([b.grad.sum(dtype=torch.float32).to(run.device)
                                                       for b in run.buckets]).sum())
                kick = torch.where(ok, kick * run.inv_scale(), 0.0)
                run.sanitize_grads()
            run.each(lambda be, b: be.leapfrog(b.param, b.grad, kick.to(b.device), alpha.to(b.device),
                                               momentum=b.momentum))
        if run.scaler is None and self.check_finite:  # every kick went into v: one sum of v checks them all
            run.gradient_checked(torch.stack([b.momentum.sum(dtype=torch.float32).to(run.device)
                                              for b in run.buckets]).sum())

    def _restore(self, layout: FlatLayout, backed_up: bool) -> None:
        """Undo a step that failed mid-way: parameters back to theta0, no gradients left behind."""
        layout.active = False
        if backed_up:
            for b in layout.buckets:
                b.param.copy_(b.backup)
        for p in layout.params:
            p.grad = None


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


class _TiltState:
    """Online log-sum-exp of the tilt, per distinct weight temperature tau = t - delta (spec section 2).

    Kept in loss units so that no exponent overflows for finite losses: r is the loss at which tau L is
    largest so far (the max loss for tau >= 0, the min for tau < 0); r' = that after loss L;
    a = exp(tau (r - r')), e = exp(tau (L - r')) (both exponents <= 0); Z <- a Z + e; the accumulator
    update is A <- a A + e c g (c: the optional clip factor). Everything stays on the device.
    """

    def __init__(self, taus: List[float]):
        self.taus = taus  # per param group
        self.ref: Dict[float, torch.Tensor] = {}
        self.z: Dict[float, torch.Tensor] = {}

    def update(self, loss: torch.Tensor, clip: Optional[torch.Tensor]):
        """Fold in one sample's loss; returns the per-group (a, b) of ``A <- a A + b g``."""
        a_of, b_of = {}, {}
        for tau in set(self.taus):
            if tau not in self.ref:  # first sample: A is overwritten, a is unused
                self.ref[tau], self.z[tau] = loss, torch.ones_like(loss)
                a_of[tau], e = torch.zeros_like(loss), torch.ones_like(loss)
            elif tau == 0:  # plain average: every weight 1
                a_of[tau] = e = torch.ones_like(loss)
                self.z[tau] = self.z[tau] + 1
            else:
                ref = self.ref[tau]
                new = torch.maximum(ref, loss) if tau > 0 else torch.minimum(ref, loss)
                a_of[tau], e = torch.exp((ref - new) * tau), torch.exp((loss - new) * tau)
                self.ref[tau], self.z[tau] = new, self.z[tau] * a_of[tau] + e
            b_of[tau] = e if clip is None else e * clip
        return [a_of[t] for t in self.taus], [b_of[t] for t in self.taus]

    def inverse_normalizers(self) -> List[torch.Tensor]:
        return [1.0 / self.z[t] for t in self.taus]


def _async_to(device: torch.device) -> bool:
    """Copies to an accelerator may be asynchronous; a copy to the CPU must not be (the CPU reads it next)."""
    return device.type != "cpu"


def _shifted(losses: torch.Tensor, tau: float) -> torch.Tensor:
    """tau * (L - r) with r the loss maximising tau * L: softmax-equivalent to tau * L, never overflowing."""
    if tau == 0:
        return torch.zeros_like(losses)
    return (losses - (losses.max() if tau > 0 else losses.min())) * tau


class _Step:
    """What one TSAM step needs at hand: buckets and their backends, scalars, losses, the tilt state."""

    def __init__(self, opt: TSAM, layout: FlatLayout):
        self.opt, self.layout = opt, layout
        self.buckets = layout.buckets
        self.backends = {b.device: opt._backend_for(b.device) for b in self.buckets}
        self.device = self.buckets[0].device  # where the step's scalars live
        self.k = opt._step_count
        self.group0 = self.buckets[0].group_index
        for i, group in enumerate(opt.param_groups):  # values a scheduler or user may have written since
            for key in ("rho", "radius"):
                _check_number(f"param_groups[{i}] {key}", group[key])
        self.tilts = [opt._tilt_at(group) for group in opt.param_groups]
        self.tilt = _TiltState([t - opt.delta for t in self.tilts])
        self.losses = torch.empty(opt.num_samples, dtype=torch.float32, device=self.device)
        self.group, self.world = _loss_group(opt.process_group)
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.one = self.scalar(1.0)
        scaler = opt.grad_scaler
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.overflow = torch.zeros((), dtype=torch.bool, device=self.device)

    def gradient_checked(self, value: torch.Tensor) -> Optional[torch.Tensor]:
        """Record whether a gradient statistic is finite: the scaler's skip with a GradScaler (returns the
        flag), an error with check_finite; nothing (no extra ops) otherwise."""
        if self.scaler is not None:
            ok = torch.isfinite(value)
            self.overflow |= ~ok
            return ok
        if self.opt.check_finite:
            self.finite &= torch.isfinite(value)
        return None

    def inv_scale(self) -> torch.Tensor:
        """1 / the GradScaler's current scale, on the step's device (set once the closure has scaled a loss)."""
        scale = self.scaler._get_scale_async()
        if scale is None:
            raise RuntimeError("grad_scaler was given but the closure never called scaler.scale(loss): "
                               "backpropagate scaler.scale(loss) and return the unscaled loss")
        return 1.0 / scale.to(self.device, torch.float32)

    def sanitize_grads(self) -> None:
        """Overflowed gradient entries to 0 before they move the parameters (GradScaler mode only)."""
        for b in self.buckets:
            b.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def mark_overflow(self) -> None:
        """Make an overflow seen at an ascent/leapfrog gradient visible to the scaler's inf check: a NaN
        in one element of the final gradient when (and only when) it happened. No host sync."""
        # a parameter the scaler will look at: one with a gradient this step (the others have grad None)
        p = next((p for p in self.layout.params if p.grad is not None and p.grad.numel()), None)
        if p is not None:
            flag = self.overflow.to(p.device, non_blocking=_async_to(p.device))
            p.grad[(0,) * p.grad.dim()].add_(torch.where(flag, float("nan"), 0.0).to(p.grad.dtype))

    def each(self, op) -> None:
        for b in self.buckets:
            op(self.backends[b.device], b)

    @staticmethod
    def of(per_group: List[torch.Tensor], bucket) -> torch.Tensor:
        """A bucket's value of a per-group device scalar, on the bucket's device."""
        return per_group[bucket.group_index].to(bucket.device, non_blocking=_async_to(bucket.device))

    def scalar(self, x: float) -> torch.Tensor:
        return torch.full((), x, dtype=torch.float32, device=self.device)

    def global_sqnorm(self, op) -> torch.Tensor:
        """Sum of a per-bucket squared norm over all buckets (one norm over all trainable parameters)."""
        parts = [op(self.backends[b.device], b).to(self.device, non_blocking=_async_to(self.device))
                 for b in self.buckets]
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum()

    def start_coefficients(self, j: int):
        """Seed and per-group coefficient c of sample j's random start theta0 + c * xi."""
        opt = self.opt
        if opt.start == "none":
            return None, [self.scalar(0.0)] * len(opt.param_groups)
        seed = rng.stream_seed(opt.seed, self.k, j, rng.STREAM_START)
        norm = self.global_sqnorm(lambda be, b: be.noise_sqnorm(b.runs, seed, b.device)).sqrt().clamp_min(1e-30)
        if opt.start == "ball":  # radius r * u^(1/d), u ~ U(0, 1) drawn on the host from its own stream
            u = rng.host_uniform(rng.stream_seed(opt.seed, self.k, j, rng.STREAM_RADIUS))
            shrink = rng.log_uniform_radius(u, self.layout.trainable_numel)
        coefs = []
        for group in opt.param_groups:
            r = group["radius"]
            if opt.start == "gaussian":  # noise_scale * xi, clipped to norm r
                coefs.append(torch.clamp_max(r / norm, opt.noise_scale))
            elif opt.start == "sphere":
                coefs.append(r / norm)
            else:
                coefs.append(r * shrink / norm)
        return seed, coefs

    def evaluate(self, closure) -> torch.Tensor:
        """One closure call at the current parameters: gradients zeroed first, loss validated."""
        opt, layout = self.opt, self.layout
        layout.begin_call()
        with torch.enable_grad():
            loss = closure()
        opt._closure_index += 1
        if loss is None:
            raise ValueError("the closure returned None: it must return the loss (after calling loss.backward())")
        if not isinstance(loss, torch.Tensor):
            if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
                loss = torch.tensor(float(loss))
            else:
                raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}; "
                             "reduce it (e.g. .mean()) before backward")
        if not loss.is_floating_point():
            raise TypeError(f"the closure returned a {loss.dtype} loss; return the floating-point loss tensor")
        if not layout.end_call():
            raise RuntimeError(
                "no parameter received a gradient during the closure: it must call loss.backward() (TSAM "
                "zeroes gradients before each call itself), on a loss computed from the parameters TSAM was "
                "given. If the model's parameters were replaced after TSAM was constructed "
                "(load_state_dict(..., assign=True), module.to(...) onto another device, re-created layers), "
                "construct TSAM again on model.parameters().")
        # a copy: the closure may return (and later overwrite) a buffer of its own
        loss = loss.detach().reshape(()).to(device=self.device, dtype=torch.float32, copy=True,
                                            non_blocking=_async_to(self.device))
        if opt.check_finite:
            self.finite &= torch.isfinite(loss)
        return loss
