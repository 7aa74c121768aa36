"""The public API of ``tsam_fast.integrations``, tested directly with the real frameworks (the recipes of
examples/ built on it are tested in test_examples.py and test_integrations.py): imports stay lazy, a
missing framework names the extra, the micro-batch cut, ``TrainerTSAM``'s finish on ``step()``, and each
module's step against a plain TSAM loop, bit for bit -- Lightning's ``16-mixed`` and Accelerate's GradScaler
with overflowing steps included."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tsam_fast import TSAM
from tsam_fast.integrations import TrainerTSAM
from tsam_fast.integrations._common import split_batch

from tables import free_port, one_thread  # noqa: F401  (one_thread: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")
MODULES = {"lightning": "lightning", "transformers": "transformers", "accelerate": "accelerate"}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


# -- imports --------------------------------------------------------------------------------------------


def test_import_tsam_fast_imports_no_trainer_nor_integration():
    """``import tsam_fast`` imports neither a trainer nor tsam_fast.integrations; ``import
    tsam_fast.integrations`` imports no trainer either (each module of it imports its own)."""
    code = ("import sys\n"
            f"frameworks = {FRAMEWORKS!r}\n"
            "def loaded(prefixes): return sorted(m for m in sys.modules if m.split('.')[0] in prefixes\n"
            "                                    or any(m.startswith(p + '.') or m == p for p in prefixes))\n"
            "import tsam_fast\n"
            "bad = loaded(frameworks + ('tsam_fast.integrations',))\n"
            "assert not bad, f'import tsam_fast imported {bad}'\n"
            "import tsam_fast.integrations\n"
            "bad = loaded(frameworks)\n"
            "assert not bad, f'import tsam_fast.integrations imported {bad}'\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_missing_framework_names_the_extra():
    """Each module, its framework not importable (``sys.modules[name] = None`` makes the import fail as a
    missing package does): an ImportError that names the module, the package and the pip extra."""
    code = ("import importlib, sys\n"
            f"for module, package in {MODULES!r}.items():\n"
            "    sys.modules[package] = None\n"
            "    try:\n"
            "        importlib.import_module('tsam_fast.integrations.' + module)\n"
            "    except ImportError as exc:\n"
            "        message = str(exc)\n"
            "        assert 'pip install \"tsam_fast[integrations]\"' in message, message\n"
            "        assert repr(package) in message and 'tsam_fast.integrations.' + module in message, message\n"
            "    else:\n"
            "        raise AssertionError(module + ' imported without ' + package)\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- micro-batches and TrainerTSAM (no framework) ---------------------------------------------------------


def test_split_batch_cuts_rows_as_chunk_does_with_their_shares():
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    parts = split_batch({"x": x, "y": y, "tag": "train"}, 2)
    assert [w for _, w in parts] == [0.6, 0.4]  # torch.chunk's cut: 3 + 2 rows
    assert torch.equal(parts[0][0]["x"], x[:3]) and torch.equal(parts[1][0]["y"], y[3:])
    assert parts[1][0]["tag"] == "train"  # not a tensor: every part gets it
    Pair = namedtuple("Pair", "x y")
    parts = split_batch(Pair(x, y), 3)
    assert [w for _, w in parts] == [0.4, 0.4, 0.2] and all(type(p) is Pair for p, _ in parts)
    assert [len(p.x) for p, _ in parts] == [len(c) for c in x.chunk(3)]
    batch = [x, y]
    assert split_batch(batch, 1) == [(batch, 1.0)] and split_batch(batch, 1)[0][0] is batch
    assert len(split_batch(x, 8)) == 5  # fewer rows than micro-batches: one row each
    with pytest.raises(ValueError, match="first dimension"):
        split_batch((x, torch.arange(4)), 2)
    with pytest.raises(ValueError, match="first dimension"):
        split_batch({"ids": [1, 2, 3]}, 2)
    with pytest.raises(ValueError, match="positive integer"):
        split_batch(x, 0)


def _linear_pair():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    return a, copy.deepcopy(a)


OPTIONS = dict(lr=0.1, momentum=0.9, num_samples=2, radius=0.1, rho=0.05, seed=3)


def test_trainer_tsam_finishes_the_evaluated_step_on_step():
    """The integration evaluates, the trainer's ``step()`` finishes: the same trajectory as TSAM.step, the
    closure given to that call (Lightning's hooks) run once; without a waiting step ``step(closure)`` is
    TSAM's own and a bare ``step()`` an error; a waiting step is not copied."""
    a, b = _linear_pair()
    x = torch.randn(8, 3)
    plain = TSAM(a.parameters(), torch.optim.SGD, **OPTIONS)
    tsam = TrainerTSAM(b.parameters(), torch.optim.SGD, **OPTIONS)
    for _ in range(3):
        expected = plain.step(lambda: (loss := a(x).square().mean()).backward() or loss)
        run = tsam.begin_step()
        for _ev in run:
            loss = b(x).square().mean()
            loss.backward()
            run.record(loss)
        tsam.finish_on_step(run)
        assert copy.deepcopy(tsam)._waiting is None and pickle.loads(pickle.dumps(tsam))._waiting is None
        calls = []
        assert torch.equal(tsam.step(lambda: calls.append(torch.is_grad_enabled())), expected)
        assert calls == [True]
    expected = plain.step(lambda: (loss := a(x).square().mean()).backward() or loss)
    assert torch.equal(tsam.step(lambda: (loss := b(x).square().mean()).backward() or loss), expected)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert tsam.step_count == plain.step_count == 4
    with pytest.raises(RuntimeError, match="none is waiting"):
        tsam.step()
    run = tsam.begin_step()
    with pytest.raises(RuntimeError, match="fully recorded"):
        tsam.finish_on_step(run)  # no evaluation recorded yet: abandoned
    assert run.state == "abandoned"
    assert not tsam._step_supports_amp_scaling
    assert TrainerTSAM(b.parameters(), torch.optim.SGD, lr=0.1,
                       grad_scaler=torch.amp.GradScaler("cpu"))._step_supports_amp_scaling


# -- Lightning ----------------------------------------------------------------------------------------------

class _Rows(torch.utils.data.Dataset):
    """Rows as dicts (collated into a dict batch): 4 features, 3 classes."""

    def __init__(self, n: int = 20):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def _plain_loop(net, tsam, batches, micro_batches, scaler=None, autocast=None):
    """The reference: TSAM's closure-free loop by hand, micro-batches as split_batch cuts them."""
    for batch in batches:
        run = tsam.begin_step()
        for _ev in run:
            total = None
            for part, weight in split_batch(batch, micro_batches):
                with autocast() if autocast else contextlib.nullcontext():
                    loss = F.cross_entropy(net(part["x"]), part["y"]) * weight
                (scaler.scale(loss) if scaler else loss).backward()
                total = loss.detach() if total is None else total + loss.detach()
            run.record(total)
        run.finish()
        if scaler is not None:
            scaler.update()


def _lightning_fit(epochs, plugins=(), plain_tsam=False):
    L = pytest.importorskip("lightning", reason="lightning is not installed (pip install -e '.[integrations]')")
    from tsam_fast.integrations.lightning import TSAMLightningModule

    class Classifier(TSAMLightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.hooks = 0

        def configure_optimizers(self):
            return (TSAM if plain_tsam else TrainerTSAM)(self.parameters(), torch.optim.SGD, **OPTIONS)

        def training_step(self, batch, batch_idx):
            return self.tsam_step(batch, lambda b: F.cross_entropy(self.net(b["x"]), b["y"]), micro_batches=2)

        def on_before_optimizer_step(self, optimizer):
            self.hooks += 1

    module = Classifier()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, plugins=list(plugins), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_Rows(), batch_size=5))
    return module, trainer


