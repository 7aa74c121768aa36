"""TSAM in the Hugging Face ``transformers.Trainer``: its LR schedule, gradient accumulation, bf16, checkpoints.

    python examples/hf_trainer_tsam.py                       # tiny 2-layer GPT-2 from a config, CPU, bf16
    python examples/hf_trainer_tsam.py --no-bf16 --accumulation 1

The model is built from a ``GPT2Config`` (2 layers, width 32, nothing downloaded) and learns synthetic
token sequences (each row counts up from a random start by a random stride, modulo the vocabulary).

What the user writes is ``TSAMTrainer(..., tsam_options=dict(num_samples=2, ...))`` in place of ``Trainer``
(``tsam_fast.integrations.transformers``, whose docstring says how it runs TSAM inside the Trainer's
one-backward-per-micro-batch loop and what it does not support). The Trainer still builds the param
groups, chooses the base optimizer (AdamW by default) and the LR schedule, accumulates, clips,
checkpoints and resumes. Batch norm: none (GPT-2 has layer norm, which keeps no running statistics).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from tsam_fast.integrations.transformers import TSAMTrainer


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
