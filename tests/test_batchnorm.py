"""The batch-norm policies, each against an independent implementation of it.

* ``"once_per_step"`` (``bn_update_once_per_step``): only a step's first evaluation updates the running
  statistics. Oracle: a closure that saves every batch-norm buffer before a later evaluation's forward and
  copies it back after the backward.
* ``"per_sample"`` (``bn_update_per_sample``, the TSAM authors' loop): the first evaluation of each sample
  updates. Oracle: the authors' momentum-0 trick (momentum set to 0 for a sample's later evaluations, put
  back for its first), with "first of its sample" derived from the sampler's structure, not from the plan.

Both run a few real steps (lr > 0, so the points differ from step to step) under ``step(closure)`` and the
closure-free loop, and must match the oracle bit for bit: parameters, running statistics and
``num_batches_tracked``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsam_fast import (BN_POLICIES, TSAM, bn_running_stats, bn_update_once_per_step, bn_update_per_sample)

from tables import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLERS = {
    "ascent": dict(sampler="ascent", num_samples=3),
    "random": dict(sampler="random", num_samples=3),
    "hmc": dict(sampler="hmc", num_samples=2, hmc_steps=2),
}
STEPS = 3


def net(momentum):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 2), nn.BatchNorm1d(2, momentum=momentum))


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# The options beyond the samplers, each changing which evaluation is a sample's first (the plan's numbering)
VARIANTS = {
    "shared-ascent": dict(sampler="ascent", num_samples=3, shared_ascent=True),
    "backward-samples": dict(sampler="random", num_samples=3, backward_samples=2),
    "backward-one-of-four": dict(sampler="random", num_samples=4, backward_samples=1),
    "shared-backward-top": dict(sampler="ascent", num_samples=3, shared_ascent=True, backward_samples=1,
                                backward_select="top"),
    "tilt-every": dict(sampler="random", num_samples=2, tilt_every=2),
}


def first_of_its_sample(options, index: int) -> bool:
    """From the sampler's definition: ascent = (ascent, sample) pairs, random = one evaluation per sample,
    hmc = K leapfrogs then the sample evaluation. With an evaluation at theta0 first (``shared_ascent``,
    ``tilt_every``), that one is sample 0's first; with ``backward_samples`` the s scores are one evaluation
    per sample and the backwards at drawn samples come after them."""
    if index == 0:
        return True
    origin = options.get("shared_ascent", False) or options.get("tilt_every", 1) > 1
    i = index - origin  # position among the samples' evaluations
    if origin and i == 0:
        return False
    if options.get("backward_samples") is not None:
        return i < options["num_samples"]
    if options.get("shared_ascent", False):
        return True
    per_sample = {"ascent": 2, "random": 1, "hmc": options.get("hmc_steps", 1) + 1}[options["sampler"]]
    return i % per_sample == 0


def make(momentum, options):
    model = net(momentum)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, radius=0.3, seed=5,
               backend="reference", **options)
    return model, opt


def run_steps(model, opt, x, loop: bool, before=None, after=None):
    """STEPS TSAM steps; ``before(index)``/``after(index)`` wrap each evaluation (the oracles' mechanism)."""
    for _ in range(STEPS):
        if loop:
            run = opt.begin_step()
            for ev in run:
                before and before(ev.index)
                with torch.set_grad_enabled(ev.backward):  # a score (backward_samples): a forward only
                    loss = model(x).square().mean()
                ev.backward and loss.backward()
                after and after(ev.index)
                run.record(loss)
            run.finish()
        else:
            def closure(backward=True):
                index = opt.closure_index
                before and before(index)
                loss = model(x).square().mean()
                backward and loss.backward()
                after and after(index)
                return loss
            opt.step(closure)


def once_per_step_oracle(model):
    saved = {}

    def before(index):
        if index > 0:
            saved.update({id(b): b.clone() for m in batch_norms(model) for b in m.buffers()})

    def after(index):
        if index > 0:
            for m in batch_norms(model):
                for b in m.buffers():
                    b.copy_(saved[id(b)])
    return before, after


def authors_oracle(model, options):
    """The reference loop's trick: momentum 0 for the forwards that must not update (BatchNorm still counts
    them in num_batches_tracked)."""
    layers = batch_norms(model)
    original = [m.momentum for m in layers]

    def before(index):
        for m, mom in zip(layers, original):
            m.momentum = mom if first_of_its_sample(options, index) else 0.0

    def after(index):
        for m, mom in zip(layers, original):
            m.momentum = mom
    return before, after


def assert_same_state(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("loop", [False, True], ids=["closure", "loop"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("policy", ["once_per_step", "per_sample"])
def test_policy_matches_its_oracle(policy, momentum, sampler, loop):
    options = SAMPLERS[sampler]
    x = torch.randn(8, 3, 8, 8)
    model, opt = make(momentum, options)
    handle = bn_running_stats(model, opt, policy)
    run_steps(model, opt, x, loop)

    ref, ref_opt = make(momentum, options)
    oracle = once_per_step_oracle(ref) if policy == "once_per_step" else authors_oracle(ref, options)
    run_steps(ref, ref_opt, x, loop, *oracle)
    assert_same_state(model, ref)

    per_step = opt.evaluations_per_step
    updates = 1 if policy == "once_per_step" else options["num_samples"]
    counted = STEPS * (1 if policy == "once_per_step" else per_step)
    assert int(model[1].num_batches_tracked) == counted
    # the policy is not a no-op: a model with every forward updating ends elsewhere (unless it coincides)
    if updates < per_step:
        bare, bare_opt = make(momentum, options)
        run_steps(bare, bare_opt, x, loop)
        assert not torch.equal(bare[1].running_mean, model[1].running_mean)

    handle.remove()  # then every forward updates again
    before = int(model[1].num_batches_tracked)
    run_steps(model, opt, x, loop)
    assert int(model[1].num_batches_tracked) == before + STEPS * per_step


@pytest.mark.parametrize("loop", [False, True], ids=["closure", "loop"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_per_sample_policy_over_every_variant(variant, loop):
    """The numbering of the options beyond the samplers (an evaluation at theta0, forward-only scores, drawn
    backwards, steps between full tilts): per_sample still matches the oracle bit for bit."""
    options = VARIANTS[variant]
    x = torch.randn(8, 3, 8, 8)
    model, opt = make(0.1, options)
    bn_update_per_sample(model, opt)
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    run_steps(model, opt, x, loop)
    ref, ref_opt = make(0.1, options)
    run_steps(ref, ref_opt, x, loop, *authors_oracle(ref, options))
    assert_same_state(model, ref)
    assert int(model[1].num_batches_tracked) == forwards[0]  # every training forward counts
    fresh, fresh_opt = make(0.1, options)  # and the policy is not a no-op
    run_steps(fresh, fresh_opt, x, loop)
    assert not torch.equal(fresh[1].running_mean, model[1].running_mean)


def test_once_per_step_is_one_forward_at_the_first_point():
    """lr = 0: the parameters stay at theta0, so the statistics after a step are those of ONE forward at the
    first evaluation's point, replayed on a copy."""
    x = torch.randn(8, 3, 8, 8)
    model = net(0.1)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.0, num_samples=3, radius=0.1, backend="reference")
    bn_update_once_per_step(model, opt)
    first_point = {}

    def closure():
        if opt.closure_index == 0:
            first_point.update({k: v.clone() for k, v in model.state_dict().items()})
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    replay = net(0.1)
    replay.load_state_dict(first_point)
    with torch.no_grad():
        replay(x)
    for (name, buf), (_, expected) in zip(model.named_buffers(), replay.named_buffers()):
        assert torch.equal(buf, expected), name
    assert int(model[1].num_batches_tracked) == 1
    model(x)  # outside a step every forward updates
    assert int(model[1].num_batches_tracked) == 2


def test_eval_mode_forwards_inside_a_step_are_untouched():
    x = torch.randn(8, 3, 8, 8)
    model, opt = make(0.1, SAMPLERS["ascent"])
    bn_update_per_sample(model, opt)
    stats = []

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        stats.append(model[1].running_mean.clone())
        return loss

    opt.step(closure)
    assert int(model[1].num_batches_tracked) == opt.evaluations_per_step
    # evaluations 0, 2, 4 update (first of samples 0, 1, 2); 1, 3, 5 leave the statistics as they were
    for i in (1, 3, 5):
        assert torch.equal(stats[i], stats[i - 1])
    for i in (2, 4):
        assert not torch.equal(stats[i], stats[i - 1])


class _Wrapper:
    """What Lightning's LightningOptimizer and Accelerate's AcceleratedOptimizer look like here."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


@pytest.mark.parametrize("policy", ["once_per_step", "per_sample"])
def test_a_trainers_wrapper_is_accepted(policy):
    model, opt = make(0.1, SAMPLERS["ascent"])
    bn_running_stats(model, _Wrapper(opt), policy)
    run_steps(model, opt, torch.randn(8, 3, 8, 8), loop=True)
    assert int(model[1].num_batches_tracked) == STEPS * (1 if policy == "once_per_step" else 6)


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, o: bn_update_once_per_step(nn.Linear(2, 2), o), ValueError, "no batch-norm layer"),
    (lambda m, o: bn_update_per_sample(nn.Linear(2, 2), o), ValueError, "no batch-norm layer"),
    (lambda m, o: bn_running_stats(m, o, "twice"), ValueError, "invalid policy='twice'.*'per_sample'"),
    (lambda m, o: bn_update_per_sample(m, torch.optim.SGD(m.parameters(), lr=0.1)), TypeError,
     "expected the TSAM optimizer.*got SGD"),
], ids=["no-bn-once", "no-bn-per-sample", "bad-policy", "not-tsam"])
def test_bad_input_is_a_clear_error(call, exc, match):
    model, opt = make(0.1, SAMPLERS["ascent"])
    with pytest.raises(exc, match=match):
        call(model, opt)


def test_every_forward_installs_nothing():
    model, opt = make(0.1, SAMPLERS["ascent"])
    assert set(BN_POLICIES) == {"once_per_step", "per_sample", "every_forward"}
    bn_running_stats(model, opt, "every_forward").remove()
    run_steps(model, opt, torch.randn(8, 3, 8, 8), loop=False)
    assert int(model[1].num_batches_tracked) == STEPS * opt.evaluations_per_step