def _batches(epochs):
    return [batch for _ in range(epochs) for batch in torch.utils.data.DataLoader(_Rows(), batch_size=5)]


def test_lightning_tsam_step_is_counted_and_hooked_once_per_step():
    """The closure-free loop, finished through Lightning's optimizer wrapper: ``global_step`` counts TSAM's
    steps, ``on_before_optimizer_step`` runs once per step, and the trajectory is a plain loop's."""
    module, trainer = _lightning_fit(2)
    tsam = trainer.optimizers[0]
    assert trainer.global_step == tsam.step_count == module.hooks == 8
    net = _net()
    _plain_loop(net, TSAM(net.parameters(), torch.optim.SGD, **OPTIONS), _batches(2), 2)
    for p, q in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(p, q)


def test_lightning_16_mixed_steps_through_the_plugins_scaler():
    """``16-mixed`` (fp16 autocast, Lightning's GradScaler): TSAM takes the plugin's scaler, and a start
    scale of 2**20 makes the first steps overflow (skipped, the scale halved each time). Bit for bit a
    plain TSAM loop with its own GradScaler."""
    pytest.importorskip("lightning", reason="lightning is not installed (pip install -e '.[integrations]')")
    from lightning.pytorch.plugins import MixedPrecision
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 20))
    module, trainer = _lightning_fit(3, plugins=[plugin])
    tsam = trainer.optimizers[0]
    assert tsam.grad_scaler is plugin.scaler
    assert trainer.global_step == tsam.step_count == module.hooks == 12
    assert plugin.scaler.get_scale() < 2.0 ** 20  # overflows happened, and were skipped
    net = _net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    _plain_loop(net, TSAM(net.parameters(), torch.optim.SGD, grad_scaler=scaler, **OPTIONS), _batches(3), 2,
                scaler, lambda: torch.autocast("cpu", dtype=torch.float16, cache_enabled=False))
    assert scaler.get_scale() == plugin.scaler.get_scale()
    moved = False
    for p, q, start in zip(module.net.parameters(), net.parameters(), _net().parameters()):
        assert torch.equal(p, q)
        moved |= not torch.equal(p, start)
    assert moved  # not every step was skipped


