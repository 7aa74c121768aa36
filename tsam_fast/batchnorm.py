"""Batch norm under TSAM: running statistics update once per optimizer step.

A TSAM step runs the closure 2*s times (``ascent``); left alone, batch-norm layers would fold every
perturbed forward into their running statistics. The reference code lets only the first forward of
each step update them; :func:`bn_update_once_per_step` does the same, exactly, for any momentum
setting (including ``momentum=None``'s cumulative average): in every later closure call of a step the
layers still normalize with the batch's statistics, but they update throw-away copies of their
running buffers, and the real buffers are put back after the forward. (Swapping rather than copying
back matters: autograd saved the buffers the forward used, so they must not change in place.)

    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    handle = bn_update_once_per_step(model, opt)   # handle.remove() undoes it

Forwards outside ``opt.step`` (evaluation, other optimizers) are not affected.
"""

from __future__ import annotations

from typing import List

from torch import nn

__all__ = ["bn_update_once_per_step"]

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Handles:
    def __init__(self, handles: List):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def bn_update_once_per_step(model: nn.Module, optimizer) -> _Handles:
    """Let batch-norm running statistics update only in the first closure call of each TSAM step."""
    stash = {}

    def before(module, args):
        index = optimizer.closure_index
        if module.training and index is not None and index > 0:
            real = {n: getattr(module, n) for n in _BN_BUFFERS if getattr(module, n, None) is not None}
            stash[module] = real
            for name, buf in real.items():
                setattr(module, name, buf.clone())

    def after(module, args, output):
        for name, buf in stash.pop(module, {}).items():
            setattr(module, name, buf)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, always_call=True))
    if not handles:
        raise ValueError("bn_update_once_per_step: the model has no batch-norm layer that tracks running stats")
    return _Handles(handles)
