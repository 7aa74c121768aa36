"""What goes into a step, what comes out of it, and what the engine keeps between steps (docs/design.md §8).

The optimizer hands a step everything it reads as ``StepInputs`` and gets a ``StepResult`` back through
``on_finish``; the engine writes no field of the optimizer. What must outlive one step -- the runs' numbers,
the periodic tilt's cache, a rank's failure, the step in progress -- is the engine's own ``Session``, one
per optimizer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

__all__ = ["Session", "StepInputs", "StepResult"]


class Session:
    """The engine's state across the steps of one optimizer.

    ``attempts``: runs begun since construction or the last load (the tags number them, docs/design.md
    §6.1); ``tags_seen``: whether a tagged all-reduce was checked yet (the first is read at once);
    ``broken``: why a step failed on this rank of several (no further step until a load); ``correction``:
    with ``tilt_every``, beta = G.g0/||g0||^2 of the full step whose v/||g0|| is cached in the buckets (None:
    the next step is full);
    ``start_state``: context managers that put other state (batch-norm statistics) back as the step began,
    for ``TSAM.unperturbed()``; ``constants``: the steps' constant device scalars, never written to."""

    def __init__(self):
        self.attempts = 0
        self.tags_seen = False
        self.broken: Optional[str] = None
        self.correction: Optional[torch.Tensor] = None
        self.start_state: List[Callable] = []
        self.constants: Dict = {}
        self._run = None  # weak reference to the step in progress: a dropped run abandons itself

    def live_run(self):
        """The step in progress, or None."""
        run = self._run() if self._run is not None else None
        return run if run is not None and run.state in ("running", "evaluated") else None

    def register(self, run) -> None:
        self._run = weakref.ref(run)

    def release(self, run) -> None:
        if self._run is not None and self._run() is run:
            self._run = None

    def loaded(self) -> None:
        """A state_dict was loaded on every rank: runs are numbered alike again, a failure is cleared."""
        self.attempts = 0
        self.broken = None

    def layout_dropped(self) -> None:
        """The periodic tilt's cache lived in the old layout's buckets."""
        self.correction = None

    def __getstate__(self) -> dict:
        """Pickling and deep copies keep the counters; the step in progress, device constants, the cache and
        hooks of the original model's layers are not carried."""
        state = dict(self.__dict__)
        state.update(_run=None, constants={}, correction=None, start_state=[])
        return state


@dataclass
class StepInputs:
    """What one step reads from the optimizer, read once as the step begins."""

    layout: object                      # tsam_fast.flat.FlatLayout, its buckets' state allocated
    config: object                      # StepConfig
    session: Session
    step: int                           # completed steps: the noise counter k
    seed: int
    tilts: List[float]                  # per param group, at this step (a schedule evaluated)
    rhos: List[float]
    radii: List[float]
    backend_for: Callable               # (device, dtype) -> Backend
    base_optimizer: torch.optim.Optimizer
    on_finish: Callable[["StepResult"], None]  # the optimizer's bookkeeping once the base step is made
    grad_scaler: Optional[object] = None
    process_group: object = "auto"
    by_closure: bool = False            # driven by TSAM.step(closure): messages speak of the closure


class StepResult(NamedTuple):
    """A finished step: the tilted loss estimate and the tilt's report (``TiltReport``: the sample losses,
    and the weights, ESS and loss range computed when read; device tensors, no host read);
    ``origin_loss``/``grad_norm``: L(theta0) and ||g0|| when the step evaluated theta0 with its full plan."""

    loss: torch.Tensor
    tilt: object
    origin_loss: Optional[torch.Tensor] = None
    grad_norm: Optional[torch.Tensor] = None
