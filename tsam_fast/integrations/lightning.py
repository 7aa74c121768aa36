"""TSAM in PyTorch Lightning (the ``lightning`` package): subclass :class:`TSAMLightningModule` instead of
``LightningModule``, return a :class:`TrainerTSAM` from ``configure_optimizers`` and call
:meth:`~TSAMLightningModule.tsam_step` from ``training_step``::

    from tsam_fast.integrations.lightning import TSAMLightningModule, TrainerTSAM

    class Classifier(TSAMLightningModule):
        def configure_optimizers(self):
            opt = TrainerTSAM(self.parameters(), torch.optim.SGD, lr=0.1, num_samples=2, ...)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=...)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def training_step(self, batch, batch_idx):
            loss = self.tsam_step(batch, lambda b: F.cross_entropy(self(b[0]), b[1]), micro_batches=2)
            self.lr_schedulers().step()       # manual optimization: schedulers are stepped by hand
            return loss

What it does, and why:

* Manual optimization (``automatic_optimization = False``, set by ``__init__``): Lightning's automatic loop
  runs one backward per optimizer step; a TSAM step runs one per evaluation (2s for ``ascent``).
* ``tsam_step`` runs the step's evaluations in the closure-free loop: each evaluation runs the forward and
  ``self.manual_backward`` of every micro-batch (``loss_fn(micro_batch)`` times its share of the rows), all
  but the last under the strategy's ``block_backward_sync()`` (DDP's ``no_sync``), then finishes the step
  through Lightning's optimizer wrapper, ``self.optimizers().step()``: Lightning counts it
  (``trainer.global_step``, ``max_steps``, step-based checkpointing) and its precision plugin runs. So the
  ``on_before_optimizer_step`` hooks run once per step, and see the tilted gradient. (A closure-free loop
  of your own on ``self.optimizers().optimizer`` that calls ``run.finish()`` itself bypasses the wrapper:
  Lightning then counts no step and ``global_step`` stays 0. Finish through the wrapper instead, as
  ``tsam_step`` does: ``tsam.finish_on_step(run); self.optimizers().step()``.)
* ``precision="16-mixed"`` works: TSAM takes the plugin's ``GradScaler`` (``manual_backward`` scales every
  loss with it), measures its ascent and clipping norms unscaled, and steps the base optimizer through it,
  which skips the update on an overflow, an ascent evaluation's included; the plugin leaves the unscaling
  to TSAM (``TrainerTSAM``'s ``_step_supports_amp_scaling``) and updates the scale once per step. The
  ``on_before_optimizer_step`` hooks then see the gradient still scaled. (On the CPU Lightning turns
  ``precision="16-mixed"`` into ``bf16-mixed``; ``plugins=[MixedPrecision("16-mixed", "cpu")]`` keeps
  fp16.) ``bf16-mixed`` needs no scaler.
* Gradient accumulation is ``micro_batches``, inside each evaluation: every evaluation needs the whole
  batch's gradient before the parameters move to the next point, so ``Trainer(accumulate_grad_batches=k)``,
  which accumulates over training steps, cannot work (Lightning refuses it under manual optimization
  anyway). Nor can ``gradient_clip_val`` (refused too): TSAM's ``max_grad_norm`` clips each sample's
  gradient.
* Checkpoints: Lightning saves TSAM's ``state_dict`` (base-optimizer state, step counter, seed), the
  schedulers and the model; a run resumed from an epoch-end checkpoint continues the identical trajectory.
  A checkpoint taken inside a step (the SLURM requeue's signal handler saves wherever the process is)
  holds the weights, and batch-norm statistics, as the step began: :meth:`on_save_checkpoint` re-takes the
  state dict inside ``TSAM.unperturbed()`` (call ``super().on_save_checkpoint(checkpoint)`` when
  overriding it).

Limits: from a mid-epoch checkpoint Lightning replays the epoch's data from its start unless the
dataloader is resumable (it warns); TSAM's own state still resumes exactly. Tested single-process and
with 2-process DDP on the CPU, ``16-mixed`` on the CPU only (fp16 autocast through the plugin given
explicitly, overflowing steps included), not on a GPU here; strategies that run the optimizer step
themselves (DeepSpeed) are not supported.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from ..optimizer import TSAM
from ._common import TrainerTSAM, evaluate_step, require, split_batch, tsam_of, use_scaler, weighted_loss

L = require("lightning", "lightning")
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402
from lightning.pytorch.strategies import ParallelStrategy  # noqa: E402

__all__ = ["TSAMLightningModule", "TrainerTSAM"]


def _no_closure_loss() -> None:
    """The closure Lightning's wrapper gets: the evaluations already ran; its precision plugin calls it once
    (then its hooks)."""
    return None


class TSAMLightningModule(L.LightningModule):
    """A ``LightningModule`` trained with TSAM under manual optimization (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def tsam_step(self, batch: Any, loss_fn: Callable[[Any], torch.Tensor], micro_batches: int = 1,
                  optimizer: Optional[Any] = None) -> torch.Tensor:
        """One TSAM step on ``batch``, from ``training_step``; returns the tilted loss (0-dim tensor).

        ``loss_fn(micro_batch)`` returns the mean loss of a micro-batch (the model is ``self``): ``batch``
        -- a tensor, or lists, tuples and dicts of tensors -- is cut along its first dimension into
        ``micro_batches`` parts, each loss weighted by its share of the rows. ``optimizer``: which of
        ``configure_optimizers``' optimizers (a ``TrainerTSAM`` or its Lightning wrapper), when there are
        several."""
        wrapper = self._wrapper_of(optimizer)
        tsam = tsam_of(wrapper, "lightning")
        use_scaler(tsam, getattr(self.trainer.precision_plugin, "scaler", None))
        strategy = self.trainer.strategy
        no_sync = strategy.block_backward_sync if isinstance(strategy, ParallelStrategy) else contextlib.nullcontext
        run = evaluate_step(tsam, split_batch(batch, micro_batches), weighted_loss(loss_fn, self.manual_backward),
                            no_sync)
        tsam.finish_on_step(run)
        return wrapper.step(closure=_no_closure_loss)

    def _wrapper_of(self, optimizer) -> LightningOptimizer:
        """Lightning's wrapper of the TrainerTSAM to step: through it Lightning counts the step."""
        wrappers = self.optimizers()
        wrappers = wrappers if isinstance(wrappers, list) else [wrappers]
        if optimizer is None:
            found = [w for w in wrappers if isinstance(w.optimizer, TSAM)]
        else:
            found = [w for w in wrappers if optimizer is w or optimizer is w.optimizer]
        if len(found) != 1:
            what = "the optimizer given" if optimizer is not None else "a TSAM optimizer"
            raise ValueError(f"tsam_step needs {what} among configure_optimizers' optimizers (found {len(found)} "
                             f"of {len(wrappers)}); with several TSAM optimizers pass optimizer=")
        wrapper = found[0]
        if not isinstance(wrapper.optimizer, TrainerTSAM):
            raise TypeError(f"configure_optimizers returned a {type(wrapper.optimizer).__name__}: return a "
                            "tsam_fast.integrations.lightning.TrainerTSAM (TSAM's arguments), the TSAM that "
                            "Lightning's optimizer.step() finishes, so that Lightning counts the step")
        return wrapper

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint taken inside a TSAM step (Lightning's SLURM requeue saves from its SIGUSR1 handler,
        in the middle of whatever the process was doing) gets the model's state as the step began -- theta0,
        not the perturbed point, and the batch-norm statistics from before the step's forwards -- so a run
        resumed from it redoes the step exactly. Outside a step Lightning's own state dict stands."""
        super().on_save_checkpoint(checkpoint)
        stepping = [opt for opt in self.trainer.optimizers if isinstance(opt, TSAM) and opt.step_in_progress is not None]
        if not stepping:
            return
        with contextlib.ExitStack() as stack:
            for opt in stepping:
                stack.enter_context(opt.unperturbed())
            state = self.trainer.strategy.lightning_module_state_dict()
            # copies: the state dict's tensors share the parameters' storage, perturbed again after the block
            checkpoint["state_dict"] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                        for k, v in state.items()}
