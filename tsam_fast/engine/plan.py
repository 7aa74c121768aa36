"""The plan: what a step does, as a fixed sequence of evaluations (docs/design.md §8.3).

``StepConfig`` holds the step options of ``tsam_fast.options`` (scope ``"step"``), validated once and
immutable, and numbers the step's evaluations once (``plan``). ``Evaluation`` is one of them as the user's
loop sees it.
"""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Tuple

from .. import options

__all__ = ["Evaluation", "StepConfig"]


class Evaluation(NamedTuple):
    """One gradient evaluation of a step, as the user's loop sees it.

    ``index``: 0-based position in the step; ``sample``: the perturbation j it belongs to; ``role``:
    ``"ascent"`` (its gradient gives the ascent direction of sample j), ``"leapfrog"`` (an HMC step of
    sample j; ``substep`` is k of K), ``"sample"`` (its loss and gradient enter the tilted average) or,
    with ``shared_ascent``, ``"origin"`` (at theta0 itself, before any sample: its gradient, the plain
    gradient g0, gives the ascent direction every sample shares; ``sample`` is 0). With
    ``backward_samples``: ``"score"`` (a forward pass only -- no backward -- whose loss scores sample j),
    then ``"sample"`` evaluations at the samples drawn from the tilt weights (``sample`` is the drawn j;
    -1 in ``StepConfig.plan``, where it is not known yet).
    """

    @property
    def backward(self) -> bool:
        """Whether this evaluation needs a backward (False for a ``"score"``: forward only, under no_grad)."""
        return self.role != "score"

    index: int
    sample: int
    role: str
    substep: int = 0


class _Plan:
    """The methods of ``StepConfig`` (its fields are the table's step options)."""

    def __post_init__(self):
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in options.validate(given).items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "plan", self._plan())

    def plan_at(self, step: int, cached: bool = True) -> Tuple[Evaluation, ...]:
        """The plan of step ``step``: with ``tilt_every = k > 1``, one evaluation at theta0 (its gradient
        corrected by the cached tilted correction) except every k-th step (and until a correction is
        cached), which is the full plan."""
        if self.tilt_every > 1 and cached and step % self.tilt_every:
            return (Evaluation(0, 0, "origin"),)
        return self.plan

    def _plan(self) -> Tuple[Evaluation, ...]:
        origin = self.shared_ascent or self.tilt_every > 1  # the periodic tilt needs g0 on its full steps
        # (sample, role, substep) in order; the index is the position, numbered once at the end
        steps: List[Tuple[int, str, int]] = [(0, "origin", 0)] if origin else []
        if self.backward_samples is not None:  # s forwards, K backwards (docs/design.md §9)
            steps += [(j, "score", 0) for j in range(self.num_samples)]
            steps += [(-1, "sample", 0)] * self.backward_samples
        elif self.shared_ascent:  # s + 1 evaluations (docs/design.md §9)
            steps += [(j, "sample", 0) for j in range(self.num_samples)]
        else:
            for j in range(self.num_samples):
                if self.sampler == "ascent":
                    steps.append((j, "ascent", 0))
                elif self.sampler == "hmc":
                    steps += [(j, "leapfrog", k) for k in range(self.hmc_steps)]
                steps.append((j, "sample", 0))
        return tuple(Evaluation(i, j, role, k) for i, (j, role, k) in enumerate(steps))

    @property
    def evaluations_per_step(self) -> int:
        return len(self.plan)

    @property
    def backward_passes(self) -> int:
        """Evaluations that run a backward (the others are forward-only scores)."""
        return sum(ev.backward for ev in self.plan)

    def items(self) -> Tuple[Tuple[str, object], ...]:
        """(option, value) pairs, in the table's order."""
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))


StepConfig = dataclasses.make_dataclass(
    "StepConfig", [(o.name, object, dataclasses.field(default=o.default)) for o in options.by_scope("step")],
    bases=(_Plan,), frozen=True, namespace={"__module__": __name__})
StepConfig.__doc__ = ("What a step does, validated once: the step options of ``tsam_fast.options`` (sampler, "
                      "start, counts and the step-wide constants) and the plan they make.")
