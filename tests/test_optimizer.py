"""TSAM (reference backend) against the independent naive implementation and the special cases of docs/design.md §3."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tsam_fast import TSAM, rng
from naive import NaiveTSAM

from conftest import assert_close
from tables import CONFIGS, TOYS

SMALL = TOYS["small-mlp"]  # 6-16-3 tanh MLP, 32 points, 3 classes, cross-entropy


def mlp(seed=0, dtype=torch.float32):
    return SMALL.model(seed=seed, dtype=dtype)


def data():
    return SMALL.batch()


def make_closure(model, x, y, log=None):
    """The clean closure; ``log`` collects the parameters at each call."""
    return SMALL.closure(model, (x, y), log)


def run_pair(steps=4, model_fn=mlp, groups_fn=None, **kw):
    """The same training with TSAM(reference) and NaiveTSAM; compares the last step's losses, weights and
    tilted gradients, and returns both models' parameters."""
    x, y = data()
    out, opts, models = [], [], []
    for impl in ("tsam", "naive"):
        model = model_fn()
        params = groups_fn(model) if groups_fn else model.parameters()
        base = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
        opt = (TSAM(params, torch.optim.SGD, backend="reference", **kw, **base) if impl == "tsam"
               else NaiveTSAM(params, torch.optim.SGD, **kw, **base))
        for _ in range(steps):
            opt.step(make_closure(model, x, y))
        out.append([p.detach().clone() for p in model.parameters()])
        opts.append(opt)
        models.append(model)
    tsam, naive = opts
    assert_close(tsam.last_losses, torch.tensor(naive.last_losses), rtol=1e-5, atol=1e-6, what="sample losses")
    if groups_fn is None:
        t = kw.get("tilt", 1.0)
        t = t(steps - 1) if callable(t) else t
        want = torch.softmax(torch.tensor(naive.last_losses, dtype=torch.float64) * (t - kw.get("delta", 0.0)), 0)
        assert_close(tsam.last_weights, want, rtol=1e-4, atol=1e-7, what="weights")
    for p, q in zip(*(m.parameters() for m in models)):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, what="tilted gradient")
    return out


SAMPLER_CASES = [
    dict(sampler="ascent", start="gaussian", radius=0.05, tilt=1.0),
    dict(sampler="ascent", start="sphere", radius=0.02, tilt=5.0),
    dict(sampler="ascent", start="ball", radius=0.05, tilt=2.0),
    dict(sampler="ascent", start="none", tilt=1.0, num_samples=2),
    dict(sampler="ascent", start="gaussian", noise_scale=0.01, radius=10.0, tilt=3.0),
    dict(sampler="ascent", start="gaussian", radius=0.05, adaptive=True, rho=0.5),
    dict(sampler="ascent", start="gaussian", radius=0.05, max_grad_norm=0.1, tilt=20.0),
    dict(sampler="ascent", start="gaussian", radius=0.05, tilt=5.0, shared_ascent=True),
    dict(sampler="ascent", start="sphere", radius=0.05, tilt=2.0, shared_ascent=True, adaptive=True, rho=0.5,
         max_grad_norm=0.1, num_samples=4),
    dict(sampler="ascent", start="none", tilt=1.0, shared_ascent=True, num_samples=1),
    dict(sampler="random", start="gaussian", radius=0.1, tilt=10.0, num_samples=4),
    dict(sampler="random", start="sphere", radius=0.1, tilt=0.0),
    dict(sampler="hmc", start="gaussian", radius=0.05, hmc_steps=1, hmc_step_size=0.01),
    dict(sampler="hmc", start="sphere", radius=0.05, hmc_steps=3, hmc_step_size=0.02, hmc_sigma=0.5, delta=0.5),
]


@pytest.mark.parametrize("kw", SAMPLER_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_naive(kw):
    got, want = run_pair(**kw)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-5, atol=1e-6, what=str(kw))


