"""The Triton launchers registered as PyTorch operators ``torch.ops.tsam_fast_triton.*``.

``torch.library.custom_op`` makes each op opaque to ``torch.compile``: Dynamo records one call with the
mutated buffers declared (``mutates_args``) instead of tracing the launcher's Python, and the fake
implementations give the output metadata (a 0-dim fp32 tensor for the reductions, nothing for the
in-place ops). Noise runs travel as a flat ``int[]`` (``b0, g0, n0, b1, g1, n1, ...``).

The namespace is not ``tsam_fast``: the C++ extension (csrc/ops.cpp) defines that library's schemas
with its own CPU kernels, and the Triton backend must work whether or not that extension is built.

The backend calls the launchers directly in eager mode (a registered op costs a dispatcher round trip
per call) and these ops when it is being compiled; both run the same launcher.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import launch

_NS = "tsam_fast_triton"


def flat_runs(runs) -> List[int]:
    return [int(x) for run in runs for x in run]


def _runs(flat: List[int]):
    return tuple(tuple(flat[i:i + 3]) for i in range(0, len(flat), 3))


@torch.library.custom_op(f"{_NS}::noise_sqnorm", mutates_args=())
def noise_sqnorm(runs: List[int], seed: int, device: torch.device) -> torch.Tensor:
    return launch.noise_sqnorm(_runs(runs), seed, device)


@noise_sqnorm.register_fake
def _(runs, seed, device):
    return torch.empty((), dtype=torch.float32, device=device)


@torch.library.custom_op(f"{_NS}::sqnorm", mutates_args=())
def sqnorm(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    return launch.sqnorm(x, scale)


@sqnorm.register_fake
def _(x, scale):
    return x.new_empty((), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::perturb", mutates_args=("theta", "theta0"))
def perturb(theta: torch.Tensor, theta0: torch.Tensor, runs: List[int], seed: Optional[int],
            coef: torch.Tensor, save_backup: bool) -> None:
    launch.perturb(theta, theta0, _runs(runs), seed, coef, save_backup)


@perturb.register_fake
def _(theta, theta0, runs, seed, coef, save_backup):
    return None


@torch.library.custom_op(f"{_NS}::fill_noise", mutates_args=("out",))
def fill_noise(out: torch.Tensor, runs: List[int], seed: int, coef: torch.Tensor) -> None:
    launch.fill_noise(out, _runs(runs), seed, coef)


@fill_noise.register_fake
def _(out, runs, seed, coef):
    return None


@torch.library.custom_op(f"{_NS}::leapfrog", mutates_args=("theta", "momentum"))
def leapfrog(theta: torch.Tensor, grad: torch.Tensor, kick: torch.Tensor, drift: torch.Tensor,
             momentum: Optional[torch.Tensor], precond: Optional[torch.Tensor]) -> None:
    launch.leapfrog(theta, grad, kick, drift, momentum, precond)


@leapfrog.register_fake
def _(theta, grad, kick, drift, momentum, precond):
    return None


@torch.library.custom_op(f"{_NS}::tilt_accumulate", mutates_args=("acc", "theta"))
def tilt_accumulate(acc: torch.Tensor, grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool,
                    theta: torch.Tensor, theta0: torch.Tensor, runs: List[int], seed: Optional[int],
                    coef: torch.Tensor) -> None:
    launch.tilt_accumulate(acc, grad, a, b, first, theta, theta0, _runs(runs), seed, coef)


@tilt_accumulate.register_fake
def _(acc, grad, a, b, first, theta, theta0, runs, seed, coef):
    return None


@torch.library.custom_op(f"{_NS}::finalize", mutates_args=("grad", "theta"))
def finalize(acc: torch.Tensor, grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv_z: torch.Tensor,
             first: bool, theta: torch.Tensor, theta0: torch.Tensor) -> None:
    launch.finalize(acc, grad, a, b, inv_z, first, theta, theta0)


@finalize.register_fake
def _(acc, grad, a, b, inv_z, first, theta, theta0):
    return None
