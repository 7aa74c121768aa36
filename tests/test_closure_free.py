"""The closure-free API (``TSAM.begin_step``): the user's loop drives each gradient evaluation.

It runs the same step engine as ``step(closure)``, so trajectories are bit-identical for every sampler
and option; abandoning the loop at any point (exception, break, dropping the run) or misusing it leaves
the parameters exactly at theta0, no gradients and the optimizer state unchanged.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from tsam_fast import TSAM, NonFiniteLossError, bn_update_once_per_step

from tables import assert_unchanged, evaluations, one_thread, snapshot  # noqa: F401  (one_thread: fixture)

CONFIGS = {
    "ascent": dict(),
    "ascent-adaptive-clip": dict(adaptive=True, max_grad_norm=0.5, start="sphere"),
    "random-ball": dict(sampler="random", start="ball"),
    "hmc": dict(sampler="hmc", hmc_steps=2),
    "sam": dict(num_samples=1, start="none"),
    "t0-none": dict(tilt=0.0, start="none"),
    "shared-ascent": dict(shared_ascent=True, adaptive=True, radius_mode="relative", noise_scale=0.05),
}
BACKENDS = ["reference", "cpp"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(backend="auto", groups=True, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    params = [dict(params=model[0].parameters(), rho=0.1), dict(params=model[2].parameters(), tilt=3.0)] \
        if groups else model.parameters()
    opt = TSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3, radius=0.2, seed=3,
               backend=backend, **kw)
    return model, x, y, opt


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _evaluated(model, x, y):
    """One evaluation's forward and backward; its loss."""
    loss = _loss(model, x, y)
    loss.backward()
    return loss


