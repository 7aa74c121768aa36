"""The step's scalar arithmetic, written once for two kinds of numbers (docs/design.md §8.7).

A step's scalars -- norms, start coefficients, the tilt's running state, clip factors, losses -- are
computed by the moves with the functions of ``step.num``:

* ``DeviceNumbers``: 0-dim tensors on the step's device. No host read, ever (a CUDA step; and every step
  whose collectives or GradScaler need tensors).
* ``HostNumbers``: Python floats (float64). For a step whose buckets are all on the CPU, in one process,
  without a GradScaler: its scalars are on the host already (reading a CPU tensor is no sync), and a float
  operation costs ~0.05 µs where a 0-dim tensor op costs 2-4 µs of dispatch -- about a dozen of them per
  evaluation. The ops get them as 0-dim tensors of the bucket's scalar dtype, filled just before the call
  (``Step.to_bucket``).

Each function does what the tensor op of the same name does; the device path is the engine's arithmetic
as it was, op for op, and the host path differs from it only by computing in float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DeviceNumbers", "HostNumbers", "HOST_ON_CPU"]

#: CPU steps (one process, no GradScaler) take host floats. False keeps them on 0-dim tensors, as a CUDA
#: step is: the tests that check the device path's arithmetic and host reads on the CPU set it.
HOST_ON_CPU = True


class DeviceNumbers:
    host = False
    sqrt = staticmethod(torch.sqrt)
    exp = staticmethod(torch.exp)
    reciprocal = staticmethod(torch.reciprocal)
    maximum = staticmethod(torch.maximum)
    minimum = staticmethod(torch.minimum)
    clamp_min = staticmethod(torch.clamp_min)
    clamp_max = staticmethod(torch.clamp_max)
    isfinite = staticmethod(torch.isfinite)
    one_like = staticmethod(torch.ones_like)

    @staticmethod
    def value(t: torch.Tensor) -> torch.Tensor:
        """An op's 0-dim result as this kind of number: the tensor itself."""
        return t


class HostNumbers:
    host = True
    sqrt = staticmethod(math.sqrt)
    exp = staticmethod(math.exp)
    isfinite = staticmethod(math.isfinite)

    @staticmethod
    def maximum(a: float, b: float) -> float:
        return a if a != a or a > b else b  # NaN wins, as in torch.maximum

    @staticmethod
    def minimum(a: float, b: float) -> float:
        return a if a != a or a < b else b

    @staticmethod
    def reciprocal(x: float) -> float:
        return 1.0 / x if x else math.copysign(math.inf, x)

    @staticmethod
    def clamp_min(x: float, low: float) -> float:
        return x if x >= low or x != x else low  # NaN stays NaN, as torch.clamp_min keeps it

    @staticmethod
    def clamp_max(x: float, high: float) -> float:
        return x if x <= high or x != x else high

    @staticmethod
    def one_like(x: float) -> float:
        return 1.0

    @staticmethod
    def value(t: torch.Tensor) -> float:
        """A 0-dim CPU tensor (reading it waits for nothing) as a float: the host path's only read. Anything
        else would be a device sync inside a step, which the host path must never make: refused."""
        if t.device.type != "cpu":
            raise RuntimeError(f"tsam_fast: a CPU step's host scalars read a {t.device} tensor: that would be a "
                               "device sync inside the step (a bug in the engine's choice of numbers)")
        return t.item()
