"""The fused C++ CPU backend (csrc/): not part of this release yet."""

from __future__ import annotations

from .base import BackendStatus


def probe():
    return None, BackendStatus(
        "cpp", False, ("cpu",),
        "the fused C++ CPU extension (csrc/) is not part of this release yet; use backend='reference' or 'auto'")