def test_matches_naive_with_group_overrides():
    def groups(model):
        return [{"params": model[0].parameters(), "tilt": 4.0, "rho": 0.1, "radius": 0.02, "lr": 0.05},
                {"params": model[2].parameters()}]
    got, want = run_pair(groups_fn=groups, tilt=1.0, rho=0.03, radius=0.05)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-5, atol=1e-6, what="group overrides")


def test_tilt_schedule_matches_naive():
    from tsam_fast import linear_warmup

    got, want = run_pair(steps=4, tilt=linear_warmup(8.0, 3), radius=0.05)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-5, atol=1e-6, what="schedule")


def grads_at(point, x, y):
    """The gradient of the loss at logged parameter values, recomputed on a fresh model."""
    probe = mlp()
    with torch.no_grad():
        for q, v in zip(probe.parameters(), point):
            q.copy_(v)
    nn.functional.cross_entropy(probe(x), y).backward()
    return [q.grad for q in probe.parameters()]


def _grads_per_sample(model, closure, s, **kw):
    """Gradients at each sample point, recomputed independently from the closure-call log."""
    log = []
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.0, num_samples=s, backend="reference", **kw)
    x, y = data()
    opt.step(make_closure(model, x, y, log))
    return opt, log


def one_random_step(**kw):
    """One step with lr=0 of the ``random`` sampler; returns the parameters' points at every closure call."""
    model = mlp()
    x, y = data()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.0, sampler="random", backend="reference", **kw)
    log = []
    tilted = opt.step(make_closure(model, x, y, log))
    return model, x, y, opt, log, tilted


def test_zero_tilt_is_plain_average():
    model, x, y, opt, log, tilted = one_random_step(tilt=0.0, num_samples=4, radius=0.1)
    assert_close(opt.last_weights, torch.full((4,), 0.25), rtol=0, atol=1e-7, what="weights at t=0")
    assert_close(tilted, opt.last_losses.mean(), rtol=1e-6, atol=0, what="tilted loss at t=0")
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for point in log:
        for e, g in zip(expected, grads_at(point, x, y)):
            e += g / 4
    for p, e in zip(model.parameters(), expected):
        assert_close(p.grad, e, rtol=1e-5, atol=1e-7, what="mean gradient")


def test_single_ascent_sample_is_sam():
    """sampler='ascent', start='none', s=1: exactly SAM (Foret et al.) as commonly implemented."""
    x, y = data()
    a, b = mlp(), mlp()
    opt = TSAM(a.parameters(), torch.optim.SGD, num_samples=1, start="none", rho=0.05, tilt=3.0,
               backend="reference", lr=0.1, momentum=0.9)
    base = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.step(make_closure(a, x, y))
        # SAM: e_w = rho * g / (||g|| + 1e-12); step at w + e_w with the gradient there; undo e_w
        base.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm(2) for p in b.parameters()]), 2)
            e = [0.05 * p.grad / (norm + 1e-12) for p in b.parameters()]
            for p, ew in zip(b.parameters(), e):
                p.add_(ew)
        base.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        with torch.no_grad():
            for p, ew in zip(b.parameters(), e):
                p.sub_(ew)
        base.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, rtol=1e-6, atol=1e-7, what="SAM")


def test_large_tilt_picks_the_max_loss_sample():
    model, x, y, opt, log, tilted = one_random_step(tilt=1e4, num_samples=3, radius=0.5)
    assert torch.isfinite(opt.last_weights).all() and torch.isfinite(tilted)
    worst = int(opt.last_losses.argmax())
    assert float(opt.last_weights[worst]) > 0.999
    assert abs(float(tilted) - float(opt.last_losses.max())) < 1e-3
    for p, g in zip(model.parameters(), grads_at(log[worst], x, y)):
        assert torch.isfinite(p.grad).all()
        assert_close(p.grad, g, rtol=1e-4, atol=1e-6, what="max-loss gradient")


