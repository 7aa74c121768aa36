"""Backend registry: which implementations of the op contract exist here, and which one runs where.

Availability is data: each backend reports whether it can run and, if not, the original reason.
``backend="auto"`` picks the preferred available backend for a device type and logs one line when it
falls back; an explicitly requested backend that cannot run raises ``BackendUnavailable``.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

from .base import Backend, BackendStatus, BackendUnavailable
from .reference import ReferenceBackend

__all__ = ["Backend", "BackendUnavailable", "BackendStatus", "backend_info", "resolve_backend", "BACKENDS"]

logger = logging.getLogger("tsam_fast")

BACKENDS = ("reference", "cpp", "triton")

# Preference order of backend="auto", per device type.
_PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}


def _reference_status() -> Tuple[Optional[Backend], BackendStatus]:
    return ReferenceBackend(), BackendStatus(
        "reference", True, ("any",), "plain PyTorch ops; the oracle of the fused backends")


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


def resolve_backend(requested: str, device_type: str) -> Backend:
    """The backend instance for ``requested`` ("auto" or a name) on parameters of ``device_type``."""
    if requested != "auto":
        backend, status = _probe(requested)
        if backend is None:
            raise BackendUnavailable(f"backend={requested!r} is unavailable: {status.reason}")
        if "any" not in status.devices and device_type not in status.devices:
            raise BackendUnavailable(
                f"backend={requested!r} runs on {', '.join(status.devices)} parameters, not {device_type}; "
                "use backend='auto' or 'reference'")
        return backend
    preferred = _PREFERENCE.get(device_type, ("reference",))
    skipped = []
    for name in preferred:
        backend, status = _probe(name)
        if backend is not None:
            key = (device_type, name)
            if key not in _announced:
                _announced.add(key)
                if skipped:
                    logger.warning("tsam_fast: backend 'auto' uses %r for %s parameters (%s)",
                                   name, device_type, "; ".join(skipped))
                else:
                    logger.info("tsam_fast: backend 'auto' uses %r for %s parameters", name, device_type)
            return backend
        skipped.append(f"{name} unavailable: {status.reason}")
    raise AssertionError("the reference backend is always available")  # pragma: no cover
