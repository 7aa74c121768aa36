"""TSAM with Hugging Face Accelerate: a plain loop, ``accelerator.backward``, bf16, micro-batches, save/load state.

    python examples/accelerate_tsam.py                        # CPU, bf16 autocast, 4 epochs
    python examples/accelerate_tsam.py --mixed-precision no --epochs 2 --save state/   # then --resume state/
    torchrun --nproc_per_node 2 examples/accelerate_tsam.py                           # 2 CPU processes (gloo)

The model is the small ResNet-style CNN of ``tiny_resnet.py``. Batch norm: the TSAM authors' policy
(``bn_update_per_sample``: running statistics updated by the first evaluation of each sample; every forward
counted in ``num_batches_tracked``).

Each batch is one ``tsam_step`` (``tsam_fast.integrations.accelerate``: the closure-free loop with
``accelerator.backward`` and ``no_sync`` micro-batches; its docstring says why Accelerate's own
accumulation and the prepared optimizer's ``step()`` are not used). ``accelerator.save_state``/``load_state``
checkpoint the model, TSAM's state_dict and the scheduler; a resumed run continues the identical
trajectory. ``--preempt-dir``: a preemption signal (SIGTERM/SIGUSR1) saves the same state from wherever it
lands, inside a step too (``save_on_preemption``), and ``--resume`` from it continues the identical
trajectory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from accelerate import Accelerator
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_resnet import TinyResNet, images  # noqa: E402

from tsam_fast import TSAM, bn_update_per_sample  # noqa: E402
from tsam_fast.integrations.accelerate import save_on_preemption, tsam_step  # noqa: E402

# TSAM and its base optimizer (SGD): s = 2 samples, 2 evaluations each (ascent)
TSAM_OPTIONS = dict(momentum=0.9, weight_decay=5e-4, num_samples=2, tilt=1.0, radius=0.5, rho=0.05)
STEPS_PER_EPOCH = 4  # 64 images, batch 16, in one process


def train(epochs: int = 4, micro_batches: int = 2, mixed_precision: str = "bf16", save=None, resume=None,
          total_epochs: int = 4, lr: float = 0.1, seed: int = 0, preempt_dir=None, on_evaluation=None):
    """Train up to ``epochs`` (of a schedule planned for ``total_epochs``); returns (accelerator, model, tsam,
    losses). ``preempt_dir``: where a preemption signal saves the state; the run then stops.
    ``on_evaluation(step, index)``: called at the start of each evaluation (the tests send a signal from it)."""
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    torch.manual_seed(seed)
    model = TinyResNet()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=lr, seed=seed, **TSAM_OPTIONS)
    bn_update_per_sample(model, opt)  # the TSAM authors' batch-norm policy
    # Accelerate steps a prepared scheduler once per process at each call: plan it in one process's steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_epochs * STEPS_PER_EPOCH)
    x, y = images(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    tsam = opt.optimizer  # the TSAM instance inside Accelerate's wrapper
    first_epoch = skip = 0
    if resume:
        accelerator.load_state(resume)
        # a checkpoint from an epoch's end, or from a preemption: skip the batches its steps already took
        first_epoch, skip = divmod(tsam.step_count, len(loader))
    hook = None if on_evaluation is None else (lambda ev: on_evaluation(tsam.step_count, ev.index))

    def loss_fn(batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def batches():  # from where a resumed run left off
        for epoch in range(first_epoch, epochs):
            yield from (batch for b, batch in enumerate(loader) if epoch > first_epoch or b >= skip)

    losses = []
    preemption = save_on_preemption(accelerator, opt, preempt_dir) if preempt_dir else None
    with preemption or contextlib.nullcontext():
        for batch in batches():
            if preemption is not None and preemption.requested():
                break
            losses.append(tsam_step(accelerator, model, opt, batch, loss_fn, micro_batches, on_evaluation=hook))
            sched.step()
    if save:
        accelerator.save_state(save)
    return accelerator, model, tsam, losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16"])
    p.add_argument("--save", help="directory for accelerator.save_state at the end")
    p.add_argument("--resume", help="a directory written by --save or --preempt-dir")
    p.add_argument("--preempt-dir", help="on SIGTERM/SIGUSR1, save the state here and stop (resume with --resume)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    accelerator, model, tsam, losses = train(args.epochs, args.micro_batches, args.mixed_precision, args.save,
                                             args.resume, preempt_dir=args.preempt_dir)
    if accelerator.is_main_process:
        print(json.dumps(dict(tsam_steps=tsam.step_count, first_loss=float(losses[0]) if losses else None,
                              last_loss=float(losses[-1]) if losses else None)))
    return losses


if __name__ == "__main__":
    main(sys.argv[1:])
