"""Tilt schedules: callables ``step -> t`` for ``TSAM(tilt=...)``.

The reference code uses two: a linear ramp 0 -> t and a linear decay t -> 0 over training steps.
Any callable of the step counter works; these are small picklable classes so an optimizer that uses
them can be deep-copied and pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LinearTilt", "linear_warmup", "linear_decay"]


@dataclass(frozen=True)
class LinearTilt:
    """t(step) moves linearly from ``start`` to ``end`` over ``steps`` steps, then stays at ``end``."""

    start: float
    end: float
    steps: int

    def __post_init__(self):
        if self.steps < 1 or min(self.start, self.end) < 0:
            raise ValueError(f"LinearTilt needs steps >= 1 and tilts >= 0, got {self}")

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0) / self.steps, 1.0)
        return self.start + (self.end - self.start) * frac


def linear_warmup(tilt: float, steps: int) -> LinearTilt:
    """0 -> ``tilt`` over ``steps`` optimizer steps."""
    return LinearTilt(0.0, tilt, steps)


def linear_decay(tilt: float, steps: int) -> LinearTilt:
    """``tilt`` -> 0 over ``steps`` optimizer steps."""
    return LinearTilt(tilt, 0.0, steps)