def test_lightning_refuses_a_plain_tsam():
    with pytest.raises(TypeError, match="TrainerTSAM"):
        _lightning_fit(1, plain_tsam=True)


# -- transformers ---------------------------------------------------------------------------------------------

class _Regression(nn.Module):
    """A model the Trainer can train: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)

    def forward(self, x, labels):
        return {"loss": F.mse_loss(self.lin(x).squeeze(-1), labels)}


class _RegressionRows(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(2)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_trainer(tmp_path, optimizer=None, **fields):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[integrations]')")
    from transformers import TrainingArguments
    from tsam_fast.integrations.transformers import TSAMTrainer
    args = dict(output_dir=str(tmp_path), use_cpu=True, max_steps=3, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, learning_rate=0.05, save_strategy="no", logging_steps=1,
                report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    args.update(fields)
    model = _Regression()
    optimizers = (optimizer(model), None) if optimizer else (None, None)
    return TSAMTrainer(model=model, args=TrainingArguments(**args), train_dataset=_RegressionRows(),
                       tsam_options=dict(num_samples=2, radius=0.05, rho=0.02), optimizers=optimizers)


def test_tsam_trainer_takes_a_trainer_tsam_and_logs_the_sample_losses(tmp_path):
    trainer = _hf_trainer(tmp_path, optimizer=lambda m: TrainerTSAM(m.parameters(), torch.optim.SGD, lr=0.05,
                                                                     num_samples=3, radius=0.05))
    trainer.train()
    tsam = trainer.optimizer.optimizer
    assert trainer.state.global_step == tsam.step_count == 3 and tsam.num_samples == 3
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged[-1] == pytest.approx(float(tsam.last_losses.mean()), rel=1e-3, abs=1e-4)


def test_tsam_trainer_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(TypeError, match="TrainerTSAM"):
        _hf_trainer(tmp_path, optimizer=lambda m: TSAM(m.parameters(), torch.optim.SGD, lr=0.05)).train()
    with pytest.raises(ValueError, match="fp16"):
        _hf_trainer(tmp_path, fp16=True)
    from tsam_fast.integrations.transformers import TSAMTrainer
    with pytest.raises(ValueError, match="backward_samples"):
        TSAMTrainer(tsam_options=dict(backward_samples=1))
    with pytest.raises(ValueError, match="base_optimizer"):
        TSAMTrainer(tsam_options=dict(base_optimizer=torch.optim.SGD))


# -- Accelerate -------------------------------------------------------------------------------------------------

def _accelerate_run(accelerator, options, micro_batches, epochs=2, autocast=None):
    from tsam_fast.integrations.accelerate import tsam_step
    net = _net()
    opt = TSAM(net.parameters(), torch.optim.SGD, **options)
    loader = torch.utils.data.DataLoader(_Rows(), batch_size=5)
    model, opt, loader = accelerator.prepare(net, opt, loader)
    roles = []

    def loss_fn(b):
        with autocast() if autocast else contextlib.nullcontext():
            return F.cross_entropy(model(b["x"]), b["y"])

    for _ in range(epochs):
        for batch in loader:
            tsam_step(accelerator, model, opt, batch, loss_fn, micro_batches,
                      on_evaluation=lambda ev: roles.append(ev.role))
    return model, opt.optimizer, roles


def test_accelerate_tsam_step_equals_a_plain_loop(fresh_accelerate_state):
    """Uneven micro-batches (5 rows into 3: 2 + 2 + 1) of a dict batch, and forward-only scoring evaluations
    (``backward_samples``): bit for bit a plain loop; ``on_evaluation`` sees every evaluation."""
    from accelerate import Accelerator
    options = dict(OPTIONS, sampler="random", num_samples=3, backward_samples=2)
    model, tsam, roles = _accelerate_run(Accelerator(cpu=True), options, micro_batches=3)
    assert len(roles) == 5 * 8 and roles.count("score") == 3 * 8  # s scores, then K backwards, per step
    net = _net()
    reference = TSAM(net.parameters(), torch.optim.SGD, **options)
    for batch in _batches(2):
        run = reference.begin_step()
        for ev in run:
            total = None
            for part, weight in split_batch(batch, 3):
                with torch.set_grad_enabled(ev.backward):
                    loss = F.cross_entropy(net(part["x"]), part["y"]) * weight
                if ev.backward:
                    loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
            run.record(total)
        run.finish()
    for p, q in zip(model.parameters(), net.parameters()):
        assert torch.equal(p, q)
    assert tsam.step_count == reference.step_count == 8


def test_accelerate_tsam_step_with_a_grad_scaler(fresh_accelerate_state):
    """The accelerator's GradScaler (fp16; Accelerate makes one only on a GPU, so it is set by hand here):
    TSAM takes it, and a start scale of 2**20 makes the first steps overflow and be skipped. Bit for bit a
    plain TSAM loop with its own scaler."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    half = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    model, tsam, _ = _accelerate_run(accelerator, OPTIONS, micro_batches=2, epochs=3, autocast=half)
    assert tsam.grad_scaler is accelerator.scaler and accelerator.scaler.get_scale() < 2.0 ** 20
    net = _net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    _plain_loop(net, TSAM(net.parameters(), torch.optim.SGD, grad_scaler=scaler, **OPTIONS), _batches(3), 2,
                scaler, half)
    assert scaler.get_scale() == accelerator.scaler.get_scale()
    for p, q in zip(model.parameters(), net.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), _net().parameters()))


