"""Backend availability is data; the package imports and trains without triton or the C++ build."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import tsam_fast


def test_backend_info_lists_every_backend_with_a_reason():
    info = tsam_fast.backend_info()
    assert set(info) == {"reference", "cpp", "triton"}
    assert info["reference"].available
    for status in info.values():
        assert status.reason and str(status).startswith(status.name)


NO_OPTIONAL = r"""
import sys
sys.modules["triton"] = None            # import triton -> ImportError
import importlib.util
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "triton" else real_find_spec(name, *a)
import torch, tsam_fast
from tsam_fast.backends import cpp
cpp.probe = lambda: (None, tsam_fast.BackendStatus("cpp", False, ("cpu",), "simulated: no compiler"))
info = tsam_fast.backend_info()
assert not info["triton"].available and not info["cpp"].available, info
model = torch.nn.Linear(3, 2)
opt = tsam_fast.TSAM(model.parameters(), torch.optim.SGD, lr=0.1)
x = torch.randn(4, 3)
loss = opt.step(lambda: (l := model(x).square().mean()).backward() or l)
print(opt.backend_name("cpu"), float(loss) > 0)
"""


def test_works_without_triton_and_cpp():
    out = subprocess.run([sys.executable, "-c", NO_OPTIONAL], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["reference", "True"]
    assert "backend 'auto' uses 'reference' for cpu float32 parameters" in out.stderr  # one line per (device, dtype)
    assert "simulated: no compiler" in out.stderr


def test_a_backend_object_runs_the_step():
    """``backend=`` takes a Backend object (an op-contract implementation of one's own): the step runs its ops,
    and a dtype it does not declare is refused in words."""
    from tsam_fast.backends.base import Backend
    from tsam_fast.backends.reference import ReferenceOps

    calls = []

    class Counting(ReferenceOps):
        def finalize(self, *args, **kwargs):
            calls.append(1)
            return super().finalize(*args, **kwargs)

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7))
    q = torch.nn.Parameter(p.detach().clone())
    own = tsam_fast.TSAM([p], torch.optim.SGD, lr=0.1, seed=3,
                         backend=Backend("counting", Counting(), (torch.float32,)))
    ref = tsam_fast.TSAM([q], torch.optim.SGD, lr=0.1, seed=3, backend="reference")
    for opt, x in ((own, p), (ref, q)):
        opt.step(lambda x=x: (l := (x.sin() ** 2).sum()).backward() or l)
    assert calls and own.backend_name() == "counting"
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    half = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    with pytest.raises(tsam_fast.BackendUnavailable, match="does not run"):
        tsam_fast.TSAM([half], torch.optim.SGD, lr=0.1, backend=Backend("counting", Counting(), (torch.float32,)))
