"""Mixed precision: ``torch.autocast`` inside the closure (bf16 on CPU and CUDA, fp16 on CUDA) with the
fused backend against the reference backend, and training under autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsam_fast import TSAM

from conftest import assert_close

CUDA = torch.cuda.is_available()
AUTOCAST_CASES = [("cpu", torch.bfloat16)] + ([("cuda", torch.bfloat16), ("cuda", torch.float16)] if CUDA else [])
AUTOCAST_IDS = [f"{d}-{str(t).split('.')[-1]}" for d, t in AUTOCAST_CASES]


def _task(device, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5] > 1).long()  # 3 classes
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3))
    return model.to(device), x.to(device), y.to(device)


def _train_autocast(device, dtype, backend, steps, **kw):
    model, x, y = _task(device)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9, seed=5, num_samples=3, tilt=2.0,
               rho=0.05, radius=0.02, backend=backend, **kw)

    def closure():
        with torch.autocast(device_type=device, dtype=dtype):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(steps)]
    return losses, [p.detach().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_autocast_fused_matches_reference(device, dtype):
    """Same autocast forward, same noise: the fused backend's trajectory is the reference backend's.
    Low-precision matmuls turn an ulp of difference in the perturbed weights into a low-precision
    rounding of the loss now and then, so the bound is a few bf16/fp16 ulps, not fp32 ones."""
    got, got_p = _train_autocast(device, dtype, "auto", 5)
    want, want_p = _train_autocast(device, dtype, "reference", 5)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert_close(torch.tensor(got), torch.tensor(want), rtol=tol, atol=tol, what="tilted losses")
    for a, b in zip(got_p, want_p):
        assert_close(a, b, rtol=tol, atol=tol, what="parameters")


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES, ids=AUTOCAST_IDS)
def test_autocast_trains(device, dtype):
    losses, _ = _train_autocast(device, dtype, "auto", 30)
    assert losses[-1] < 0.6 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
