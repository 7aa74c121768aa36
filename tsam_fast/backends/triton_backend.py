"""The fused Triton backend: the op contract as Triton kernels (``kernels/``, installed as
``tsam_fast._kernels``) over the flat buffers of CUDA parameters.

Each op is one kernel launch over the bucket (two for a reduction); scalars stay on the device and the
noise is generated in-kernel by ``tl.randn4x`` with the spec's counter layout, so a step makes no host
sync. With ``TRITON_INTERPRET=1`` (set before triton is imported) Triton runs the same kernels in its
CPU interpreter: the backend then also accepts CPU parameters, which is how CI tests it without a GPU.

In eager mode the backend calls the launchers directly; while ``torch.compile`` traces it, it calls the
registered ``torch.ops.tsam_fast_triton.*`` operators instead, so compiled user code sees opaque ops with
their mutations declared rather than the launchers' Python.
"""

from __future__ import annotations

import os

import torch

from .base import Backend, BackendStatus

_TRITON_RANGE = "pip install 'triton>=3.6,<3.10'"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonOps:
    """The op contract as Triton launches: the launchers in eager mode, the registered ops under
    ``torch.compile``."""

    def __init__(self, launch, ops):
        self._launch = launch
        self._ops = ops

    def noise_sqnorm(self, runs, seed, device):
        if torch.compiler.is_compiling():
            return torch.ops.tsam_fast_triton.noise_sqnorm(self._ops.flat_runs(runs), seed, torch.device(device))
        return self._launch.noise_sqnorm(runs, seed, device)

    def sqnorm(self, x, scale=None):
        if torch.compiler.is_compiling():
            return torch.ops.tsam_fast_triton.sqnorm(x, scale)
        return self._launch.sqnorm(x, scale)

    def perturb(self, theta, theta0, runs, seed, coef, save_backup):
        if torch.compiler.is_compiling():
            torch.ops.tsam_fast_triton.perturb(theta, theta0, self._ops.flat_runs(runs), seed, coef, bool(save_backup))
            return
        self._launch.perturb(theta, theta0, runs, seed, coef, save_backup)

    def fill_noise(self, out, runs, seed, coef):
        if torch.compiler.is_compiling():
            torch.ops.tsam_fast_triton.fill_noise(out, self._ops.flat_runs(runs), seed, coef)
            return
        self._launch.fill_noise(out, runs, seed, coef)

    def leapfrog(self, theta, grad, kick, drift, momentum=None, precond=None):
        if torch.compiler.is_compiling():
            torch.ops.tsam_fast_triton.leapfrog(theta, grad, kick, drift, momentum, precond)
            return
        self._launch.leapfrog(theta, grad, kick, drift, momentum, precond)

    def tilt_accumulate(self, acc, grad, a, b, first, theta, theta0, runs, seed, coef):
        if torch.compiler.is_compiling():
            torch.ops.tsam_fast_triton.tilt_accumulate(acc, grad, a, b, bool(first), theta, theta0,
                                                self._ops.flat_runs(runs), seed, coef)
            return
        self._launch.tilt_accumulate(acc, grad, a, b, first, theta, theta0, runs, seed, coef)

    def finalize(self, acc, grad, a, b, inv_z, first, theta, theta0):
        if torch.compiler.is_compiling():
            torch.ops.tsam_fast_triton.finalize(acc, grad, a, b, inv_z, bool(first), theta, theta0)
            return
        self._launch.finalize(acc, grad, a, b, inv_z, first, theta, theta0)


def probe():
    """``(TritonBackend(), status)`` when triton and the kernels import, else ``(None, status with the error)``."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else at import
        return None, BackendStatus("triton", False, ("cuda",),
                                   f"triton does not import ({type(exc).__name__}: {exc}); {_TRITON_RANGE}")
    try:
        from .._kernels import launch, ops
    except Exception as exc:
        return None, BackendStatus("triton", False, ("cuda",),
                                   f"the Triton kernels (tsam_fast._kernels) failed to load with triton "
                                   f"{getattr(triton, '__version__', '?')}: {type(exc).__name__}: {exc}")
    version = getattr(triton, "__version__", "?")
    if _interpreting():
        return Backend("triton", TritonOps(launch, ops)), BackendStatus(
            "triton", True, ("cuda", "cpu"),
            f"triton {version} in interpreter mode (TRITON_INTERPRET=1): kernels also run, slowly, on CPU tensors")
    return Backend("triton", TritonOps(launch, ops)), BackendStatus(
        "triton", True, ("cuda",), f"fused Triton kernels (triton {version})")