def _loop_step(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        run.record(_evaluated(model, x, y))
    return run.finish()


def _assert_unchanged(snap, grads_left=False):
    """``tables.assert_unchanged`` (parameters at theta0 bit for bit, state_dict, step_count, ...) and no
    gradient left behind; ``grads_left``: the step had finished, its gradients must stay as they were."""
    assert_unchanged(snap, in_step=not grads_left)
    assert grads_left or all(p.grad is None for p in snap.model.parameters()), "a gradient was left behind"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loop_is_bit_identical_to_closure(name, backend):
    m1, x, y, o1 = _setup(backend, **CONFIGS[name])
    m2, _, _, o2 = _setup(backend, **CONFIGS[name])

    def closure():
        loss = _loss(m1, x, y)
        loss.backward()
        return loss

    for _ in range(4):
        t1 = o1.step(closure)
        t2 = _loop_step(o2, m2, x, y)
        assert torch.equal(t1, t2)
        assert torch.equal(o1.last_weights, o2.last_weights)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert o1.state_dict()["tsam"] == o2.state_dict()["tsam"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_evaluations_roles_and_counts(name):
    model, x, y, opt = _setup(**CONFIGS[name])
    run = opt.begin_step()
    seen = []
    for ev in run:
        assert opt.closure_index == ev.index == len(seen)
        seen.append(ev)
        run.record(_evaluated(model, x, y))
    run.finish()
    assert len(seen) == opt.evaluations_per_step == len(run.evaluations)
    s = opt.num_samples
    if opt.shared_ascent:  # one evaluation at theta0, then the samples: s + 1
        assert [(ev.role, ev.sample) for ev in seen] == [("origin", 0)] + [("sample", j) for j in range(s)]
        return
    per = {"ascent": ["ascent", "sample"], "random": ["sample"], "hmc": ["leapfrog"] * opt.hmc_steps + ["sample"]}
    assert [ev.role for ev in seen] == per[opt.sampler] * s
    assert [ev.sample for ev in seen] == [j for j in range(s) for _ in per[opt.sampler]]


def _matches_plain_loop(evaluate, steps, exact):
    """Drive one optimizer with the plain loop and a twin whose evaluations run ``evaluate(opt, model, x,
    y) -> loss``; the parameters must agree (bit for bit when ``exact``)."""
    m1, x, y, o1 = _setup()
    m2, _, _, o2 = _setup()
    for _ in range(steps):
        _loop_step(o1, m1, x, y)
        run = o2.begin_step()
        for _ in run:
            run.record(evaluate(o2, m2, x, y))
        run.finish()
    for a, b in zip(m1.parameters(), m2.parameters()):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_micro_batches_accumulate_into_one_evaluation():
    """Several backwards in one evaluation add up: two half-batch means / 2 equal the full-batch mean."""
    def evaluate(opt, model, x, y):
        total = 0.0
        for xs, ys in ((x[:5], y[:5]), (x[5:], y[5:])):
            part = _loss(model, xs, ys) / 2
            part.backward()
            total = total + part.detach()
        return total

    _matches_plain_loop(evaluate, steps=3, exact=False)


def test_zero_grad_inside_an_evaluation_keeps_the_flat_views():
    def evaluate(opt, model, x, y):
        opt.zero_grad()  # the habit of many loops: harmless inside an evaluation
        loss = _evaluated(model, x, y)
        return loss

    _matches_plain_loop(evaluate, steps=2, exact=True)


# -- abandoning the loop ------------------------------------------------------------------------

# Every option that shapes a step's plan, for the numbering of its evaluations (both drivers)
PLANS = {
    **CONFIGS,
    "backward-samples": dict(sampler="random", num_samples=3, backward_samples=2),
    "backward-one-of-four": dict(sampler="random", num_samples=4, backward_samples=1),
    "shared-backward-top": dict(shared_ascent=True, num_samples=3, backward_samples=1, backward_select="top"),
    "tilt-every": dict(sampler="random", num_samples=2, tilt_every=2),
    "tilt-every-hmc": dict(sampler="hmc", hmc_steps=2, num_samples=2, tilt_every=2),
}


@pytest.mark.parametrize("loop", [False, True], ids=["closure", "loop"])
@pytest.mark.parametrize("name", list(PLANS))
def test_index_is_the_position(name, loop):
    """closure_index == ev.index == the evaluation's position in its step, in every plan (full steps and
    the periodic tilt's steps between), and the plan is numbered 0, 1, ... (drawn samples included)."""
    options = PLANS[name]  # (backward_samples draws for all groups at once: one tilt, one group here)
    model, x, y, opt = _setup(groups="backward_samples" not in options, **options)
    assert [ev.index for ev in opt.config.plan] == list(range(len(opt.config.plan)))
    for _ in range(3):
        expected = opt.evaluations_per_step
        seen = []
        if loop:
            run = opt.begin_step()
            for ev in run:
                assert opt.closure_index == ev.index == len(seen) == run.evaluation.index
                seen.append(ev.index)
                with torch.set_grad_enabled(ev.backward):
                    loss = _loss(model, x, y)
                ev.backward and loss.backward()
                run.record(loss)
            run.finish()
            assert [ev.index for ev in run.evaluations] == list(range(expected))
            assert all(ev.sample >= 0 for ev in run.evaluations)  # the drawn samples are filled in
        else:
            def closure(backward=True):
                seen.append(opt.closure_index)
                loss = _loss(model, x, y)
                backward and loss.backward()
                return loss
            opt.step(closure)
        assert seen == list(range(expected))


POSITIONS = [(name, k) for name in ("ascent", "hmc", "random-ball", "shared-ascent") for k in range(evaluations(CONFIGS[name]))]


class Boom(Exception):
    pass


@pytest.mark.parametrize("name,position", POSITIONS)
@pytest.mark.parametrize("how", ["exception", "break", "drop", "abandon"])
def test_leaving_the_loop_restores_theta0(name, position, how):
    model, x, y, opt = _setup(**CONFIGS[name])
    _loop_step(opt, model, x, y)  # base-optimizer state exists
    snap = snapshot(model, opt)
    run = opt.begin_step()
    try:
        for ev in run:
            loss = _evaluated(model, x, y)
            if ev.index == position:
                if how == "exception":
                    raise Boom()
                if how == "abandon":
                    run.abandon()
                break
            run.record(loss)
    except Boom:
        pass
    if how == "drop":
        del run
        gc.collect()
    _assert_unchanged(snap)
    if how != "drop":
        with pytest.raises(RuntimeError, match="abandoned"):
            run.finish()
    _loop_step(opt, model, x, y)  # the next step runs normally
    assert opt.step_count == snap.step_count + 1


def test_dropping_a_run_before_its_loop_restores_theta0():
    model, x, y, opt = _setup()
    theta0 = next(model.parameters()).detach().clone()
    snap = snapshot(model, opt)
    run = opt.begin_step()
    assert not torch.equal(next(model.parameters()).detach(), theta0)  # perturbed to the first point
    del run
    gc.collect()
    _assert_unchanged(snap)


# -- misuse: a clear error, nothing lost ---------------------------------------------------------


def _record_twice(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        loss = _evaluated(model, x, y)
        run.record(loss)
        run.record(loss)


def _finish_early(opt, model, x, y):
    run = opt.begin_step()
    for ev in run:
        run.record(_evaluated(model, x, y))
        if ev.index == 2:
            break
    run.finish()


def _finish_inside(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        run.record(_evaluated(model, x, y))
        run.finish()


def _step_inside_step(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        opt.begin_step()


def _closure_step_inside_loop(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        opt.step(lambda: (l := _loss(model, x, y)).backward() or l)


def _step_inside_step_caught(opt, model, x, y):
    """The error caught (a try/except around a training step): the first run is abandoned all the same,
    not left live at its perturbed point."""
    run = opt.begin_step()
    evaluations = iter(run)
    next(evaluations)
    theta0 = [b.clone() for b in run.layout.buckets[0].backup_parts]
    try:
        opt.begin_step()
    except RuntimeError as error:
        assert run.state == "abandoned" and opt.closure_index is None
        assert all(torch.equal(p, t) for p, t in zip(run.layout.buckets[0].theta, theta0))
        raise error


def _no_backward(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        run.record(_loss(model, x, y))


def _record_before_loop(opt, model, x, y):
    run = opt.begin_step()
    run.record(_evaluated(model, x, y))


def _skip_record(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        _loss(model, x, y).backward()


def _iterate_twice(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        run.record(_evaluated(model, x, y))
        break
    for _ in run:
        pass


def _finish_twice(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        run.record(_evaluated(model, x, y))
    run.finish()
    snap = snapshot(model, opt)
    try:
        run.finish()
    finally:
        _assert_unchanged(snap, grads_left=True)  # the finished step's gradient stays


def _nan_loss(opt, model, x, y):
    run = opt.begin_step()
    for ev in run:
        loss = _evaluated(model, x, y)
        run.record(loss * float("nan") if ev.index == 1 else loss)
    run.finish()


def _non_scalar(opt, model, x, y):
    run = opt.begin_step()
    for _ in run:
        loss = _evaluated(model, x, y)
        run.record(torch.stack([loss, loss]))


MISUSE = {
    "record-twice": (_record_twice, RuntimeError, "already recorded"),
    "finish-early": (_finish_early, RuntimeError, "abandoned|after 3 of the step's 6 evaluations"),
    "finish-inside-loop": (_finish_inside, RuntimeError, "after 1 of the step's 6 evaluations"),
    "step-inside-step": (_step_inside_step, RuntimeError, "already in progress"),
    "closure-step-inside-loop": (_closure_step_inside_loop, RuntimeError, "already in progress"),
    "step-inside-step-caught": (_step_inside_step_caught, RuntimeError, "it was abandoned"),
    "no-backward": (_no_backward, RuntimeError, r"no parameter received a gradient in this evaluation"),
    "record-before-loop": (_record_before_loop, RuntimeError, "before the step's loop"),
    "skip-record": (_skip_record, RuntimeError, "was not recorded"),
    "iterate-twice": (_iterate_twice, RuntimeError, "iterated once"),
    "finish-twice": (_finish_twice, RuntimeError, "already finished"),
    "nan-loss": (_nan_loss, NonFiniteLossError, "non-finite"),
    "non-scalar": (_non_scalar, ValueError, r"record\(\) takes a scalar loss"),
}


@pytest.mark.parametrize("name", list(MISUSE))
def test_misuse_is_a_clear_error_and_loses_nothing(name):
    fn, exc, match = MISUSE[name]
    model, x, y, opt = _setup()
    _loop_step(opt, model, x, y)
    snap = snapshot(model, opt) if name != "finish-twice" else None
    with pytest.raises(exc, match=match):
        fn(opt, model, x, y)
    gc.collect()
    if snap is not None:
        _assert_unchanged(snap)
    before = opt.step_count
    _loop_step(opt, model, x, y)  # nothing is stuck: the next step runs
    assert opt.step_count == before + 1


# -- trainers that own the backward -------------------------------------------------------------


def test_grad_scaler_in_the_loop_matches_the_closure():
    """``scaler.scale(loss).backward()`` in the loop, the unscaled loss recorded: as with a closure."""
    results = []
    for drive in ("closure", "loop"):
        model, x, y, opt = _setup(groups=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        opt.grad_scaler = scaler
        for _ in range(3):
            if drive == "closure":
                def closure():
                    loss = _loss(model, x, y)
                    scaler.scale(loss).backward()
                    return loss
                opt.step(closure)
            else:
                run = opt.begin_step()
                for _ in run:
                    loss = _loss(model, x, y)
                    scaler.scale(loss).backward()
                    run.record(loss)
                run.finish()
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_batch_norm_once_per_step_in_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    bn_update_once_per_step(model, opt)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for _ in range(3):
        _loop_step(opt, model, x, y)
    assert int(model[1].num_batches_tracked) == 3


def test_lightning_style_manual_optimization():
    """The README's sketch: the trainer owns the backward (here a stand-in for ``manual_backward``)."""
    model, x, y, opt = _setup(groups=False)
    backwards = []

    def manual_backward(loss):
        backwards.append(1)
        loss.backward()

    def training_step(batch):
        run = opt.begin_step()
        for _ in run:
            loss = _loss(model, *batch)
            manual_backward(loss)
            run.record(loss)
        return run.finish()

    first = float(training_step((x, y)))
    for _ in range(20):
        last = float(training_step((x, y)))
    assert last < first
    assert len(backwards) == 21 * opt.evaluations_per_step


def test_lr_scheduler_sees_the_closure_free_step():
    """torch's LR schedulers warn "lr_scheduler.step() before optimizer.step()" unless the optimizer's step
    ran; run.finish() is that step."""
    import warnings
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = opt.begin_step()
        for _ in run:
            loss = model(x).pow(2).mean()
            loss.backward()
            run.record(loss)
        run.finish()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
