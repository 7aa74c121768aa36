"""The fused Triton GPU backend (kernels/): not part of this release yet."""

from __future__ import annotations

import importlib.util

from .base import BackendStatus


def probe():
    if importlib.util.find_spec("triton") is None:
        why = "triton is not installed (pip install 'triton>=3.6,<3.10')"
    else:
        why = "the Triton kernels (kernels/) are not part of this release yet; use backend='reference' or 'auto'"
    return None, BackendStatus("triton", False, ("cuda",), why)
