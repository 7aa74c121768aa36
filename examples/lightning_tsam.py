"""TSAM in PyTorch Lightning: manual optimization, an LR scheduler, gradient accumulation, checkpoints, DDP.

    python examples/lightning_tsam.py                                 # 1 CPU process, ~10 s after imports
    python examples/lightning_tsam.py --devices 2 --strategy ddp      # 2 CPU processes (gloo)
    python examples/lightning_tsam.py --epochs 2 --save ckpt.ckpt     # then: --epochs 4 --resume ckpt.ckpt
    python examples/lightning_tsam.py --precision 16-mixed            # fp16 with Lightning's GradScaler

The module subclasses ``tsam_fast.integrations.lightning.TSAMLightningModule`` (manual optimization, the
TSAM step from ``training_step``, checkpoints inside a step at theta0); its docstring says why each piece
is as it is. Here: the scheduler is returned by ``configure_optimizers`` (so Lightning saves and restores
it) and stepped by hand after each TSAM step; batch norm follows ``--bn-policy`` (default
``once_per_step``: running statistics updated by the first evaluation of each step; ``per_sample`` is the
TSAM authors' loop, see ``tsam_fast.batchnorm``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning as L
from lightning.pytorch.plugins import MixedPrecision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_resnet import TinyResNet, images  # noqa: E402

from tsam_fast import bn_running_stats  # noqa: E402
from tsam_fast.integrations.lightning import TrainerTSAM, TSAMLightningModule  # noqa: E402

# TSAM and its base optimizer (SGD): s = 2 samples, 2 evaluations each (ascent)
TSAM_OPTIONS = dict(momentum=0.9, weight_decay=5e-4, num_samples=2, tilt=1.0, radius=0.5, rho=0.05)


class TSAMClassifier(TSAMLightningModule):
    def __init__(self, lr: float = 0.1, micro_batches: int = 2, total_steps: int = 16,
                 bn_policy: str = "once_per_step", seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = TinyResNet()
        self._bn = None

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        hp = self.hparams
        opt = TrainerTSAM(self.parameters(), torch.optim.SGD, lr=hp.lr, seed=hp.seed, **TSAM_OPTIONS)
        if self._bn is not None:  # configure_optimizers runs again on a second fit
            self._bn.remove()
        self._bn = bn_running_stats(self.net, opt, hp.bn_policy)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=hp.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        tilted_loss = self.tsam_step(batch, lambda b: F.cross_entropy(self(b[0]), b[1]),
                                     micro_batches=self.hparams.micro_batches)
        self.lr_schedulers().step()
        self.log("tilted_loss", tilted_loss, prog_bar=True)
        return tilted_loss


def loader(batch_size: int = 16, n: int = 64) -> DataLoader:
    x, y = images(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Report(L.Callback):
    """At the end of training, in every rank's process (also under ddp_spawn / ddp_fork, where the training
    runs in child processes): print rank 0's summary; with ``out``, save each rank's result file."""

    def __init__(self, out=None):
        self.out = out

    def on_train_end(self, trainer, module):
        opt = trainer.optimizers[0]
        result = dict(global_step=trainer.global_step, tsam_steps=opt.step_count,
                      tilted_loss=float(trainer.callback_metrics["tilted_loss"]))
        if self.out:
            os.makedirs(self.out, exist_ok=True)
            torch.save(dict(result, state=module.state_dict()), os.path.join(self.out, f"rank{trainer.global_rank}.pt"))
        if trainer.is_global_zero:
            print(json.dumps(result))


def make_trainer(epochs: int, devices: int = 1, strategy: str = "auto", precision="32-true", callbacks=()):
    plugins = []
    if precision == "16-mixed":  # on the CPU Lightning would turn "16-mixed" into bf16; the plugin keeps fp16
        plugins, precision = [MixedPrecision("16-mixed", "cpu")], None
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, plugins=plugins,
                     precision=precision, logger=False, enable_checkpointing=False, callbacks=list(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def fit(epochs: int, resume=None, save=None, devices: int = 1, strategy: str = "auto", precision="32-true",
        callbacks=(), schedule_epochs: int = 4, **module_kwargs):
    """Train (or resume) to ``epochs`` of an LR schedule planned for ``schedule_epochs`` (give a resumed run
    the same); returns (module, trainer)."""
    steps_per_epoch = 4  # 64 images / batch 16 in one process (each DDP rank gets half of them)
    module_kwargs.setdefault("total_steps", max(schedule_epochs, epochs) * steps_per_epoch)
    module = TSAMClassifier(**module_kwargs)
    trainer = make_trainer(epochs, devices, strategy, precision, callbacks)
    trainer.fit(module, loader(), ckpt_path=resume)
    if save:
        trainer.save_checkpoint(save)
    return module, trainer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--schedule-epochs", type=int, default=4, help="length of the LR schedule (keep it on resume)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--precision", default="32-true", help="e.g. bf16-mixed, 16-mixed")
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--bn-policy", default="once_per_step", choices=["once_per_step", "per_sample", "every_forward"])
    p.add_argument("--save", help="checkpoint written at the end")
    p.add_argument("--resume", help="checkpoint to resume from")
    p.add_argument("--out", help="directory for a per-rank result file (rank<k>.pt) used by the tests")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    fit(args.epochs, args.resume, args.save, args.devices, args.strategy, args.precision, [Report(args.out)],
        args.schedule_epochs, micro_batches=args.micro_batches, bn_policy=args.bn_policy)


if __name__ == "__main__":
    main()
