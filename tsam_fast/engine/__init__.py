"""The step engine: the one owner of a TSAM step, whatever drives it (docs/design.md §8).

A step is a fixed sequence of gradient evaluations. The optimizer hands the engine what a step reads
(``StepInputs``) and gets a ``StepResult`` back; the engine writes no field of the optimizer, and imports run
one way: ``tsam_fast.optimizer`` -> ``tsam_fast.engine`` -> ``tsam_fast.backends`` -> the ops. Its rooms:

    plan.py         StepConfig (the step options, validated once) and the plan of Evaluations
    tilt.py         the tilt's math: online log-sum-exp, tilted loss, a finished step's TiltReport (pure)
    guard.py        the finiteness and mixed-precision policy; NonFiniteLossError
    collectives.py  named reductions packed into one all-reduce per group; the tags across ranks
    session.py      what goes in (StepInputs), what comes out (StepResult), what lasts between steps (Session)
    step.py         one step's working set (buckets, backends, scalars, losses) and its random starts
    numbers.py      the step's scalar arithmetic for its two kinds of numbers: device tensors, host floats
    run.py          StepRun: the lifecycle (evaluations, record, finish, abandon, at_theta0) and its misuse
    moves/          the moves between evaluations, one module per variant (ascent, hmc, samples, shared,
                    sampled, periodic)
"""

from .guard import NonFiniteLossError
from .plan import Evaluation, StepConfig
from .run import StepRun
from .session import Session, StepInputs, StepResult
from .tilt import TiltReport, shifted, tilted_loss

__all__ = ["StepConfig", "Evaluation", "StepRun", "StepInputs", "StepResult", "Session", "NonFiniteLossError",
           "TiltReport", "shifted", "tilted_loss"]
