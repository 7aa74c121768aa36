"""TSAM's options, each declared once (docs/design.md §8).

``OPTIONS`` is the one table of the options ``TSAM`` takes besides the base optimizer's: name, default,
check, where it lives (``scope``), the section of the docs it belongs to, and its two texts (``doc`` for
the docstring, ``brief`` for the README's table). Generated from it: the constructor's validation
(:func:`validate`), the option fields of ``tsam_fast.engine.StepConfig`` (scope ``"step"``), the options
section of ``TSAM``'s docstring (:func:`docstring`) and the README's options table (:func:`markdown`,
checked by tests/test_options.py, which also checks ``TSAM.__init__``'s signature against the table).
Adding an option is a row here plus the variant module that uses it (``tsam_fast/engine/moves/``).

This module imports nothing of tsam_fast when it is imported: the API and the engine both read it.
"""

from __future__ import annotations

import math
import numbers
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["Option", "OPTIONS", "SAMPLERS", "STARTS", "validate", "check_number", "check_int", "check_choice",
           "docstring", "markdown", "by_scope"]

SAMPLERS = ("ascent", "random", "hmc")
STARTS = ("gaussian", "sphere", "ball", "none")
RADIUS_MODES = ("absolute", "relative")
SELECTS = ("sample", "top")
BACKENDS = ("auto", "reference", "cpp", "triton")


# -- checks: each returns the value normalised, or raises ValueError naming the option -------------------


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


def _number(**kw) -> Callable:
    return lambda name, value: check_number(name, value, **kw)


def _int(low: int, allow_none: bool = False) -> Callable:
    return lambda name, value: None if value is None and allow_none else check_int(name, value, low)


def _choice(choices) -> Callable:
    return lambda name, value: check_choice(name, value, choices)


def _flag(name, value) -> bool:
    return bool(value)


def _tilt(name, value):
    return value if callable(value) else check_number(name, value)


def _seed(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"invalid {name}={value!r}: expected an integer")
    return int(value)


def _backend(name, value):
    from .backends.base import Backend  # an object implementing the op contract is taken as it is
    return value if isinstance(value, Backend) else check_choice(name, value, BACKENDS)