def test_accelerate_tsam_step_refuses_accelerates_accumulation(fresh_accelerate_state):
    from accelerate import Accelerator
    with pytest.raises(ValueError, match="micro_batches"):
        _accelerate_run(Accelerator(cpu=True, gradient_accumulation_steps=2), OPTIONS, micro_batches=2)


def test_save_on_preemption_saves_on_the_signal_and_restores_the_handlers(tmp_path, fresh_accelerate_state):
    """One process: the signal (here between steps) saves at once, ``requested()`` turns true, and the
    previous handlers are back after the block. A signal inside a step is the recipe's test
    (test_integrations.py: preempted mid-step, resumed bit-identical)."""
    from accelerate import Accelerator
    from tsam_fast.integrations.accelerate import save_on_preemption
    accelerator = Accelerator(cpu=True)
    net = _net()
    model, opt = accelerator.prepare(net, TSAM(net.parameters(), torch.optim.SGD, **OPTIONS))
    before = signal.getsignal(signal.SIGUSR1)
    with save_on_preemption(accelerator, opt, str(tmp_path / "state")) as preemption:
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested() and preemption.saved
    assert signal.getsignal(signal.SIGUSR1) is before
    assert os.path.isdir(tmp_path / "state") and os.listdir(tmp_path / "state")


PREEMPTED_ON_ONE_RANK = '''
import json, os, signal, sys
import torch
from torch.nn import functional as F
from accelerate import Accelerator
from tsam_fast import TSAM
from tsam_fast.integrations.accelerate import save_on_preemption, tsam_step

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
model, opt, loader = accelerator.prepare(net, TSAM(net.parameters(), torch.optim.SGD, lr=0.1, num_samples=2),
                                         torch.utils.data.DataLoader(data, batch_size=8))
tsam = opt.optimizer

def signal_rank0(ev):  # rank 0 alone is signalled, inside step 1
    if accelerator.process_index == 0 and tsam.step_count == 1 and ev.index == 1:
        os.kill(os.getpid(), signal.SIGTERM)

with save_on_preemption(accelerator, opt, sys.argv[1]) as preemption:
    for batch in loader:
        if preemption.requested():
            break
        tsam_step(accelerator, model, opt, batch, lambda b: F.cross_entropy(model(b[0]), b[1]), 2,
                  on_evaluation=signal_rank0)
print(json.dumps(dict(rank=accelerator.process_index, steps=tsam.step_count, saved=preemption.saved)), flush=True)
'''


def test_save_on_preemption_stops_every_process_after_the_same_step(tmp_path):
    """Two processes (gloo), only rank 0 signalled, in the middle of step 1: ``requested()`` agrees across
    the ranks, so both finish step 1, stop, and save the state together at the block's end."""
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[integrations]')")
    script = tmp_path / "preempted.py"
    script.write_text(PREEMPTED_ON_ONE_RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), str(tmp_path / "state")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')),
                     key=lambda r: r["rank"])
    assert results == [dict(rank=0, steps=2, saved=True), dict(rank=1, steps=2, saved=True)], proc.stdout
    assert {"model.safetensors", "optimizer.bin"} <= set(os.listdir(tmp_path / "state"))
