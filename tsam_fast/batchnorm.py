"""Batch norm under TSAM: running statistics update once per optimizer step.

A TSAM step runs the closure 2*s times (``ascent``); left alone, batch-norm layers would fold every
perturbed forward into their running statistics. The reference code lets only the first forward of
each step update them; :func:`bn_update_once_per_step` does the same, exactly, for any momentum
setting (including ``momentum=None``'s cumulative average): in every later closure call of a step the
layers still normalize with the batch's statistics, but their running buffers are put back as they
were after the forward.

    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    handle = bn_update_once_per_step(model, opt)   # handle.remove() undoes it

Forwards outside ``opt.step`` (evaluation, other optimizers) are not affected.
"""

from __future__ import annotations

from typing import List

import torch
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
            stash[module] = [getattr(module, n).clone() if getattr(module, n, None) is not None else None
                             for n in _BN_BUFFERS]

    def after(module, args, output):
        saved = stash.pop(module, None)
        if saved is not None:
            with torch.no_grad():
                for name, value in zip(_BN_BUFFERS, saved):
                    if value is not None:
                        getattr(module, name).copy_(value)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    if not handles:
        raise ValueError("bn_update_once_per_step: the model has no batch-norm layer that tracks running stats")
    return _Handles(handles)
