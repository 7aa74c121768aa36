"""The run: one step's lifecycle, whatever drives it (docs/design.md §8.8).

``StepRun`` hands out the step's evaluations, validates each recorded loss, has the variant's move made
(``tsam_fast.engine.moves``) and, at ``finish``, reads the guard's verdict and makes the base optimizer's
step; ``TSAM.step(closure)`` and the closure-free loop (``TSAM.begin_step``) are two drivers of it. It owns
the misuse messages and the undo: abandoning a step at any point -- an exception, a ``break`` out of the
loop, the run object being dropped, a misuse error -- leaves the parameters exactly at theta0, no
gradients, and the optimizer state (step counter, base-optimizer state) unchanged.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, Optional, Tuple

import torch

from . import moves
from .guard import NonFiniteLossError
from .plan import Evaluation
from .session import StepInputs, StepResult
from .step import Step
from .tilt import TiltReport

__all__ = ["StepRun"]

_NO_CONTEXT = contextlib.nullcontext()


class StepRun:
    """One TSAM step in progress. Made by ``TSAM.begin_step()``; iterate it for the evaluations, call
    :meth:`record` with each evaluation's loss after its backward, then :meth:`finish`::

        run = opt.begin_step()
        for ev in run:                     # ev.role: "ascent" | "leapfrog" | "sample"
            loss = criterion(model(x), y)
            loss.backward()                # or accelerator.backward(loss), manual_backward(loss), ...
            run.record(loss)
        tilted_loss = run.finish()         # the base optimizer's step
    """

    def __init__(self, inputs: StepInputs):
        self.inputs = inputs
        self.session = inputs.session
        self.layout = inputs.layout
        self.by_closure = inputs.by_closure  # error messages speak of the closure
        self.step = Step(inputs, self._describe)  # may refuse (a backend, a process group): nothing moved yet
        self.k, self.world = self.step.k, self.step.world
        self._moves = moves.table(inputs.config, self.step.reuses_correction)
        self.result: Optional[torch.Tensor] = None
        self._position = 0          # index of the next evaluation
        self._awaiting = False      # an evaluation was handed out and its loss not recorded yet
        self._iterating = False
        self._backed_up = False
        self._theta0_view = False   # inside at_theta0(): the parameters are at theta0 for a checkpoint
        self.state = "running"      # -> "evaluated" -> "finished"; or "abandoned"
        self.session.register(self)
        self.layout.begin_step()
        try:
            with torch.no_grad():
                self.step.first_start()
            self._backed_up = True
        except BaseException:
            self.fail()
            raise

    # -- driving it -------------------------------------------------------------------------------

    @property
    def plan(self):
        return self.step.plan

    @property
    def losses(self):
        """The losses that enter the tilt, recorded so far (averaged over the ranks; 0-dim tensors)."""
        return [self.step.as_tensor(loss) for loss in self.step.losses]

    @property
    def evaluations(self) -> Tuple[Evaluation, ...]:
        """The step's evaluations, in order (drawn samples of a tilt-sampled backward: -1 until drawn)."""
        return tuple(self.step.plan)

    @property
    def evaluation(self) -> Optional[Evaluation]:
        """The evaluation in progress (handed out, loss not recorded yet), else None."""
        return self.step.plan[self._position] if self._awaiting else None

    def __iter__(self) -> Iterator[Evaluation]:
        if self._iterating or self._position:
            self.fail()
            raise RuntimeError("a TSAM step is iterated once: this run's loop was already started (the step is "
                               "abandoned; call opt.begin_step() for a new one)")
        self._iterating = True
        return self._evaluations()

    def _evaluations(self) -> Iterator[Evaluation]:
        plan = self.step.plan
        try:
            while self._position < len(plan):
                self._require("running", "hand out the next evaluation")
                if plan[self._position].backward:  # a score has no backward: nothing to zero
                    self.layout.begin_call()
                self._awaiting = True
                yield plan[self._position]
                if self._awaiting:
                    self.fail()
                    raise RuntimeError(
                        f"evaluation {self._position} ({plan[self._position].role}) of the TSAM step was not "
                        "recorded: call run.record(loss) after its backward, before the next one (the step was "
                        "abandoned: parameters restored)")
        except GeneratorExit:  # the loop was left early: break, an exception, or the loop object dropped
            self.fail()
            raise

    def record(self, loss) -> None:
        """The loss of the evaluation in progress, after its backward: validates both, then makes the move
        this evaluation calls for."""
        step = self.step
        try:
            if self.state != "running" or not self._awaiting:
                raise RuntimeError(self._record_misuse())
            loss = self._checked_loss(loss)
            ev = step.plan[self._position]
            if ev.backward and not self.layout.end_call():
                where = ("during the closure: it must call loss.backward() (TSAM zeroes gradients before each call "
                         "itself)") if self.by_closure else (
                    "in this evaluation: call loss.backward() (or your trainer's backward) before record(loss)")
                raise RuntimeError(
                    f"no parameter received a gradient {where}, on a loss computed from the parameters TSAM "
                    "was given. If the model's parameters were replaced after TSAM was constructed "
                    "(load_state_dict(..., assign=True), module.to(...) onto another device, re-created layers), "
                    "construct TSAM again on model.parameters().")
            # a copy: the user may later overwrite a buffer of their own
            if loss.dim():
                loss = loss.reshape(())
            if step.num.host:  # a CPU step's scalars are host floats (tsam_fast.engine.numbers); a loss on
                # another device comes over as the device path's loss always did (a blocking copy to the CPU)
                loss = step.num.value(loss.detach() if loss.device.type == "cpu" else loss.detach().cpu())
            elif loss.device == step.device and loss.dtype == step.dtype:
                loss = loss.detach().clone()
            else:
                loss = loss.detach().to(device=step.device, dtype=step.dtype, copy=True,
                                        non_blocking=step.device.type != "cpu")
            step.guard.loss(loss)
            self._awaiting = False
            self._position += 1
            step.position = ev.index
            with torch.no_grad() if torch.is_grad_enabled() else _NO_CONTEXT:  # step(closure) runs under no_grad
                self._moves[ev.role](step, ev, loss)
                if self._position == len(step.plan):
                    moves.evaluated(step)
                    self.state = "evaluated"
        except BaseException:
            self.fail()
            raise

    def finish(self) -> torch.Tensor:
        """End the step: the base optimizer's update from theta0 with the tilted gradient. Returns the tilted
        loss estimate (0-dim tensor)."""
        step = self.step
        if self.state != "evaluated":
            done = self.state in ("finished", "abandoned")
            position = self._position
            self.fail()
            if done:
                raise RuntimeError(f"this TSAM step was already {self.state}; begin a new one with opt.begin_step()")
            raise RuntimeError(
                f"finish() was called after {position} of the step's {len(step.plan)} evaluations; record "
                "every evaluation's loss first (the step was abandoned: parameters restored, state unchanged)")
        self.layout.end_step()
        tilt = TiltReport(step.losses if step.num.host else torch.stack(step.losses), step.taus[step.group0],
                          step.tilts[step.group0], step.num, step.dtype)
        losses = tilt.losses
        self.session.release(self)
        failed, out_of_step = step.guard.failed(step.comms.out_of_step)  # the step's one host read
        if out_of_step:
            error = step.comms.desync_error()
            self.fail()
            raise error
        if failed:
            self.state = "abandoned"
            for p in self.layout.params:
                p.grad = None
            raise NonFiniteLossError(
                f"an evaluation of TSAM step {self.k} gave a non-finite loss or gradient (sample losses "
                f"{losses.tolist()}); the parameters were restored and the optimizer state is unchanged. Lower "
                "the learning rate, rho or radius, or check the data (check_finite=False lets non-finite values "
                "through).")
        step.guard.base_step(self.inputs.base_optimizer)
        if step.correction is not None:  # a full step of the periodic tilt: its correction is cached
            self.session.correction = step.correction
        self.state = "finished"
        self.result = tilt.tilted
        origin = [None if x is None else step.as_tensor(x) for x in (step.origin_loss, step.grad_norm)]
        self.inputs.on_finish(StepResult(tilt.tilted, tilt, *origin))
        return self.result

    @contextlib.contextmanager
    def at_theta0(self) -> Iterator[None]:
        """The parameters at theta0 for the duration (a checkpoint from inside the step: a signal handler,
        a callback), then back at the point they were at, bit for bit (docs/design.md §8.2). Gradients and
        the step's own state are not touched; nested uses are no-ops."""
        if not self._backed_up or self._theta0_view or self.state not in ("running", "evaluated"):
            yield
            return
        # quiet writes (docs/design.md §8.2): a forward of this evaluation may have saved the parameters for
        # its backward, which then reads them back exactly as they were
        with torch.no_grad():
            here = []
            for b in self.layout.buckets:
                point = torch.empty(b.numel, dtype=b.dtype, device=b.device)
                b.gather(point)
                here.append(point)
                b.scatter(b.backup_parts, quiet=True)
        self._theta0_view = True
        try:
            with contextlib.ExitStack() as stack:  # other state as the step began (batch-norm statistics)
                for at_start in list(self.session.start_state):
                    stack.enter_context(at_start())
                yield
        finally:
            self._theta0_view = False
            with torch.no_grad():
                for b, point in zip(self.layout.buckets, here):
                    b.scatter(list(point.split(b.sizes)), quiet=True)

    def abandon(self) -> None:
        """Undo the step: parameters back to theta0 exactly, no gradients left behind, state unchanged.
        Idempotent. On several ranks, a deliberate abandon must happen on every rank at the same evaluation
        (their collectives so far were paired); an error's abandon (:meth:`fail`) is taken as one rank's."""
        if self.state in ("finished", "abandoned"):
            return
        self.state = "abandoned"
        self._awaiting = False
        self.layout.active = False
        if self._backed_up:
            for b in self.layout.buckets:
                b.restore()
        for p in self.layout.params:
            p.grad = None
        self.session.release(self)

    def fail(self) -> None:
        """:meth:`abandon` on an error path (an exception in an evaluation, misuse, the loop left early, the
        run dropped). On several ranks the others may be inside this step's collectives, which no later step
        of this rank can pair correctly: the optimizer refuses further steps (docs/design.md §6.1) until
        ``load_state_dict`` resumes every rank from a checkpoint."""
        live = self.state in ("running", "evaluated")
        self.abandon()
        if live and self.world > 1 and self.session.broken is None:
            self.session.broken = (f"step {self.k} was abandoned on this rank by an error at evaluation "
                                   f"{self._position} of {len(self.step.plan)}")

    def __del__(self):
        try:
            self.fail()
        except Exception:  # pragma: no cover - a constructor that raised, or interpreter shutdown
            pass

    # -- misuse -----------------------------------------------------------------------------------

    def _describe(self, position: int) -> str:
        return (f"TSAM step {self.k}: the ranks are out of step. This rank's all-reduce of evaluation {position} "
                f"({self.step.plan[position].role}) of its run {self.step.attempt}")

    def _require(self, state: str, what: str) -> None:
        if self.state != state:
            raise RuntimeError(f"cannot {what}: this TSAM step was {self.state}")

    def _record_misuse(self) -> str:
        if self.state != "running":
            return f"record() on a TSAM step that was {'fully recorded' if self.state == 'evaluated' else self.state}"
        if not self._iterating:
            return "record() before the step's loop: iterate the run (for ev in run: ...) and record inside it"
        return (f"the loss of evaluation {self._position - 1} was already recorded: record each evaluation once, "
                "after its backward (the step was abandoned: parameters restored)")

    def _checked_loss(self, loss) -> torch.Tensor:
        # the messages speak of what the user wrote: a closure (TSAM.step) or a record() call
        given, must = ("the closure returned", "the closure must return") if self.by_closure else \
            ("record() got", "record() takes")
        if type(loss) is torch.Tensor and loss.dim() == 0 and loss.is_floating_point():
            return loss  # the usual case, in three cheap checks
        if loss is None:
            raise ValueError(f"{given} None: it must {'return' if self.by_closure else 'be'} the loss (after "
                             "calling loss.backward())")
        if not isinstance(loss, torch.Tensor):
            if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
                loss = torch.tensor(float(loss))
            else:
                raise TypeError(f"{must} the loss as a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{must} a scalar loss, got shape {tuple(loss.shape)}; reduce it (e.g. .mean()) "
                             "before backward")
        if not loss.is_floating_point():
            raise TypeError(f"{given} a {loss.dtype} loss; {'return' if self.by_closure else 'pass'} the "
                            "floating-point loss tensor")
        return loss
