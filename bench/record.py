"""What the benchmarks record (the machine, the software) and how they save it (JSON + PNG, and a
``latest`` copy of each)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable, List, Optional

import torch

import tsam_fast


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): recorded so noisy runs can be spotted."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def versions(**extra: str) -> dict:
    """Python, torch, tsam_fast and triton versions (triton None when absent), plus ``extra``."""
    out = dict(python=platform.python_version(), torch=torch.__version__, tsam_fast=tsam_fast.__version__)
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return {**out, **extra}


def save(record: dict, out_dir: Path, stem: str, latest: str,
         plot: Optional[Callable[[dict, Path], bool]] = None) -> List[Path]:
    """Write ``<stem>.json`` and ``<latest>.json`` (and, when ``plot`` draws one, the same two PNGs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (f"{stem}.json", f"{latest}.json"):
        (out_dir / name).write_text(json.dumps(record, indent=1) + "\n")
        written.append(out_dir / name)
    if plot is not None and plot(record, out_dir / f"{stem}.png"):
        (out_dir / f"{latest}.png").write_bytes((out_dir / f"{stem}.png").read_bytes())
        written += [out_dir / f"{stem}.png", out_dir / f"{latest}.png"]
    return written
