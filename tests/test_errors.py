"""Bad input: a clear error naming the cause, and nothing half-applied (parameters at theta0, state intact)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tsam_fast import TSAM, BackendUnavailable, NonFiniteLossError
from tsam_fast import backends as backends_mod

from tables import CONFIGS, TOYS, assert_unchanged, faulty_closure, positions, snapshot

LINEAR = TOYS["linear"]


def model_and_data():
    """The linear toy model and its inputs (loss: mean of the squared outputs)."""
    return LINEAR.model(), LINEAR.batch()[0]


# (constructor kwargs, error type, message regex)
BAD_ARGS = [
    (dict(tilt=-1.0), ValueError, r"tilt=-1.0.*>= 0"),
    (dict(tilt=float("nan")), ValueError, r"tilt=nan"),
    (dict(tilt=float("inf")), ValueError, r"tilt=inf"),
    (dict(num_samples=0), ValueError, r"num_samples=0.*>= 1"),
    (dict(num_samples=2.5), ValueError, r"num_samples=2.5"),
    (dict(rho=-0.1), ValueError, r"rho=-0.1"),
    (dict(radius=-1), ValueError, r"radius=-1"),
    (dict(noise_scale=-2), ValueError, r"noise_scale=-2"),
    (dict(rho=float("nan")), ValueError, r"rho=nan"),
    (dict(sampler="langevin"), ValueError, r"sampler='langevin'.*'ascent', 'random', 'hmc'"),
    (dict(start="cube"), ValueError, r"start='cube'.*'gaussian'"),
    (dict(backend="cuda"), ValueError, r"backend='cuda'.*'auto', 'reference'"),
    (dict(max_grad_norm=0.0), ValueError, r"max_grad_norm=0.0.*> 0"),
    (dict(hmc_steps=0), ValueError, r"hmc_steps=0"),
    (dict(hmc_step_size=-1.0), ValueError, r"hmc_step_size"),
    (dict(delta=-0.5), ValueError, r"delta=-0.5"),
    (dict(seed="x"), ValueError, r"seed='x'"),
    (dict(adaptive=True, sampler="random"), ValueError, r"adaptive=True.*sampler='ascent'"),
    (dict(hmc_sigma=-1.0), ValueError, r"hmc_sigma=-1.0"),
    (dict(radius_mode="fraction"), ValueError, r"radius_mode='fraction'.*'absolute', 'relative'"),
    (dict(tilt_every=0), ValueError, r"tilt_every=0.*>= 1"),
    (dict(backward_samples=0, sampler="random"), ValueError, r"backward_samples=0.*>= 1"),
    (dict(backward_samples=1), ValueError, r"backward_samples scores the samples.*sampler='random'"),
    (dict(backward_select="max"), ValueError, r"backward_select='max'.*'sample', 'top'"),
    (dict(backward_samples=4, backward_select="top", sampler="random", num_samples=3), ValueError,
     r"backward_samples must be <= num_samples"),
    (dict(shared_ascent=True, sampler="hmc"), ValueError, r"shared_ascent=True.*sampler='ascent'"),
    (dict(grad_scaler="fp16"), TypeError, r"grad_scaler must be a torch.amp.GradScaler"),
    (dict(shard_buffers="flat"), ValueError, r"shard_buffers='flat'"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ARGS, ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_hyperparameters(kwargs, exc, match):
    model, _ = model_and_data()
    with pytest.raises(exc, match=match):
        TSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_param_group_override():
    model, _ = model_and_data()
    with pytest.raises(ValueError, match=r"rho=-1"):
        TSAM([{"params": model.parameters(), "rho": -1}], torch.optim.SGD, lr=0.1)


def test_bad_construction():
    model, _ = model_and_data()
    with pytest.raises(ValueError, match="empty parameter list"):
        TSAM([], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="optimizer class"):
        TSAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="more than one parameter group"):
        TSAM([{"params": [model.weight]}, {"params": [model.weight]}], torch.optim.SGD, lr=0.1)
    c = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex parameters"):  # at construction, not at the first step
        TSAM([c], torch.optim.SGD, lr=0.1)


def test_unavailable_backend(monkeypatch, caplog):
    from tsam_fast.backends.base import BackendStatus

    model, _ = model_and_data()
    monkeypatch.setitem(backends_mod._cache, "cpp", (None, BackendStatus("cpp", False, ("cpu",), "no compiler")))
    monkeypatch.setattr(backends_mod, "_announced", set())
    with pytest.raises(BackendUnavailable, match=r"backend='cpp' is unavailable: no compiler"):
        TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="cpp")
    with caplog.at_level("INFO", logger="tsam_fast"):
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="auto")
        TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="auto")
    assert opt.backend_name("cpu") == "reference"
    lines = [r.getMessage() for r in caplog.records if "backend 'auto'" in r.getMessage()]
    assert len(lines) == 1 and "cpp unavailable: no compiler" in lines[0]


def _trained(cfg=CONFIGS["ascent"]):
    """The linear model and a reference-backend TSAM of ``cfg`` after one step (momentum buffers exist)."""
    model, x = model_and_data()
    opt = cfg.build(model, lr=0.1, momentum=0.9, radius=0.1, backend="reference")
    opt.step(LINEAR.closure(model, (x, None)))
    return model, x, opt


@pytest.mark.parametrize("cfg,position", positions(CONFIGS["ascent"], CONFIGS["random"], CONFIGS["hmc"],
                                                   CONFIGS["ascent-shared-adaptive"]))
@pytest.mark.parametrize("failure", ["raise", "nan-loss", "inf-loss"])
def test_failing_closure_undoes_the_step(cfg, position, failure):
    model, x, opt = _trained(cfg)
    snap = snapshot(model, opt)
    with pytest.raises(KeyError if failure == "raise" else NonFiniteLossError):
        opt.step(faulty_closure(model, x, position, failure))
    assert_unchanged(snap)
    assert all(p.grad is None for p in model.parameters())
    assert opt.closure_index is None
    loss = opt.step(LINEAR.closure(model, (x, None)))  # and it still trains
    assert math.isfinite(float(loss)) and opt.step_count == snap.step_count + 1


BAD_CLOSURES = [
    (lambda m, x: None, ValueError, "returned None"),
    (lambda m, x: (l := m(x).square()).sum().backward() or l, ValueError, r"scalar loss, got shape \(6, 3\)"),
    (lambda m, x: m(x).square().mean(), RuntimeError, r"must call\s+loss.backward\(\)"),
    (lambda m, x: (m(x).square().mean().backward(), torch.tensor(3))[1], TypeError, "torch.int64 loss"),
    (lambda m, x: (m(x).square().mean().backward(), "loss")[1], TypeError, "as a tensor, got str"),
]


@pytest.mark.parametrize("fn,exc,match", BAD_CLOSURES, ids=["none", "non-scalar", "no-backward", "int", "str"])
def test_bad_closures(fn, exc, match):
    model, x, opt = _trained()
    snap = snapshot(model, opt)
    with pytest.raises(exc, match=match):
        opt.step(lambda: fn(model, x))
    assert_unchanged(snap)


def test_missing_closure():
    model, x, opt = _trained()
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


def test_nested_step_is_rejected():
    model, x, opt = _trained()
    snap = snapshot(model, opt)

    def closure():
        opt.step(lambda: (l := model(x).sum()).backward() or l)

    with pytest.raises(RuntimeError, match="inside its own closure"):
        opt.step(closure)
    assert_unchanged(snap)


def test_check_finite_off_lets_nan_through_without_raising():
    model, x = model_and_data()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, check_finite=False, backend="reference")
    loss = opt.step(lambda: (l := model(x).square().mean() * float("nan")).backward() or l)
    assert math.isnan(float(loss))


def test_state_dict_of_another_model_shape_is_rejected():
    model, x, opt = _trained()
    other = nn.Linear(4, 5)
    opt2 = TSAM(other.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference")
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(5, 4\) but its saved 'momentum_buffer' has shape"):
        opt2.load_state_dict(opt.state_dict())
    assert opt2.step_count == 0 and not opt2.base_optimizer.state


def test_deepcopy_continues_identically():
    import copy

    model, x, opt = _trained()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is model2.weight
    for _ in range(2):
        opt.step(LINEAR.closure(model, (x, None)))
        opt2.step(LINEAR.closure(model2, (x, None)))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    assert opt2.step_count == opt.step_count == 3
