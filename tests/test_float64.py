"""float64 parameters: ``backend="auto"`` picks, per (device, dtype) bucket, a backend that runs the dtype
(the reference, in float64 math, for float64 on the CPU); an explicit backend that cannot run a
parameter's dtype fails at construction, naming the parameter and the dtype."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import tsam_fast
from tsam_fast import TSAM, BackendUnavailable

CPP = tsam_fast.backend_info()["cpp"].available


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_auto_trains_float64_on_the_reference_and_says_so(caplog, monkeypatch):
    from tsam_fast import backends
    monkeypatch.setattr(backends, "_announced", set())  # said once per process: another test may have made it
    model = _model()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    with caplog.at_level(logging.INFO, logger="tsam_fast"):
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, radius=0.1)
    assert opt.backend_name("cpu", torch.float64) == "reference"
    assert any("float64" in r.getMessage() for r in caplog.records), "auto did not say which backend it picked"
    first = float(opt.step(_closure(model, x, y)))
    for _ in range(15):
        last = float(opt.step(_closure(model, x, y)))
    assert last < first
    assert all(p.dtype == torch.float64 for p in model.parameters())
    (bucket,) = opt._layout.buckets
    assert bucket.acc.dtype == torch.float64, "the accumulator of a float64 bucket is float64"


def test_float64_keeps_float64_precision():
    """SAM mode (s = 1, no random start) in float64 against a float64 SAM written out by hand: equal far
    below fp32 rounding (~6e-8 relative), so no step scalar or buffer went through fp32."""
    rho, lr = 0.05, 0.1
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    model, hand = _model(), _model()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=lr, rho=rho, num_samples=1, start="none")
    params = list(hand.parameters())
    for _ in range(3):
        opt.step(_closure(model, x, y))
        grads = torch.autograd.grad(nn.functional.cross_entropy(hand(x), y), params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        with torch.no_grad():
            theta0 = [p.clone() for p in params]
            for p, g in zip(params, grads):
                p.add_(g * (rho / (norm + 1e-12)))
        grads = torch.autograd.grad(nn.functional.cross_entropy(hand(x), y), params)
        with torch.no_grad():
            for p, t0, g in zip(params, theta0, grads):
                p.copy_(t0 - lr * g)
    for a, b in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_mixed_float32_and_float64_buckets():
    """One optimizer, two dtypes: each bucket gets its own backend; the noise is that of the global index."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[2].double()

    class Net(nn.Module):
        def forward(self, x):
            return model[2](model[1](model[0](x)).double())

    net = Net()
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, radius=0.1)
    first = float(opt.step(_closure(net, x, y)))
    for _ in range(10):
        last = float(opt.step(_closure(net, x, y)))
    assert last < first
    names = {b.dtype: opt._backend_for(b.device, b.dtype).name for b in opt._layout.buckets}
    assert names[torch.float64] == "reference"
    assert names[torch.float32] == ("cpp" if CPP else "reference")


@pytest.mark.skipif(not CPP, reason="the cpp backend is not available")
def test_explicit_backend_that_cannot_run_float64_fails_at_construction():
    model = _model()
    with pytest.raises(BackendUnavailable, match=r"(?s)parameter 0 of group 0 \(torch\.float64.*not float64"):
        TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="cpp")


@pytest.mark.skipif(not CPP, reason="the cpp backend is not available")
def test_explicit_backend_float64_group_added_later_fails_and_adds_nothing():
    model = _model(torch.float32)
    opt = TSAM(model[0].parameters(), torch.optim.SGD, lr=0.1, backend="cpp")
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    with pytest.raises(BackendUnavailable, match="parameter 0 of group 1"):
        opt.add_param_group(dict(params=[extra]))
    assert len(opt.param_groups) == 1