def test_ascent_geometry():
    """Second point - first point = rho * g0 / ||g0||, g0 the gradient at the first point."""
    model = mlp()
    x, y = data()
    opt, log = _grads_per_sample(model, None, 2, rho=0.3, radius=0.05)
    for j in range(2):
        first, second = log[2 * j], log[2 * j + 1]
        g = grads_at(first, x, y)
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
        for a, b, gi in zip(first, second, g):
            assert_close(b - a, 0.3 * gi / norm, rtol=1e-4, atol=2e-7, what="ascent step")
        step = math.sqrt(sum(float(((b - a).double() ** 2).sum()) for a, b in zip(first, second)))
        assert abs(step - 0.3) < 1e-5


@pytest.mark.parametrize("start,bound", [("sphere", "eq"), ("gaussian", "le"), ("ball", "le")])
def test_random_start_radius(start, bound):
    model = mlp()
    theta0 = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    log = []
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.0, num_samples=3, sampler="random", start=start,
               radius=0.25, backend="reference")
    opt.step(make_closure(model, x, y, log))
    for point in log:
        norm = math.sqrt(sum(float(((a - b).double() ** 2).sum()) for a, b in zip(point, theta0)))
        if bound == "eq":
            assert abs(norm - 0.25) < 1e-6
        else:
            assert 0 < norm <= 0.25 + 1e-6
    if start == "gaussian":  # ~N(0, I) in d dims has norm ~ sqrt(d) >> 0.25: clipped to the radius
        assert abs(norm - 0.25) < 1e-6


def test_small_gaussian_is_not_clipped():
    model = mlp()
    theta0 = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    log = []
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.0, num_samples=1, sampler="random",
               noise_scale=1e-3, radius=10.0, seed=5, backend="reference")
    opt.step(make_closure(model, x, y, log))
    seed = rng.stream_seed(5, 0, 0, rng.STREAM_START)
    offset = 0
    for a, b in zip(log[0], theta0):
        xi = rng.normal(seed, offset, b.numel()).reshape(b.shape)
        assert_close(a - b, 1e-3 * xi, rtol=1e-3, atol=1e-8, what="unclipped gaussian")
        offset += b.numel()


def test_seeds():
    def train(seed):
        model = mlp()
        x, y = data()
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, seed=seed, backend="reference")
        for _ in range(3):
            opt.step(make_closure(model, x, y))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(train(7), train(7))
    assert not torch.equal(train(7), train(8))


