"""The fused Triton backend: the op contract as Triton kernels (``kernels/``, installed as
``tsam_fast._kernels``) over the flat buffers of CUDA parameters.

Each op is one kernel launch over the bucket (two for a reduction); scalars stay on the device and the
noise is generated in-kernel by ``tl.randn4x`` with the counter layout of docs/design.md §4, so a step
makes no host sync. With ``TRITON_INTERPRET=1`` (set before triton is imported) Triton runs the same kernels in its
CPU interpreter: the backend then also accepts CPU parameters, which is how CI tests it without a GPU.

In eager mode the backend calls the launchers directly; while ``torch.compile`` traces it, it calls the
registered ``torch.ops.tsam_fast_triton.*`` operators instead (schemas from ``contract.py``, the same as
the C++ ``torch.ops.tsam_fast.*``), so compiled user code sees opaque ops with their mutations declared
rather than the launchers' Python.
"""

from __future__ import annotations

import os

import torch

from . import contract
from .base import Backend, BackendStatus

_TRITON_RANGE = "pip install 'triton>=3.6,<3.10'"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonOps(contract.Forwarding):
    """The op contract as Triton launches: each op (``contract.OPS``) calls its launcher in eager mode and
    the registered ``torch.ops.tsam_fast_triton`` op under ``torch.compile`` (``contract.Forwarding``)."""

    def __init__(self, ops):
        super().__init__(ops.NAMESPACE, ops.LAUNCHERS)


def probe():
    """``(TritonBackend(), status)`` when triton and the kernels import, else ``(None, status with the error)``."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else at import
        return None, BackendStatus("triton", False, ("cuda",),
                                   f"triton does not import ({type(exc).__name__}: {exc}); {_TRITON_RANGE}")
    try:
        from .._kernels import ops  # registers torch.ops.tsam_fast_triton.* from the contract table
    except Exception as exc:
        return None, BackendStatus("triton", False, ("cuda",),
                                   f"the Triton kernels (tsam_fast._kernels) failed to load with triton "
                                   f"{getattr(triton, '__version__', '?')}: {type(exc).__name__}: {exc}")
    version = getattr(triton, "__version__", "?")
    if _interpreting():
        return Backend("triton", TritonOps(ops)), BackendStatus(
            "triton", True, ("cuda", "cpu"),
            f"triton {version} in interpreter mode (TRITON_INTERPRET=1): kernels also run, slowly, on CPU tensors")
    return Backend("triton", TritonOps(ops)), BackendStatus(
        "triton", True, ("cuda",), f"fused Triton kernels (triton {version})")
