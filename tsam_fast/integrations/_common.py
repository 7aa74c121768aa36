"""What the three trainer integrations share, framework-free: the TSAM a trainer finishes with its own
``optimizer.step()``, the cut of a batch into micro-batches, and the step's evaluation loop over them.

Every integration runs the same shape of step (README, "Trainers"): the closure-free loop
(``TSAM.begin_step``), where each evaluation runs the forward and backward of every micro-batch -- gradient
accumulation inside the evaluation, all but the last micro-batch under the framework's ``no_sync`` -- and
records the evaluation's loss. Only the backward call, the ``no_sync`` and who calls ``finish`` differ.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from typing import Any, Callable, ContextManager, List, Optional, Sequence, Tuple

import torch

from ..engine import Evaluation, StepRun
from ..optimizer import TSAM

EXTRA = 'pip install "tsam_fast[integrations]"'


def require(package: str, integration: str):
    """Import ``package`` for ``tsam_fast.integrations.<integration>``, or say which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"tsam_fast.integrations.{integration} needs the {package!r} package, which could not be "
                          f"imported ({exc}); install the trainers with {EXTRA}") from exc


class TrainerTSAM(TSAM):
    """TSAM for trainers that run the backward passes themselves and then call ``optimizer.step()`` (the
    ``transformers.Trainer`` after its gradient clipping, Lightning's optimizer wrapper and precision plugin,
    a ``GradScaler``): the integration evaluates the step -- ``begin_step()``, every evaluation recorded --
    and hands the run to :meth:`finish_on_step`; the trainer's next ``step()`` finishes it (the base
    optimizer's update from theta0). A closure passed to that call (Lightning's precision plugin passes one
    that runs its ``on_before_optimizer_step`` hooks) is called once, before the update; the hooks then see
    the tilted gradient. Without a step waiting, ``step(closure)`` is TSAM's own.

    With a ``grad_scaler`` (fp16), the base step is ``grad_scaler.step(base_optimizer)``: the scaler
    unscales the tilted gradient once and skips the update on an overflow, an ascent evaluation's included.
    A trainer's own ``GradScaler.step(opt)`` must then neither unscale this optimizer first nor skip its
    ``step()``: ``_step_supports_amp_scaling`` (torch's protocol for optimizers that handle the scaling,
    which Lightning's plugin honours) says so. Constructed exactly as :class:`TSAM`; state dicts are
    interchangeable with it.
    """

    _waiting: Optional[StepRun] = None

    @property
    def _step_supports_amp_scaling(self) -> bool:
        return self.grad_scaler is not None

    def finish_on_step(self, run: StepRun) -> None:
        """Make the next :meth:`step` finish ``run``, a step of this optimizer whose evaluations are all
        recorded."""
        if run.session is not self._session or run.state != "evaluated":
            got = "a step of another optimizer" if run.session is not self._session else f"a step that was {run.state}"
            run.fail()
            raise RuntimeError(f"finish_on_step takes a fully recorded step of this optimizer (got {got}); it was "
                               "abandoned: parameters restored to theta0")
        self._waiting = run

    @torch.no_grad()
    def step(self, closure=None):
        run, self._waiting = self._waiting, None
        if run is None:
            if closure is None and not self._initializing_state():
                raise RuntimeError(f"{type(self).__name__}.step() without a closure finishes the step a trainer "
                                   "integration evaluated (finish_on_step), and none is waiting: run the "
                                   "integration's training step first, or pass a closure as to TSAM.step")
            return super().step(closure)
        if closure is not None:
            with torch.enable_grad():
                closure()
        return run.finish()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_waiting", None)  # a step in progress is not copied (as TSAM's own)
        return state