@pytest.mark.parametrize("sampler", ["ascent", "random", "hmc"])
def test_resume_continues_identically(sampler):
    x, y = data()
    kw = dict(sampler=sampler, radius=0.05, tilt=2.0, seed=3, backend="reference", lr=0.1, momentum=0.9)
    model = mlp()
    opt = TSAM(model.parameters(), torch.optim.SGD, **kw)
    for _ in range(3):
        opt.step(make_closure(model, x, y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(make_closure(model, x, y))
    resumed = mlp(seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = TSAM(resumed.parameters(), torch.optim.SGD, **{**kw, "seed": 12345})
    opt2.load_state_dict(saved_opt)
    assert opt2.seed == 3 and opt2.step_count == 3
    for _ in range(3):
        opt2.step(make_closure(resumed, x, y))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trips_through_weights_only_load(tmp_path):
    from tsam_fast import linear_decay

    model = mlp()
    x, y = data()
    opt = TSAM(model.parameters(), torch.optim.SGD, tilt=linear_decay(5.0, 10), backend="reference", lr=0.1,
               momentum=0.9)
    opt.step(make_closure(model, x, y))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    opt2 = TSAM(mlp().parameters(), torch.optim.SGD, tilt=linear_decay(5.0, 10), backend="reference", lr=0.1)
    opt2.load_state_dict(sd)
    assert callable(opt2.param_groups[0]["tilt"]) and opt2.step_count == 1
    assert opt2.param_groups[0]["momentum"] == 0.9


def test_lr_scheduler_drives_the_base_optimizer():
    model = mlp()
    x, y = data()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.step(make_closure(model, x, y))
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_step_hooks_fire_once_per_step():
    model = mlp()
    x, y = data()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.step(make_closure(model, x, y))
    assert calls == ["pre", "post"]


def _spec_calls(sampler="ascent", num_samples=3, hmc_steps=1, shared_ascent=False, **_):
    """The spec's closure calls per step: 2s for ascent (s + 1 with a shared ascent), s for random,
    s(1 + K) for hmc."""
    if shared_ascent:
        return num_samples + 1
    return num_samples * {"ascent": 2, "random": 1, "hmc": 1 + hmc_steps}[sampler]


def test_closure_call_count_per_sampler():
    """A step calls the closure as often as the spec says and as ``evaluations_per_step`` reports, for
    these counts and for every config of tests/tables.py (whose call counts the failure tests use)."""
    x, y = data()
    for sampler, s, k, expected in [("ascent", 3, 1, 6), ("random", 3, 1, 3), ("hmc", 2, 3, 8)]:
        model = mlp()
        log = []
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, sampler=sampler, num_samples=s, hmc_steps=k,
                   backend="reference")
        opt.step(make_closure(model, x, y, log))
        assert len(log) == expected == opt.evaluations_per_step, sampler
    for cfg in CONFIGS.values():
        model = mlp()
        log = []
        opt = cfg.build(model, lr=0.1, backend="reference")
        opt.step(make_closure(model, x, y, log))
        assert len(log) == _spec_calls(**cfg.options) == opt.evaluations_per_step == cfg.evaluations(), cfg.id


def test_extra_memory_does_not_grow_with_samples():
    sizes = []
    for s in (1, 4, 16):
        model = mlp()
        x, y = data()
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, num_samples=s, backend="reference")
        opt.step(make_closure(model, x, y))
        sizes.append(opt.extra_memory_bytes())
    d = sum(p.numel() for p in mlp().parameters())
    assert sizes == [d * 4 + d * 4] * 3  # theta0 (fp32 params) + the fp32 accumulator


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters_train(low):
    x, y = data()
    losses = {}
    for dtype in (torch.float32, low):
        model = mlp(dtype=dtype)
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9, radius=0.02, backend="reference")
        for _ in range(30):
            loss = opt.step(make_closure(model, x.to(dtype), y))
        losses[dtype] = float(loss)
        assert all(p.dtype == dtype for p in model.parameters())
        assert opt.base_optimizer.param_groups[0]["params"][0].grad.dtype == dtype
    assert losses[low] < 0.8 * 1.0986  # well below the initial ~log(3)
    assert abs(losses[low] - losses[torch.float32]) < 0.1


def test_closure_returning_a_reused_buffer():
    """The step keeps its own copy of each loss: a closure that returns (and then overwrites) one
    buffer of its own gives the same step as one that returns fresh tensors."""
    x, y = data()
    results = []
    for reuse in (False, True):
        model = mlp()
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, tilt=50.0, radius=0.5, seed=4, backend="reference")
        buf = torch.zeros(())

        def closure():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return buf.copy_(loss.detach()) if reuse else loss

        for _ in range(3):
            opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tilt", [1e-6, 1e-4, 1.0, 50.0, 1e4])
def test_returned_tilted_loss_is_accurate(tilt):
    """(1/t) log mean_j exp(t L_j), checked in float64: no cancellation at small t, no overflow at large t."""
    x, y = data()
    model = mlp()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, tilt=tilt, radius=2.0, seed=4, backend="reference")
    got = opt.step(make_closure(model, x, y))
    losses = opt.last_losses.double()
    want = (torch.logsumexp(losses * tilt, 0) - math.log(losses.numel())) / tilt
    assert losses.max() - losses.min() > 1e-3  # the samples differ: the tilt has something to weigh
    assert abs(got.item() - want.item()) <= 2e-6 * abs(want.item()), (got.item(), want.item())
