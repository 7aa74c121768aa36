"""TSAM under the trainers people use: import the module of yours; neither ``import tsam_fast`` nor this
package imports any trainer. Each module imports its framework when it is imported; where that is not
installed the ImportError says so: ``pip install "tsam_fast[integrations]"`` (the versions tested are
pinned in pyproject.toml).

``tsam_fast.integrations.lightning`` (PyTorch Lightning, the ``lightning`` package)
    ``TSAMLightningModule``: a ``LightningModule`` with manual optimization whose ``training_step`` calls
    ``self.tsam_step(batch, loss_fn, micro_batches=k)``; checkpoints taken inside a step (SLURM requeue)
    hold theta0. ``configure_optimizers`` returns a :class:`TrainerTSAM`.

``tsam_fast.integrations.transformers`` (Hugging Face ``transformers``)
    ``TSAMTrainer``: ``transformers.Trainer`` with TSAM around the optimizer its ``TrainingArguments``
    choose (``tsam_options=dict(num_samples=..., ...)``).

``tsam_fast.integrations.accelerate`` (Hugging Face Accelerate)
    ``tsam_step(accelerator, model, optimizer, batch, loss_fn, micro_batches=k)`` for a plain loop, and
    ``save_on_preemption(accelerator, optimizer, directory)`` for SIGTERM/SIGUSR1.

In each, every TSAM evaluation runs the forward and backward of every micro-batch of the batch (gradient
accumulation inside the evaluation: all of the batch's gradient must be in before the parameters move to
the next evaluation point), all but the last under the framework's ``no_sync``. The README's "Trainers"
section and each module's docstring say what the framework assumes about one backward per step, and what
remains unsupported.

:class:`TrainerTSAM` (framework-free, here) is the TSAM that Lightning and the ``transformers.Trainer``
finish with their own ``optimizer.step()``.
"""

from ._common import TrainerTSAM

__all__ = ["TrainerTSAM"]
