"""TSAM in the Hugging Face ``transformers.Trainer``: :class:`TSAMTrainer` in place of ``Trainer``::

    from tsam_fast.integrations.transformers import TSAMTrainer

    trainer = TSAMTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                          tsam_options=dict(num_samples=2, tilt=1.0, radius=0.05, rho=0.02))
    trainer.train()

The Trainer still builds the optimizer's param groups (no weight decay on biases and norms), chooses the
base optimizer from ``TrainingArguments.optim`` (AdamW by default) and the LR schedule, accumulates,
clips, logs, checkpoints and resumes; TSAM (a :class:`TrainerTSAM`) wraps the base optimizer it chose.
Two overrides make its one-backward-per-micro-batch loop run TSAM:

* ``training_step`` is called once per micro-batch of an accumulation window
  (``gradient_accumulation_steps``). ``TSAMTrainer`` keeps the window's micro-batches and, at the last one,
  runs all of the step's evaluations: each is the Trainer's own ``training_step`` (forward, loss scaling,
  ``accelerator.backward``) over every micro-batch, all but the last under ``accelerator.no_sync``.
  Accumulating across calls, as the Trainer does for ERM, cannot work for TSAM: all of the window's
  gradient must be in before the parameters move to the next evaluation point. It holds the window's
  inputs (not activations) until then.
* The Trainer then clips (``max_grad_norm``: the tilted gradient; its logged ``grad_norm`` is that
  gradient's) and calls ``optimizer.step()`` without a closure, which finishes the evaluated step: the
  base optimizer's update from theta0.

The logged ``loss`` is the mean of the step's s sample losses (their tilted mean is what the optimizer
returns). Checkpoints are taken between optimizer steps, where nothing is perturbed; a run resumed from a
mid-epoch checkpoint continues the identical trajectory (the Trainer restores the data position and RNG).

Limits: ``fp16=True`` (the Trainer's GradScaler) is refused: the Trainer unscales the gradients itself
before clipping, while TSAM must measure its ascent steps and overflows with the same scaler and unscale
once; use ``bf16=True``. ``backward_samples`` is refused: the Trainer's ``training_step`` always
backpropagates, and its forward-only scoring evaluations need none. Several processes (``torchrun``,
``accelerate launch``) use the same path -- DDP's ``no_sync`` on all but the last micro-batch, each
sample's loss averaged over the ranks by TSAM -- but only one process is tested here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._common import TrainerTSAM, evaluate_step, require, tsam_of

transformers = require("transformers", "transformers")

__all__ = ["TSAMTrainer", "TrainerTSAM"]


class TSAMTrainer(transformers.Trainer):
    """``transformers.Trainer`` training with TSAM around the optimizer its ``TrainingArguments`` choose.

    ``tsam_options``: TSAM's own arguments (``num_samples``, ``tilt``, ``radius``, ``rho``, ``seed``, ...;
    see :class:`tsam_fast.TSAM`); the base optimizer and its arguments (``lr``, ``weight_decay``, betas) come
    from the Trainer. An optimizer passed with ``optimizers=(opt, scheduler)`` must be a
    :class:`TrainerTSAM`."""

    def __init__(self, *args: Any, tsam_options: Optional[dict] = None, **kwargs: Any) -> None:
        self.tsam_options = dict(tsam_options or {})
        for key in ("base_optimizer", "params"):
            if key in self.tsam_options:
                raise ValueError(f"tsam_options may not set {key!r}: the Trainer chooses the base optimizer "
                                 "(TrainingArguments.optim) and its param groups")
        if self.tsam_options.get("backward_samples") is not None:
            raise ValueError("TSAMTrainer does not support backward_samples: the Trainer's training_step always "
                             "backpropagates, and the forward-only scoring evaluations need none")
        self._window: list = []
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError("TSAMTrainer does not support fp16=True: the Trainer unscales the gradients itself "
                             "(GradScaler) before clipping, while TSAM must unscale once, with the overflows of "
                             "its ascent evaluations in view; use bf16=True")

    def create_optimizer(self, model=None):
        """The Trainer's optimizer choice, wrapped: TrainerTSAM around the base optimizer class and
        arguments ``TrainingArguments`` give (``optimizer_cls_and_kwargs``, if the user set none)."""
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            base, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model if model is not None else self.model)
            self.optimizer_cls_and_kwargs = (TrainerTSAM, dict(base_optimizer=base, **kwargs, **self.tsam_options))
        return super().create_optimizer(model)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Keeps the window's micro-batches; at its last, runs the TSAM step's evaluations over all of them
        and leaves the step to the Trainer's ``optimizer.step()``. Returns the mean sample loss (0 before
        the window's last micro-batch: the Trainer adds the returns up for its log)."""
        self._window.append(inputs)
        if not self.accelerator.sync_gradients:  # not yet the window's last micro-batch
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        tsam = tsam_of(self.optimizer, "transformers")
        if not isinstance(tsam, TrainerTSAM):
            raise TypeError(f"TSAMTrainer's optimizer is a {type(tsam).__name__}: pass a "
                            "tsam_fast.integrations.transformers.TrainerTSAM (or none: tsam_options)")
        own_step = super().training_step

        def micro_batch(inputs, backward):
            # the Trainer's own step: forward, GA loss scaling, accelerator.backward; a copy of the inputs,
            # because compute_loss may pop "labels" from the dict it is given
            return own_step(model, dict(inputs), num_items_in_batch)

        run = evaluate_step(tsam, window, micro_batch, lambda: self.accelerator.no_sync(model))
        sample_losses = torch.stack(run.losses).mean()  # the losses the tilt weighs (averaged over the ranks)
        tsam.finish_on_step(run)  # finished by the Trainer's optimizer.step(), after its clipping
        return sample_losses.to(self.args.device)
