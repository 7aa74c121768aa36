"""TSAM with Hugging Face Accelerate, in your own loop: :func:`tsam_step` per batch, and
:func:`save_on_preemption` for a checkpoint when the job is preempted::

    from tsam_fast.integrations.accelerate import save_on_preemption, tsam_step

    model, opt, loader, sched = accelerator.prepare(model, TSAM(model.parameters(), ...), loader, sched)
    with save_on_preemption(accelerator, opt, "preempted/") as preemption:
        for x, y in loader:
            if preemption.requested():
                break
            loss = tsam_step(accelerator, model, opt, (x, y),
                             lambda b: F.cross_entropy(model(b[0]), b[1]), micro_batches=2)
            sched.step()

``tsam_step`` runs the closure-free loop (``TSAM.begin_step``): each evaluation runs the forward and
``accelerator.backward`` of every micro-batch, all but the last under ``accelerator.no_sync`` (no
gradient all-reduce under DDP), and ``run.finish()`` is the base optimizer's step. Accelerate's own
``accumulate()`` and ``gradient_accumulation_steps`` are not used -- they accumulate over loop
iterations, one backward each, while every TSAM evaluation needs the whole batch's gradient before the
parameters move to the next point (``tsam_step`` refuses an Accelerator with
``gradient_accumulation_steps > 1``, whose backward would divide the losses) -- nor is the prepared
optimizer's ``step()``: ``tsam_step`` is the step. fp16 (``mixed_precision="fp16"``, on a GPU): TSAM takes
the accelerator's ``GradScaler``, which ``accelerator.backward`` scales the losses with; the base optimizer
steps through it (skipped on an overflow, an ascent evaluation's included) and ``tsam_step`` updates the
scale after each step. bf16 needs no scaler.

``accelerator.save_state``/``load_state`` checkpoint the model, TSAM's ``state_dict`` (step counter and
seed included) and the scheduler; a resumed run continues the identical trajectory (TSAM leaves every
parameter in its own storage, so Accelerate's default safetensors format works).

Limits: a prepared scheduler steps once per process at each ``sched.step()`` (Accelerate's rule, unless
``split_batches``): plan its length in one process's steps. The fp16 path is tested on the CPU with a
``GradScaler`` given to the Accelerator by hand (Accelerate makes none on the CPU), not on a GPU here.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Optional, Sequence

import torch

from ..engine import Evaluation
from ._common import evaluate_step, require, split_batch, tsam_of, use_scaler, weighted_loss

require("accelerate", "accelerate")

__all__ = ["tsam_step", "save_on_preemption", "Preemption"]


def tsam_step(accelerator, model: torch.nn.Module, optimizer, batch: Any, loss_fn: Callable[[Any], torch.Tensor],
              micro_batches: int = 1, on_evaluation: Optional[Callable[[Evaluation], None]] = None) -> torch.Tensor:
    """One TSAM step on ``batch``; returns the tilted loss (0-dim tensor).

    ``model``: the prepared model (its ``no_sync`` skips the all-reduce of all but the last micro-batch).
    ``optimizer``: the prepared optimizer, or the TSAM inside it. ``loss_fn(micro_batch)`` returns the mean
    loss of a micro-batch: ``batch`` -- a tensor, or lists, tuples and dicts of tensors -- is cut along its
    first dimension into ``micro_batches`` parts, each loss weighted by its share of the rows.
    ``on_evaluation(ev)`` is called as each evaluation begins (``ev.index``, ``ev.sample``, ``ev.role``)."""
    tsam = tsam_of(optimizer, "accelerate")
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(f"Accelerator(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}) "
                         "accumulates over loop iterations, while each TSAM evaluation needs the whole batch's "
                         "gradient: leave it at 1 and pass micro_batches= to tsam_step instead")
    scaler = accelerator.scaler
    use_scaler(tsam, scaler)
    run = evaluate_step(tsam, split_batch(batch, micro_batches), weighted_loss(loss_fn, accelerator.backward),
                        lambda: accelerator.no_sync(model), on_evaluation)
    tilted = run.finish()
    if scaler is not None and scaler.is_enabled():
        scaler.update()
    return tilted


class Preemption:
    """What :func:`save_on_preemption` returns: a context manager around the training loop (the signal
    handlers are installed for its duration, the previous ones put back after it)."""

    def __init__(self, accelerator, optimizer, directory: str, signals: Sequence[int]):
        self.accelerator, self.tsam, self.directory = accelerator, tsam_of(optimizer, "accelerate"), directory
        self.signals = tuple(signals)
        self.signalled = False  # this process received a signal
        self.saved = False      # the state was saved (in the handler, or at the end of the block)
        self._stopping = False
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.accelerator.num_processes == 1 and not self.saved:
            with self.tsam.unperturbed():
                self.accelerator.save_state(self.directory)
            self.saved = True
        self.signalled = True

    def requested(self) -> bool:
        """Whether the loop should stop now, before its next step: a signal came. On several processes
        every process must call it at the same point of the loop (once per step): one small all-reduce makes
        their answers agree, so that all stop after the same step. That is one host read per call on several
        processes -- between steps, never inside one (on one process: none)."""
        if self.accelerator.num_processes > 1 and not self._stopping:
            flag = torch.tensor([float(self.signalled)], device=self.accelerator.device)
            self._stopping = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        else:
            self._stopping = self._stopping or self.signalled
        return self._stopping

    def __enter__(self) -> "Preemption":
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        if exc_type is None and self._stopping and not self.saved:  # several processes: save between steps
            self.accelerator.save_state(self.directory)
            self.saved = True


def save_on_preemption(accelerator, optimizer, directory: str,
                       signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1)) -> Preemption:
    """Save the training state to ``directory`` when the job is preempted (torchelastic's SIGTERM, SLURM's
    SIGUSR1), to resume from with ``accelerator.load_state(directory)``.

    On one process the signal handler saves at once, wherever the signal lands -- inside a TSAM step too,
    where ``TSAM.unperturbed()`` puts the weights (and batch-norm statistics) as the step began for the
    save and back after it, so a resumed run redoes that step exactly -- and the loop stops at its next
    :meth:`Preemption.requested` check. On several processes the handler only asks the loop to stop: a save
    synchronises the processes, which a handler running inside a step would pair with the step's
    collectives; all processes stop after the same step and the block's end saves there. Use the result
    as a context manager around the loop (see the module's docstring)."""
    return Preemption(accelerator, optimizer, directory, signals)
