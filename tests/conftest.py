"""Shared test helpers: per-dtype tolerances, a comparison that prints the first mismatches, and the
table of backends (with the device each runs on in this process) that the parity tests cover."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter. The variable must be
# set before triton compiles anything, so it is set here, before any test imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tsam_fast  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Tolerances for results stored in each dtype. One rounding of an fp32 value to the dtype costs half an
# ulp; fused kernels may round intermediate fp32 math in a different order, so allow a couple of ulps.
TOL = {
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = ""):
    """torch.testing-style closeness, reporting the first few offending elements and their indices."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().reshape(-1), expected.double().reshape(-1)
    bad = ~((a - e).abs() <= atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    both_nan = a.isnan() & e.isnan()
    bad &= ~both_nan
    if bad.any():
        idx = bad.nonzero().reshape(-1)[:8].tolist()
        rows = ", ".join(f"[{i}] {a[i].item():.9g} vs {e[i].item():.9g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ "
                             f"(rtol={rtol}, atol={atol}); first: {rows}")


def fused_backends():
    """(name, device) of every non-reference backend that can run in this process."""
    out = []
    for name, status in tsam_fast.backend_info().items():
        if name == "reference" or not status.available:
            continue
        for device in status.devices:
            if device == "cuda" and not torch.cuda.is_available():
                continue
            out.append((name, device))
    return out


def interpreted(name: str, device: str) -> bool:
    """Triton kernels on CPU tensors run in the (slow) interpreter: tests keep sizes small there."""
    return name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: reset before and after a test that builds an Accelerator
    (each sets its own mixed precision). Skips, naming the extra, where accelerate is not installed."""
    state = pytest.importorskip("accelerate.state", reason="accelerate is not installed (pip install -e "
                                                           "'.[integrations]', or bash scripts/setup.sh)")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def device_scalars(monkeypatch):
    """CPU steps on 0-dim tensors, as a CUDA step is (``tsam_fast.engine.numbers.HOST_ON_CPU``): the
    arithmetic and the host-read checks of the device path, run on the CPU."""
    from tsam_fast.engine import numbers
    monkeypatch.setattr(numbers, "HOST_ON_CPU", False)