def _scaler(name, value):
    import torch
    if value is not None and not isinstance(value, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler (got {type(value).__name__})")
    return value


def _as_is(name, value):
    return value


def _shard_buffers(name, value):
    return None if value is None else check_choice(name, value, ("auto", "packed", "in_place"))


# -- rules between options: each returns an error message, or None --------------------------------------


def _needs_ascent(option: str, what: str) -> Callable[[Dict[str, Any]], Optional[str]]:
    def rule(v):
        if v[option] and v["sampler"] != "ascent":
            return f"{option}=True {what}; it needs sampler='ascent' (got {v['sampler']!r})"
        return None
    return rule


def _backward_samples_rule(v) -> Optional[str]:
    k = v["backward_samples"]
    if k is None:
        return None
    if not (v["sampler"] == "random" or v["shared_ascent"]):
        return ("backward_samples scores the samples with forward passes only, but sampler="
                f"{v['sampler']!r} needs a gradient at every sample's start; use sampler='random', or "
                "sampler='ascent' with shared_ascent=True")
    if v["backward_select"] == "top" and k > v["num_samples"]:
        return (f"backward_select='top' backpropagates the {k} highest-weight of {v['num_samples']} samples: "
                "backward_samples must be <= num_samples")
    return None


# -- the table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option: ``scope`` is ``"group"`` (a param-group key a group may override), ``"step"`` (a field of
    the engine's ``StepConfig``) or ``"optimizer"`` (an attribute of the optimizer)."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    scope: str
    section: str
    doc: str
    brief: str
    rule: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None
    readme: bool = True  # listed in the README's table (not a deprecated one)


OPTIONS: Tuple[Option, ...] = (
    # the tilt
    Option("tilt", 1.0, _tilt, "group", "tilt",
           "t >= 0, or a callable ``step -> t`` (``tsam_fast.schedules``). 0 averages the samples' gradients; "
           "large t approaches the worst sample's gradient (SAM's objective).",
           "t ≥ 0, or a schedule `step → t` (`linear_warmup`, `linear_decay`, `LinearTilt`). Per group"),
    Option("delta", 0.0, _number(), "step", "tilt",
           "the weights use ``softmax((t - delta) * L)`` (the paper's correction when the sampler is already "
           "tilted by delta); the reported tilted loss uses t.",
           "weights use softmax((t − δ)·L)"),
    # the samples
    Option("num_samples", 3, _int(1), "step", "samples", "s >= 1 perturbations per step.",
           "s perturbations per step"),
    Option("sampler", "ascent", _choice(SAMPLERS), "step", "samples",
           "``\"ascent\"`` (random start, then one normalized ascent step of length ``rho``: 2 evaluations per "
           "sample), ``\"random\"`` (the random start only: 1) or ``\"hmc\"`` (random start, then ``hmc_steps`` "
           "leapfrog steps: 1 + hmc_steps).",
           "`\"ascent\"`: random start, then one normalised ascent step of length `rho` (2 evaluations per "
           "sample); `\"random\"`: the start only (1); `\"hmc\"`: `hmc_steps` leapfrog steps (1 + hmc_steps)"),
    Option("start", "gaussian", _choice(STARTS), "step", "samples",
           "random start over all trainable parameters jointly: ``\"gaussian\"`` (noise_scale * xi clipped to "
           "norm ``radius``), ``\"sphere\"`` (norm exactly ``radius``), ``\"ball\"`` (uniform in the ball of "
           "radius ``radius``) or ``\"none\"``.",
           "random start over all trainable parameters jointly: `\"gaussian\"` (noise_scale·ξ clipped to norm "
           "`radius`), `\"sphere\"`, `\"ball\"`, `\"none\"`"),
    Option("radius", 1.0, _number(), "group", "samples", "r, the random start's L2 norm (per group).",
           "the start's L2 norm (per group). Too small and the samples' losses are equal: the tilt has nothing "
           "to act on (watch `opt.last_ess`)"),
    Option("radius_mode", "absolute", _choice(RADIUS_MODES), "step", "samples",
           "``\"absolute\"`` (the paper's code): ``radius`` is a length. ``\"relative\"``: a fraction of "
           "``||theta0||``, the L2 norm of all trainable parameters as the step begins (``radius=0.01`` moves "
           "them by 1%; one more reduction per step, packed with the first start's).",
           "`\"relative\"`: `radius` is a fraction of ‖θ0‖"),
    Option("noise_scale", 1.0, _number(), "step", "samples", "the Gaussian start's scale.",
           "the Gaussian start's scale"),
    # the ascent sampler
    Option("rho", 0.05, _number(), "group", "ascent", "the ascent step's length (per group).",
           "ascent step length (per group)"),
    Option("adaptive", False, _flag, "step", "ascent",
           "ASAM-style ascent, scaled element-wise by ``|theta0|``.", "ASAM-style ascent ρ·T²g/‖Tg‖, T = \\|θ0\\|",
           rule=_needs_ascent("adaptive", "scales the ascent step")),
    # the hmc sampler
    Option("hmc_steps", 1, _int(1), "step", "hmc", "K leapfrog steps per sample.", "leapfrog steps K"),
    Option("hmc_step_size", 0.01, _number(), "step", "hmc", "the leapfrog step size alpha.", "leapfrog step size"),
    Option("hmc_sigma", 1.0, _number(), "step", "hmc", "the momentum's scale sigma.", "momentum scale"),
    # fewer passes (beyond the paper, docs/design.md §9)
    Option("shared_ascent", False, _flag, "step", "fewer passes",
           "one gradient at theta0 itself (role ``\"origin\"``) gives the normalised ascent step every sample "
           "shares, ``theta_j = theta0 + rho g0/||g0|| + eps_j``: s + 1 evaluations per step instead of 2s. Its "
           "loss and gradient norm, plain ERM's, are kept as ``last_origin_loss`` / ``last_grad_norm``. One more "
           "parameter-sized buffer.",
           "one gradient at θ0 gives the ascent step all samples share (s + 1 evaluations)",
           rule=_needs_ascent("shared_ascent", "shares the ascent step of sampler='ascent'")),
    Option("backward_samples", None, _int(1, allow_none=True), "step", "fewer passes",
           "K: score the s samples with forward passes only (role ``\"score\"``, under ``torch.no_grad()``), "
           "then backpropagate K of them drawn from softmax(t L), each weighted 1/K (the expected gradient is "
           "the tilted one); ``random`` sampler, or ``ascent`` with ``shared_ascent``. One host read per step "
           "(the weights). The closure takes a ``backward`` argument: ``def closure(backward=True): ...``; in "
           "the closure-free loop, ``ev.backward`` says it.",
           "score the samples by forwards, backpropagate K drawn from the tilt weights",
           rule=_backward_samples_rule),
    Option("backward_select", "sample", _choice(SELECTS), "step", "fewer passes",
           "``\"sample\"`` (the unbiased draw) or ``\"top\"`` (the K samples of largest weight, weighted by "
           "their renormalised weights: deterministic, biased towards the worst samples; K = s is exact).",
           "`\"top\"`: the K of largest weight instead of a draw"),
    Option("tilt_every", 1, _int(1), "step", "fewer passes",
           "k (in the spirit of LookSAM): the full step every k-th step, with one more evaluation at theta0 "
           "(role ``\"origin\"``) whose gradient g0 splits the tilted gradient G = beta g0 + v (beta = "
           "G.g0/||g0||^2, v orthogonal to g0); beta and v/||g0|| are cached (one more parameter-sized buffer) "
           "and the k - 1 steps between evaluate theta0 once and step with ``beta g + (||g|| / ||g0||) v`` (G "
           "itself when g = g0). Not in the state_dict: after a load the next step is full.",
           "the full step every k-th step; the others take one pass plus the cached tilted correction"),
    # numerics
    Option("max_grad_norm", None, _number(allow_none=True, strict=True), "step", "numerics",
           "clip each sample's gradient to this global norm before it is accumulated.",
           "clip each sample's gradient to this global norm"),
    Option("check_finite", True, _flag, "step", "numerics",
           "raise :class:`NonFiniteLossError` (and undo the step) when a loss or gradient is NaN/inf: one flag "
           "read on the host at the end of each step (and, unless ``max_grad_norm`` measures every sample's "
           "gradient, one sum of the final gradient). ``False``: no host read at all on one process. With "
           "``grad_scaler``, gradient overflow is the scaler's (the step is skipped, not raised).",
           "raise `NonFiniteLossError` and undo the step on NaN/inf: one host read per step. `False`: no host "
           "read at all"),
    Option("grad_scaler", None, _scaler, "optimizer", "numerics",
           "a ``torch.amp.GradScaler`` for fp16: the closure backpropagates ``scaler.scale(loss)`` and returns "
           "the unscaled loss; the step ends with ``scaler.step(base_optimizer)`` and the caller runs "
           "``scaler.update()``. An overflowed ascent or leapfrog gradient never moves the parameters.",
           "a `torch.amp.GradScaler` for fp16 (below)"),
    # the run
    Option("seed", 0, _seed, "optimizer", "run",
           "the noise seed: with the step counter it fixes every perturbation (saved in the state_dict).",
           "noise seed: with the step counter it fixes every perturbation"),
    Option("backend", "auto", _backend, "optimizer", "run",
           "``\"auto\"``, ``\"reference\"``, ``\"cpp\"`` or ``\"triton\"`` (``tsam_fast.backend_info()``), or a "
           "``tsam_fast.backends.Backend`` object (an op-contract implementation of one's own).",
           "`\"reference\"`, `\"cpp\"` (CPU), `\"triton\"` (CUDA); `auto` picks per (device, dtype)"),
    Option("process_group", "auto", _as_is, "optimizer", "run",
           "data parallelism (docs/design.md §6): each sample's loss is averaged over this group's ranks (one "
           "all-reduce per sample, no host sync on NCCL) so that every rank derives the same weights; on FSDP2 "
           "the norms' shard sums travel in it. ``\"auto\"``: the default group when torch.distributed is "
           "initialised; ``None``: never all-reduce.",
           "data parallelism: each sample's loss averaged over these ranks (default group when initialised)"),
    Option("shard_buffers", None, _shard_buffers, "optimizer", "run", "deprecated, no effect.", "", readme=False),
)

_BY_NAME = {o.name: o for o in OPTIONS}
SECTIONS = ("tilt", "samples", "ascent", "hmc", "fewer passes", "numerics", "run")


def by_scope(scope: str) -> Tuple[Option, ...]:
    return tuple(o for o in OPTIONS if o.scope == scope)


def validate(values: Dict[str, Any]) -> Dict[str, Any]:
    """Every option checked and normalised, then the rules between them (the first error raises)."""
    out = {o.name: o.check(o.name, values.get(o.name, o.default)) for o in OPTIONS if o.name in values}
    merged = {o.name: o.default for o in OPTIONS}
    merged.update(out)
    for o in OPTIONS:
        if o.rule is not None:
            error = o.rule(merged)
            if error is not None:
                raise ValueError(error)
    return out


def docstring(indent: str = "        ") -> str:
    """The options part of ``TSAM``'s Args section, by section, from the table."""
    lines: List[str] = []
    for section in SECTIONS:
        for o in OPTIONS:
            if o.section == section:
                text = f"{o.name}: {o.doc}"
                lines += textwrap.wrap(text, 108, initial_indent=indent, subsequent_indent=indent + "    ")
    return "\n".join(lines)


def _default_text(o: Option) -> str:
    return "off" if o.default is None and o.section == "fewer passes" else f"`{o.default!r}`".replace("'", '"')


def markdown() -> str:
    """The README's options table, from the table."""
    rows = ["| option | default | what |", "|---|---|---|"]
    for section in SECTIONS:
        rows += [f"| `{o.name}` | {_default_text(o)} | {o.brief} |" for o in OPTIONS
                 if o.section == section and o.readme]
    return "\n".join(rows)


def option(name: str) -> Option:
    return _BY_NAME[name]


def names() -> Tuple[str, ...]:
    return tuple(_BY_NAME)


_BEGIN, _END = "<!-- options table: python scripts/options_table.py -->", "<!-- end of options table -->"


def with_table(text: str) -> str:
    """``text`` (the README) with the options table between its markers regenerated from ``OPTIONS``."""
    head, sep, rest = text.partition(_BEGIN)
    _, sep2, tail = rest.partition(_END)
    if not (sep and sep2):
        raise ValueError(f"no options table markers ({_BEGIN} ... {_END}) in the text")
    return f"{head}{_BEGIN}\n{markdown()}\n{_END}{tail}"

