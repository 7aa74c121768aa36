"""The moves between evaluations, one module per variant (docs/design.md §8.9).

A move is a function ``move(step, ev, loss)``: called once evaluation ``ev``'s loss is recorded (after its
backward), it makes what the variant does next on the step's working set (``tsam_fast.engine.step.Step``):
an ascent step, a leapfrog step, the tilt update fused with the next sample's start, a draw. ``table``
picks each role's move for a configuration; ``evaluated`` is what a variant does once a step's last move is
made. A new sampler is a module here, its roles in the plan (``plan.py``) and its rows in ``table``.

    ascent.py    sampler="ascent": the normalised ascent step (and ``adaptive``)
    hmc.py       sampler="hmc": the leapfrog steps
    samples.py   every sample's gradient into the tilted sum (sampler="random" is this alone)
    shared.py    the evaluation at theta0: shared_ascent's one ascent, and g0 for the periodic tilt
    sampled.py   backward_samples: score by forwards, backpropagate K drawn from the tilt weights
    periodic.py  tilt_every: the cached correction, and the steps between full ones
"""

from __future__ import annotations

from typing import Callable, Dict

from . import ascent, hmc, periodic, sampled, samples, shared

__all__ = ["table", "evaluated"]

Move = Callable  # (step, ev, loss) -> None


def table(config, reuses_correction: bool) -> Dict[str, Move]:
    """The move after each role of ``config``'s plan (``reuses_correction``: a step between the periodic tilt's full ones)."""
    if reuses_correction:
        return {"origin": periodic.after_reusing_correction}
    moves = {"origin": shared.after_origin, "ascent": ascent.after_ascent, "leapfrog": hmc.after_leapfrog,
             "sample": samples.after_sample}
    if config.backward_samples is not None:
        moves.update(score=sampled.after_score, sample=sampled.after_backprop)
    return moves


def evaluated(step) -> None:
    """The last move of the step is made (the step awaits ``finish``)."""
    if step.config.tilt_every > 1 and not step.reuses_correction:
        periodic.cache_correction(step)
