"""TSAM in the Hugging Face ``transformers.Trainer``: its LR schedule, gradient accumulation, bf16, checkpoints.

    python examples/hf_trainer_tsam.py                       # tiny 2-layer GPT-2 from a config, CPU, bf16
    python examples/hf_trainer_tsam.py --no-bf16 --accumulation 1

The model is built from a ``GPT2Config`` (2 layers, width 32, nothing downloaded) and learns synthetic
token sequences (each row counts up from a random start by a random stride, modulo the vocabulary).

What the user writes is ``TSAMTrainer(..., tsam_options=dict(num_samples=2, ...))`` in place of ``Trainer``.
The Trainer still builds the optimizer's param groups (no weight decay on biases and norms), chooses the
base optimizer from ``TrainingArguments.optim`` (AdamW by default) and the LR schedule, accumulates,
clips, checkpoints and resumes. Two overrides make its one-backward-per-micro-batch loop run TSAM:

* ``training_step`` is called once per micro-batch of an accumulation window. ``TSAMTrainer`` keeps the
  window's micro-batches and, at the last one, runs the whole TSAM step's evaluations: each evaluation
  is the Trainer's own ``training_step`` (forward, loss scaling, ``accelerator.backward``) over every
  micro-batch. Accumulating across calls, as the Trainer does for ERM, cannot work for TSAM: all of the
  window's gradient must be in before the parameters move to the next evaluation point.
* The Trainer then clips (``max_grad_norm``: here the clip applies to the tilted gradient) and calls
  ``optimizer.step()`` with no closure. ``TrainerTSAM`` (a 10-line TSAM subclass) answers that call by
  finishing the evaluated step: the base optimizer's update from theta0.

The window's inputs are held until its last micro-batch (inputs only, not activations). Several
processes (the Trainer under ``torchrun``/``accelerate launch``) should work the same way -- each
evaluation's forwards go through the DDP-wrapped model, all but the last micro-batch under ``no_sync``,
and TSAM averages each sample's loss over the ranks -- but only the single-process run is tested here.

Batch norm: none (GPT-2 has layer norm, which keeps no running statistics).
The logged ``loss`` is the mean of the step's s sample losses (their tilted mean is what TSAM returns).
Not supported: fp16 with the Trainer's GradScaler (``fp16=True``, GPU only): the scaler sees only the
final gradient, not an overflow in an ascent evaluation; use bf16, as here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from tsam_fast import TSAM


class TrainerTSAM(TSAM):
    """TSAM whose closure-less ``step()`` -- the Trainer's ``optimizer.step()`` -- finishes the step that
    :meth:`TSAMTrainer.training_step` evaluated."""

    evaluated = None  # the StepRun waiting for the Trainer's optimizer.step()

    def step(self, closure=None):
        if closure is not None:
            return super().step(closure)
        run, self.evaluated = self.evaluated, None
        if run is None:
            raise RuntimeError("TrainerTSAM.step() without a closure finishes the step that TSAMTrainer.training_step "
                               "evaluated, and none is waiting; use TSAMTrainer, or pass a closure")
        return run.finish()


class TSAMTrainer(Trainer):
    """``transformers.Trainer`` training with TSAM around the optimizer the TrainingArguments choose."""

    def __init__(self, *args, tsam_options=None, **kwargs):
        self.tsam_options = dict(tsam_options or {})
        self._window = []
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            base, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model if model is not None else self.model)
            self.optimizer_cls_and_kwargs = (TrainerTSAM, dict(base_optimizer=base, **kwargs, **self.tsam_options))
        return super().create_optimizer(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._window.append(inputs)
        if not self.accelerator.sync_gradients:  # not yet the window's last micro-batch
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        tsam = getattr(self.optimizer, "optimizer", self.optimizer)  # inside Accelerate's wrapper
        run = tsam.begin_step()
        sample_losses = []
        for ev in run:
            total = 0.0
            for i, micro_batch in enumerate(window):
                last = i == len(window) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    # the Trainer's own step: forward, GA loss scaling, accelerator.backward; a copy of the
                    # inputs, because compute_loss may pop "labels" from the dict it is given
                    total = total + super().training_step(model, dict(micro_batch), num_items_in_batch)
            run.record(total)
            if ev.role == "sample":
                sample_losses.append(total)
        tsam.evaluated = run  # finished by the Trainer's optimizer.step(), after its gradient clipping
        return torch.stack(sample_losses).mean()


class CountingData(torch.utils.data.Dataset):
    """Rows that count up from a random start by a random stride (1-3), modulo the vocabulary."""

    def __init__(self, n: int = 32, length: int = 16, vocab: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int = 0, dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def make_trainer(output_dir: str, tsam_options=None, dropout: float = 0.1, n: int = 32, **overrides) -> TSAMTrainer:
    """The recipe's Trainer; ``overrides`` replace TrainingArguments fields, ``tsam_options`` TSAM's."""
    fields = dict(output_dir=output_dir, use_cpu=True, bf16=True, seed=0, max_steps=8,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, max_grad_norm=1.0,
                  save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
                  dataloader_num_workers=0, dataloader_pin_memory=False)
    fields.update(overrides)
    options = dict(num_samples=2, tilt=1.0, radius=0.05, rho=0.02, seed=0)
    options.update(tsam_options or {})
    return TSAMTrainer(model=tiny_gpt2(dropout=dropout), args=TrainingArguments(**fields),
                       train_dataset=CountingData(n=n), tsam_options=options)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="hf_tsam_output")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--resume", help="a checkpoint directory of an earlier run (e.g. OUTPUT/checkpoint-4)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    trainer = make_trainer(args.output_dir, max_steps=args.max_steps, gradient_accumulation_steps=args.accumulation,
                           bf16=not args.no_bf16, save_strategy="steps" if args.save_steps else "no",
                           save_steps=args.save_steps or 500)
    trainer.train(resume_from_checkpoint=args.resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = dict(global_step=trainer.state.global_step, tsam_steps=trainer.optimizer.optimizer.step_count,
                  first_loss=losses[0], last_loss=losses[-1])
    print(json.dumps(result))
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
