"""Backend registry: which implementations of the op contract exist here, and which one runs where.

Availability is data: each backend reports whether it can run and, if not, the original reason.
``backend="auto"`` picks the preferred available backend for a device type and logs one line when it
falls back; an explicitly requested backend that cannot run raises ``BackendUnavailable``.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch

from .base import Backend, BackendStatus, BackendUnavailable
from .reference_fast import ReferenceBackend

__all__ = ["Backend", "BackendUnavailable", "BackendStatus", "backend_info", "resolve_backend", "BACKENDS"]

logger = logging.getLogger("tsam_fast")

BACKENDS = ("reference", "cpp", "triton")

# Preference order of backend="auto", per device type.
_PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}


def _reference_status() -> Tuple[Optional[Backend], BackendStatus]:
    from .reference_fast import generator_info
    return ReferenceBackend(), BackendStatus(
        "reference", True, ("any",), f"PyTorch ops in cache-sized chunks (the plain ops are the oracle of the "
                                     f"fused backends); noise: {generator_info()}")


def _cpp_status() -> Tuple[Optional[Backend], BackendStatus]:
    from . import cpp

    return cpp.probe()


def _triton_status() -> Tuple[Optional[Backend], BackendStatus]:
    from . import triton_backend

    return triton_backend.probe()


_PROBES: Dict[str, Callable[[], Tuple[Optional[Backend], BackendStatus]]] = {
    "reference": _reference_status,
    "cpp": _cpp_status,
    "triton": _triton_status,
}
_cache: Dict[str, Tuple[Optional[Backend], BackendStatus]] = {}
_announced: set = set()


def _probe(name: str) -> Tuple[Optional[Backend], BackendStatus]:
    if name not in _cache:
        _cache[name] = _PROBES[name]()
    return _cache[name]


def backend_info() -> Dict[str, BackendStatus]:
    """What each backend is, whether it can run here, on which devices, and why not if it cannot."""
    return {name: _probe(name)[1] for name in BACKENDS}


def resolve_backend(requested: str, device_type: str, dtype: Optional[torch.dtype] = None) -> Backend:
    """The backend instance for ``requested`` ("auto" or a name) on parameters of ``device_type`` (and
    ``dtype``, when given): "auto" picks, per (device, dtype), the preferred backend that runs it."""
    if requested != "auto":
        backend, status = _probe(requested)
        if backend is None:
            raise BackendUnavailable(f"backend={requested!r} is unavailable: {status.reason}")
        if "any" not in status.devices and device_type not in status.devices:
            raise BackendUnavailable(
                f"backend={requested!r} runs on {', '.join(status.devices)} parameters, not {device_type}; "
                "use backend='auto' or 'reference'")
        if dtype is not None and dtype not in backend.dtypes:
            raise BackendUnavailable(
                f"backend={requested!r} runs {', '.join(_dtype_name(d) for d in backend.dtypes)} parameters, "
                f"not {_dtype_name(dtype)}; use backend='auto' (it picks a backend per dtype) or 'reference', "
                "or convert the model")
        return backend
    preferred = _PREFERENCE.get(device_type, ("reference",))
    skipped = []
    for name in preferred:
        backend, status = _probe(name)
        if backend is not None and (dtype is None or dtype in backend.dtypes):
            key = (device_type, name, dtype)
            if key not in _announced:
                _announced.add(key)
                what = f"{device_type} {_dtype_name(dtype)}" if dtype is not None else device_type
                if skipped:
                    logger.warning("tsam_fast: backend 'auto' uses %r for %s parameters (%s)",
                                   name, what, "; ".join(skipped))
                else:
                    logger.info("tsam_fast: backend 'auto' uses %r for %s parameters", name, what)
            return backend
        if backend is None:
            skipped.append(f"{name} unavailable: {status.reason}")
        else:
            skipped.append(f"{name} does not run {_dtype_name(dtype)}")
    raise AssertionError("the reference backend is always available")  # pragma: no cover


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "")
