"""Backend availability is data; the package imports and trains without triton or the C++ build."""

from __future__ import annotations

import subprocess
import sys

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
