"""TSAM inside ordinary training loops and the trainers people use: compiled models in the closure, LR
schedulers, and the recipes of examples/ run with the real PyTorch Lightning, transformers.Trainer and
Accelerate (resume bit-exact, equal to a plain loop, accumulation inside each evaluation, bf16)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from tsam_fast import TSAM, bn_update_once_per_step, bn_update_per_sample

from tables import one_thread, recipe  # noqa: F401  (one_thread: fixture)


def _pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    return a, b


def test_compiled_model_inside_the_closure():
    eager, model = _pair()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3)
    opts = [TSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, radius=0.1) for m in (eager, model)]
    for _ in range(3):
        opts[0].step(lambda: (l := eager(x).square().mean()).backward() or l)
        opts[1].step(lambda: (l := compiled(x).square().mean()).backward() or l)
    for p, q in zip(eager.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=10),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
], ids=["onecycle", "cosine", "plateau"])
def test_lr_schedulers_drive_the_base_optimizer(make):
    model, _ = _pair()
    x = torch.randn(4, 3)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = make(opt)
    lrs = []
    for _ in range(4):
        loss = opt.step(lambda: (l := model(x).square().mean()).backward() or l)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a loss that never improves: the lr halves after each step
        else:
            sched.step()
        lrs.append(opt.base_optimizer.param_groups[0]["lr"])
        assert torch.isfinite(loss)
    assert len(set(lrs)) > 1 and opt.param_groups is opt.base_optimizer.param_groups


# -- trainers: the real Lightning, transformers and Accelerate packages -------------------------------
# They are test-time dependencies (the `integrations` extra, installed by scripts/setup.sh); a test skips,
# naming the package, only where it cannot be imported. The recipes under examples/ are what is tested.

def _assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {bad[:4]} differ (largest gap " \
                    f"{max((a[k].double() - b[k].double()).abs().max().item() for k in bad):.3g})"


def test_accelerate_preempted_inside_a_step_resumes_the_identical_trajectory(tmp_path, one_thread):
    """SIGTERM delivered in the middle of step 6's second evaluation: the recipe's handler saves the state
    there (inside ``TSAM.unperturbed()``: the weights at theta0), the run stops after that step, and a run
    resumed from the checkpoint redoes step 6 and ends bit for bit where an uninterrupted run ends."""
    import os
    import signal
    ac = recipe("accelerate_tsam", "accelerate")
    from accelerate.state import AcceleratorState
    state = str(tmp_path / "preempted")

    def preempt(step, index):  # the parameters are at step 6's first sample point here
        if step == 6 and index == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    runs = []
    for kwargs in (dict(), dict(preempt_dir=state, on_evaluation=preempt), dict(resume=state)):
        AcceleratorState._reset_state(reset_partial_state=True)
        runs.append(ac.train(epochs=4, mixed_precision="no", **kwargs))
    AcceleratorState._reset_state(reset_partial_state=True)
    (_, full, full_tsam, losses), (_, cut, cut_tsam, cut_losses), (_, resumed, tsam, resumed_losses) = runs
    assert cut_tsam.step_count == 7 and len(cut_losses) == 7  # the interrupted step finished, then it stopped
    assert tsam.step_count == full_tsam.step_count == 16
    _assert_same_tensors(resumed.state_dict(), full.state_dict(), "preempted and resumed vs uninterrupted")
    assert torch.equal(torch.stack(resumed_losses), torch.stack(losses[6:]))


# Bit-exact, not "within fp32 roundoff": an interrupted and resumed run performs the same floating-point
# operations in the same order (same process, thread count and backend) on state restored bit for bit
# (parameters, TSAM's base-optimizer state, step counter and seed, the scheduler, the data position; the
# noise is counter-based, so it depends on (seed, step) only). Any gap would be a lost piece of state.

def test_lightning_resume_continues_the_identical_trajectory(tmp_path, one_thread):
    lt = recipe("lightning_tsam", "lightning")
    full, full_trainer = lt.fit(4)
    ckpt = str(tmp_path / "half.ckpt")
    lt.fit(2, save=ckpt)
    resumed, trainer = lt.fit(4, resume=ckpt)
    _assert_same_tensors(resumed.state_dict(), full.state_dict(), "resumed vs uninterrupted")
    opt, full_opt = trainer.optimizers[0], full_trainer.optimizers[0]
    assert opt.step_count == full_opt.step_count == trainer.global_step == 16  # Lightning counts TSAM steps
    assert opt.state_dict()["tsam"] == full_opt.state_dict()["tsam"]
    _assert_same_tensors({i: s["momentum_buffer"] for i, s in opt.state_dict()["state"].items()},
                         {i: s["momentum_buffer"] for i, s in full_opt.state_dict()["state"].items()}, "momentum")
    assert trainer.lr_scheduler_configs[0].scheduler.state_dict() == \
        full_trainer.lr_scheduler_configs[0].scheduler.state_dict()


def test_lightning_checkpoint_inside_a_step_holds_theta0(tmp_path, one_thread):
    """``trainer.save_checkpoint`` from inside a TSAM step -- what Lightning's SLURM requeue does from its
    signal handler -- writes the weights and batch-norm statistics the step began with (the recipe's
    ``on_save_checkpoint`` re-takes them inside ``TSAM.unperturbed()``), and the step goes on undisturbed."""
    lt = recipe("lightning_tsam", "lightning")
    path = str(tmp_path / "requeue.ckpt")

    class Requeue(lt.L.Callback):
        start, backwards = None, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 5:
                self.start = {k: v.detach().clone() for k, v in module.state_dict().items()}

        def on_before_backward(self, trainer, module, loss):
            if trainer.global_step == 5:
                self.backwards += 1
                if self.backwards == 3:  # evaluation 1 (the first sample point), its first micro-batch
                    trainer.save_checkpoint(path)

    probe = Requeue()
    module, _ = lt.fit(2, callbacks=[probe], bn_policy="per_sample")
    clean, _ = lt.fit(2, bn_policy="per_sample")
    _assert_same_tensors(torch.load(path, weights_only=False)["state_dict"], probe.start, "mid-step checkpoint")
    _assert_same_tensors(module.state_dict(), clean.state_dict(), "with vs without the checkpoint")


def test_lightning_equals_a_plain_loop(one_thread):
    """Lightning's wrapper, manual_backward and precision plugin change nothing: 2 epochs equal a hand-written
    TSAM loop with the same micro-batches and schedule, bit for bit."""
    lt = recipe("lightning_tsam", "lightning")
    from tiny_resnet import TinyResNet, images
    module, _ = lt.fit(2)

    torch.manual_seed(0)
    net = TinyResNet()
    opt = TSAM(net.parameters(), torch.optim.SGD, lr=0.1, seed=0, **lt.TSAM_OPTIONS)
    bn_update_once_per_step(net, opt)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=16)
    x, y = images(64)
    for _ in range(2):
        for i in range(0, 64, 16):
            xb, yb = x[i:i + 16], y[i:i + 16]

            def closure():
                total = 0.0
                for xm, ym in zip(xb.chunk(2), yb.chunk(2)):
                    loss = nn.functional.cross_entropy(net(xm), ym) * 0.5
                    loss.backward()
                    total = total + loss.detach()
                return total
            opt.step(closure)
            sched.step()
    _assert_same_tensors(module.net.state_dict(), net.state_dict(), "Lightning vs plain loop")


def test_lightning_bf16_with_the_authors_bn_policy(one_thread):
    lt = recipe("lightning_tsam", "lightning")
    module, trainer = lt.fit(1, precision="bf16-mixed", bn_policy="per_sample", micro_batches=2)
    opt = trainer.optimizers[0]
    steps = trainer.global_step
    assert steps == opt.step_count == 4
    # per_sample counts every training forward: evaluations x micro-batches per step
    assert int(module.net.stem[1].num_batches_tracked) == steps * opt.evaluations_per_step * 2
    assert torch.isfinite(trainer.callback_metrics["tilted_loss"])
    fp32, _ = lt.fit(1, bn_policy="per_sample")
    assert not torch.equal(module.net.head.weight, fp32.net.head.weight)  # autocast was on


def test_hf_trainer_resume_mid_epoch_is_bit_exact(tmp_path, one_thread):
    """bf16 autocast, gradient accumulation, dropout, the Trainer's warmup + linear schedule and AdamW; the
    checkpoint is taken mid-epoch (step 3 of 4), so the Trainer also restores the data position and RNG."""
    hf = recipe("hf_trainer_tsam", "transformers")
    save = dict(save_strategy="steps", save_steps=3)
    full = hf.make_trainer(str(tmp_path / "full"), **save)
    full.train()
    resumed = hf.make_trainer(str(tmp_path / "resumed"), **save)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    _assert_same_tensors(dict(resumed.model.named_parameters()), dict(full.model.named_parameters()),
                         "resumed vs uninterrupted")
    tsam = full.optimizer.optimizer
    assert isinstance(tsam, TSAM) and isinstance(tsam.base_optimizer, torch.optim.AdamW)
    assert tsam.step_count == full.state.global_step == resumed.optimizer.optimizer.step_count == 8
    # the Trainer's own schedule drove the base optimizer: warmup from 0, then linear decay
    lrs = [e["learning_rate"] for e in full.state.log_history if "learning_rate" in e]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(1e-2) and lrs[-1] < lrs[2]
    # the checkpoint (safetensors) holds every parameter (each in its own storage)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "full" / "checkpoint-8" / "model.safetensors"))
    params = {k: v for k, v in full.model.state_dict().items() if k in saved}
    assert len(params) == len(saved) >= len(list(full.model.parameters()))
    _assert_same_tensors(saved, params, "checkpoint-8 vs model")


def test_hf_trainer_accumulation_is_inside_each_evaluation(tmp_path, one_thread):
    """2 micro-batches of 4 per evaluation == one batch of 8 (fp32, no dropout, SGD; within fp32 roundoff:
    the token sums are added in another order), and each step runs every evaluation over every micro-batch."""
    hf = recipe("hf_trainer_tsam", "transformers")
    common = dict(bf16=False, optim="sgd", max_steps=4, max_grad_norm=0.0, weight_decay=0.0, dropout=0.0)
    accumulated = hf.make_trainer(str(tmp_path / "ga"), per_device_train_batch_size=4,
                                  gradient_accumulation_steps=2, **common)
    forwards = []
    accumulated.model.register_forward_hook(lambda *_: forwards.append(1))
    accumulated.train()
    whole = hf.make_trainer(str(tmp_path / "whole"), per_device_train_batch_size=8,
                            gradient_accumulation_steps=1, **common)
    whole.train()
    tsam = accumulated.optimizer.optimizer
    assert len(forwards) == 4 * tsam.evaluations_per_step * 2
    for (name, a), (_, b) in zip(accumulated.model.named_parameters(), whole.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)
    start = hf.tiny_gpt2(dropout=0.0)
    assert not torch.equal(start.lm_head.weight, whole.model.lm_head.weight)


def test_accelerate_equals_a_plain_loop(one_thread, fresh_accelerate_state):
    """accelerator.prepare / backward / no_sync change nothing on one process: bit-identical to plain torch."""
    ac = recipe("accelerate_tsam", "accelerate")
    from tiny_resnet import TinyResNet, images
    _, model, tsam, _ = ac.train(epochs=2, mixed_precision="no")

    torch.manual_seed(0)
    net = TinyResNet()
    opt = TSAM(net.parameters(), torch.optim.SGD, lr=0.1, seed=0, **ac.TSAM_OPTIONS)
    bn_update_per_sample(net, opt)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=16)
    x, y = images(64)
    for _ in range(2):
        for i in range(0, 64, 16):
            xb, yb = x[i:i + 16], y[i:i + 16]
            run = opt.begin_step()
            for _ in run:
                total = 0.0
                for xm, ym in zip(xb.chunk(2), yb.chunk(2)):
                    loss = nn.functional.cross_entropy(net(xm), ym) * 0.5
                    loss.backward()
                    total = total + loss.detach()
                run.record(total)
            run.finish()
            sched.step()
    _assert_same_tensors(model.state_dict(), net.state_dict(), "Accelerate vs plain loop")
    # the authors' policy counts every forward: 8 steps x 4 evaluations x 2 micro-batches
    assert int(model.stem[1].num_batches_tracked) == 8 * tsam.evaluations_per_step * 2


def test_accelerate_resume_continues_the_identical_trajectory(tmp_path, one_thread):
    ac = recipe("accelerate_tsam", "accelerate")
    from accelerate.state import AcceleratorState
    runs = []
    for kwargs in (dict(epochs=4), dict(epochs=2, save=str(tmp_path / "state")),
                   dict(epochs=4, resume=str(tmp_path / "state"))):
        AcceleratorState._reset_state(reset_partial_state=True)
        runs.append(ac.train(mixed_precision="bf16", **kwargs))
    AcceleratorState._reset_state(reset_partial_state=True)
    (_, full, full_tsam, losses), _, (_, resumed, tsam, resumed_losses) = runs
    _assert_same_tensors(resumed.state_dict(), full.state_dict(), "resumed vs uninterrupted")
    assert tsam.step_count == full_tsam.step_count == 16
    assert torch.equal(torch.stack(resumed_losses), torch.stack(losses[8:]))
    assert losses[-1] < losses[0]
