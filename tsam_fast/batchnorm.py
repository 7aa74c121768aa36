"""Batch norm under TSAM: which forwards of a step update the running statistics (docs/design.md §8.1).

A TSAM step runs 2s forwards (``ascent``; s for ``random``, s(1 + K) for ``hmc``) at perturbed points; left
alone, a batch-norm layer folds every one of them into its running statistics. Two policies, by name:

``"once_per_step"`` -- :func:`bn_update_once_per_step`
    Only the step's first evaluation updates the running statistics: one update per step, as ERM makes
    and as davda54/sam's example intends (its momentum-0 trick freezes the second forward's update).
    ``num_batches_tracked`` rises by 1 per step, so ``momentum=None`` (the cumulative average) stays the
    exact average over steps.

``"per_sample"`` -- :func:`bn_update_per_sample` (the TSAM authors' loop)
    The first evaluation of each sample j updates ``running_mean``/``running_var`` (s updates per step);
    the sample's later evaluations (its ``sample`` evaluation after an ascent, its later leapfrogs, with
    ``backward_samples`` the backward at a drawn sample it scored before; with ``shared_ascent`` the
    evaluation at theta0 counts as sample 0's first) leave them unchanged. Like the authors' momentum-0 trick, every training forward still counts in
    ``num_batches_tracked`` (2s per ``ascent`` step), which also sets the weight 1/num_batches_tracked of
    ``momentum=None``: the statistics match that loop's bit for bit.

``"every_forward"`` installs nothing: every forward updates (what a bare model does).

How: in a forward that must not update, the layer normalizes with the batch's statistics as always but
writes into throw-away copies of its running buffers, and the real buffers are put back after the forward.
(Swapping rather than copying back matters: autograd saved the buffers the forward used, so they must not
change in place.) The evaluation in progress comes from ``optimizer.closure_index``, so the policies work
the same under ``step(closure)`` and the closure-free ``begin_step()`` loop, and every forward of an
evaluation (micro-batches of gradient accumulation) is treated alike. Forwards outside a step
(evaluation, other optimizers) and in eval mode are not affected::

    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    handle = bn_running_stats(model, opt, "per_sample")   # or bn_update_once_per_step(model, opt)
    handle.remove()                                       # undoes it
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .optimizer import TSAM

__all__ = ["BN_POLICIES", "bn_running_stats", "bn_update_once_per_step", "bn_update_per_sample"]

BN_POLICIES = ("once_per_step", "per_sample", "every_forward")
_STATS = ("running_mean", "running_var")
_COUNT = "num_batches_tracked"


class _Handles:
    def __init__(self, handles: List, unregister: Optional[Callable[[], None]] = None):
        self._handles = handles
        self._unregister = unregister

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._unregister is not None:
            self._unregister()


def _tsam_of(optimizer, caller: str) -> TSAM:
    """The TSAM instance behind a trainer's wrapper (Lightning's LightningOptimizer, Accelerate's
    AcceleratedOptimizer both keep it as ``.optimizer``)."""
    opt = optimizer
    for _ in range(4):
        if isinstance(opt, TSAM):
            return opt
        opt = getattr(opt, "optimizer", None)
    raise TypeError(f"{caller}: expected the TSAM optimizer (or a trainer's wrapper of it), got "
                    f"{type(optimizer).__name__}")


def _install(model: nn.Module, optimizer: TSAM, caller: str, frozen: Callable[[int], bool],
             buffers: Tuple[str, ...]) -> _Handles:
    """Hooks that, in a training forward of evaluation ``index`` with ``frozen(index)``, redirect ``buffers``
    to throw-away copies; and the running statistics as the step began, for ``TSAM.unperturbed()``."""
    stash = {}
    start = dict(run=None, values={})  # the step (weakly) and its layers' statistics before its first forward

    def before(module, args):
        index = optimizer.closure_index
        if module.training and index is not None:
            run = optimizer.step_in_progress
            if start["run"] is None or start["run"]() is not run:
                start.update(run=weakref.ref(run), values={})
            if module not in start["values"]:
                start["values"][module] = {n: getattr(module, n).clone() for n in _STATS + (_COUNT,)
                                           if getattr(module, n, None) is not None}
        if module.training and index is not None and frozen(index):
            real = {n: getattr(module, n) for n in buffers if getattr(module, n, None) is not None}
            stash[module] = real
            for name, buf in real.items():
                setattr(module, name, buf.clone())

    def after(module, args, output):
        for name, buf in stash.pop(module, {}).items():
            setattr(module, name, buf)

    @contextlib.contextmanager
    def at_step_start():
        """The running statistics as the step began, for the duration (whatever object the layer holds
        now: inside a frozen forward, its throw-away copies), then back as they were."""
        run = optimizer.step_in_progress
        values = start["values"] if run is not None and start["run"] is not None and start["run"]() is run else {}
        now = []
        with torch.no_grad():
            for module, saved in values.items():
                for name, value in saved.items():
                    buf = getattr(module, name).data  # quiet: a forward's backward may have saved it
                    now.append((buf, buf.clone()))
                    buf.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, value in now:
                    buf.copy_(value)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, always_call=True))
    if not handles:
        raise ValueError(f"{caller}: the model has no batch-norm layer that tracks running stats")
    return _Handles(handles, optimizer.register_step_start_state(at_step_start))


def bn_update_once_per_step(model: nn.Module, optimizer) -> _Handles:
    """Policy ``"once_per_step"``: only the first evaluation of each TSAM step updates the running statistics
    (and ``num_batches_tracked``)."""
    opt = _tsam_of(optimizer, "bn_update_once_per_step")
    return _install(model, opt, "bn_update_once_per_step", lambda index: index > 0, _STATS + (_COUNT,))


def bn_update_per_sample(model: nn.Module, optimizer) -> _Handles:
    """Policy ``"per_sample"`` (the TSAM authors' loop): the first evaluation of each sample updates the
    running mean and variance; every training forward counts in ``num_batches_tracked``."""
    opt = _tsam_of(optimizer, "bn_update_per_sample")

    def revisit(index: int) -> bool:  # an earlier evaluation of this step was already at sample j's points
        evaluations = opt.step_in_progress.plan  # the live step's plan: samples drawn by backward_samples filled in
        j = evaluations[index].sample
        return any(ev.sample == j for ev in evaluations[:index])
    return _install(model, opt, "bn_update_per_sample", revisit, _STATS)


def bn_running_stats(model: nn.Module, optimizer, policy: str) -> _Handles:
    """Install a batch-norm policy by name: ``"once_per_step"``, ``"per_sample"`` (the authors') or
    ``"every_forward"`` (nothing installed)."""
    if policy == "once_per_step":
        return bn_update_once_per_step(model, optimizer)
    if policy == "per_sample":
        return bn_update_per_sample(model, optimizer)
    if policy == "every_forward":
        _tsam_of(optimizer, "bn_running_stats")
        return _Handles([])
    raise ValueError(f"invalid policy={policy!r}: expected one of {', '.join(map(repr, BN_POLICIES))}")