def tsam_of(optimizer, integration: str) -> TSAM:
    """The TSAM inside a trainer's optimizer wrapper (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``: each holds it as ``.optimizer``, which TSAM itself has not), or ``optimizer``."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, TSAM):
        raise TypeError(f"tsam_fast.integrations.{integration} drives a TSAM optimizer; got "
                        f"{type(inner).__name__} (build it with tsam_fast.TSAM(model.parameters(), "
                        "torch.optim.SGD, ...))")
    return inner


def use_scaler(tsam: TSAM, scaler) -> None:
    """The trainer scales every backward's loss with ``scaler`` (fp16): TSAM must measure and unscale with
    the same one (ascent normalisation, clipping, the overflow skip). Attached on first use; another scaler
    already given to TSAM is an error."""
    if scaler is None or not scaler.is_enabled():
        return
    if tsam.grad_scaler is scaler:
        return
    if tsam.grad_scaler is not None:
        raise ValueError("TSAM was constructed with a grad_scaler other than the trainer's, which scales the "
                         "losses: leave TSAM's grad_scaler unset, the integration attaches the trainer's")
    tsam.grad_scaler = scaler
    try:  # what TSAM checks of its parameters under a scaler at construction (no FSDP2 shards)
        for gi, group in enumerate(tsam.param_groups):
            for pi, p in enumerate(group["params"]):
                tsam._check_new_parameter(p, gi, pi)
    except Exception:
        tsam.grad_scaler = None
        raise


# -- micro-batches -----------------------------------------------------------------------------------


def _tensors(batch) -> List[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _rows(batch, start: int, stop: int):
    """``batch`` with every tensor cut to rows [start, stop) (views); other leaves as they are."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() else batch
    if isinstance(batch, Mapping):
        rows = {k: _rows(v, start, stop) for k, v in batch.items()}
        if type(batch) is dict:
            return rows
        try:  # a dict subclass (HF's BatchEncoding, an OrderedDict) keeps its type where it can
            return type(batch)(rows)
        except TypeError:
            return rows
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_rows(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_rows(v, start, stop) for v in batch)
    return batch


def split_batch(batch, micro_batches: int) -> List[Tuple[Any, float]]:
    """``batch`` (a tensor, or lists, tuples and dicts of them) cut along the first dimension into at most
    ``micro_batches`` consecutive parts, as ``torch.chunk`` cuts (a short last batch gives fewer), each with
    its weight: its share of the rows. A micro-batch's mean loss times its weight summed over the parts is
    the whole batch's mean loss, which is what each TSAM evaluation needs."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer (got {micro_batches!r})")
    if micro_batches == 1:
        return [(batch, 1.0)]
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim()}
    if len(sizes) != 1:
        raise ValueError("to cut a batch into micro-batches its tensors must share their first dimension (the "
                         f"rows); found first dimensions {sorted(sizes) or 'none'}. Pass micro_batches=1, or a "
                         "batch of tensors with one row per example")
    n = sizes.pop()
    size = -(-n // micro_batches)  # torch.chunk's part size
    return [(_rows(batch, start, min(start + size, n)), (min(start + size, n) - start) / n)
            for start in range(0, n, size)]


# -- the step's evaluations ---------------------------------------------------------------------------


def evaluate_step(tsam: TSAM, parts: Sequence, evaluate_part: Callable[[Any, bool], torch.Tensor],
                  no_sync: Callable[[], ContextManager],
                  on_evaluation: Optional[Callable[[Evaluation], None]] = None) -> StepRun:
    """Begin a step of ``tsam`` and run each of its evaluations over the micro-batches ``parts``:
    ``evaluate_part(part, backward)`` runs one micro-batch's forward -- and its backward when ``backward`` --
    and returns its detached loss; the evaluation's loss, recorded, is their sum. All micro-batches of a
    backward evaluation but the last run under ``no_sync()`` (no gradient all-reduce under DDP).
    ``on_evaluation(ev)`` is called as each evaluation begins. Returns the run, fully recorded: call
    ``finish()`` (or hand it to :meth:`TrainerTSAM.finish_on_step`). An exception abandons the step
    (parameters back at theta0)."""
    run = tsam.begin_step()
    last = len(parts) - 1
    for ev in run:
        if on_evaluation is not None:
            on_evaluation(ev)
        total = None
        for i, part in enumerate(parts):
            with no_sync() if ev.backward and i < last else contextlib.nullcontext():
                loss = evaluate_part(part, ev.backward)
            total = loss if total is None else total + loss
        run.record(total)
    return run


def weighted_loss(loss_fn: Callable[[Any], torch.Tensor], backward: Callable[[torch.Tensor], Any]):
    """``evaluate_part`` for :func:`evaluate_step` over :func:`split_batch`'s parts, from a loss function and
    the framework's backward: the micro-batch's loss times its weight, backpropagated; forward only, under
    ``torch.no_grad()``, for an evaluation that needs no backward (``backward_samples``' scoring)."""
    def evaluate_part(part, needs_backward: bool) -> torch.Tensor:
        micro_batch, weight = part
        if not needs_backward:
            with torch.no_grad():
                return _scalar_loss(loss_fn(micro_batch)) * weight
        loss = _scalar_loss(loss_fn(micro_batch)) * weight
        backward(loss)
        return loss.detach()
    return evaluate_part


def _scalar_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return the micro-batch's loss as a one-element tensor (got "
                        f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)})")
    return loss
