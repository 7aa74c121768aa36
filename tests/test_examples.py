"""The recipes of examples/ run as a user runs them (their ``main`` with command-line arguments; the DDP one
as a script in its own processes).

What the trainers do with TSAM in detail -- resume bit-exact, equal to a plain loop, accumulation inside
each evaluation, bf16 -- is tested in tests/test_integrations.py; the ``tsam_fast.integrations`` modules the
recipes are built on, and that ``import tsam_fast`` imports none of them nor any trainer, in
tests/test_integration_modules.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tables import EXAMPLES, one_thread, recipe  # noqa: F401  (one_thread: fixture)

ROOT = os.path.dirname(EXAMPLES)

RECIPES = {"lightning_tsam.py": "lightning", "hf_trainer_tsam.py": "transformers", "accelerate_tsam.py": "accelerate"}


def _printed_result(capsys) -> dict:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"')]
    assert lines, "the recipe printed no result line"
    return json.loads(lines[-1])


def test_readme_links_everyrecipe():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for name in RECIPES:
        assert f"examples/{name}" in readme, name
        assert os.path.exists(os.path.join(EXAMPLES, name))


def test_lightningrecipe(capsys, one_thread):
    lt = recipe("lightning_tsam", "lightning")
    lt.main(["--epochs", "2"])
    result = _printed_result(capsys)
    assert result["global_step"] == result["tsam_steps"] == 8
    assert result["tilted_loss"] < 1.3  # 4 classes: ln 4 = 1.386 at the start


def test_hf_trainerrecipe(tmp_path, capsys, one_thread):
    hf = recipe("hf_trainer_tsam", "transformers")
    trainer = hf.main(["--output-dir", str(tmp_path), "--max-steps", "8", "--save-steps", "4"])
    result = _printed_result(capsys)
    assert result["global_step"] == result["tsam_steps"] == 8
    assert result["last_loss"] < result["first_loss"] - 0.2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-8"]
    assert trainer.model.dtype == torch.float32  # bf16 is autocast, the weights stay fp32


def test_acceleraterecipe(tmp_path, capsys, one_thread):
    ac = recipe("accelerate_tsam", "accelerate")
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        ac.main(["--epochs", "2", "--save", str(tmp_path / "state")])
        first = _printed_result(capsys)
        AcceleratorState._reset_state(reset_partial_state=True)
        ac.main(["--epochs", "3", "--resume", str(tmp_path / "state")])
        resumed = _printed_result(capsys)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert first["tsam_steps"] == 8 and resumed["tsam_steps"] == 12
    assert first["last_loss"] < first["first_loss"]


def _run(cmd, timeout: float) -> str:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (every rank) and fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):  # let Lightning pick a port
        env.pop(name, None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s (a rank may have died and left the other "
                    f"waiting); its output ends:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def test_lightning_recipe_under_ddp(tmp_path):
    """2 CPU processes (gloo). ``ddp_fork`` is Lightning's DDP strategy with forked ranks: the same strategy
    code as ``--strategy ddp``, without a second import of Lightning (half the time on 2 cores)."""
    pytest.importorskip("lightning", reason="lightning is not installed (pip install -e '.[integrations]')")
    out = _run([sys.executable, os.path.join(EXAMPLES, "lightning_tsam.py"), "--devices", "2", "--strategy",
                "ddp_fork", "--epochs", "2", "--out", str(tmp_path)], timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:  # 64 images split over 2 ranks, batch 16: 2 steps per epoch
        assert rank["global_step"] == rank["tsam_steps"] == 4, out[-2000:]
    params = [{k: v for k, v in r["state"].items() if "running" not in k and "num_batches" not in k} for r in ranks]
    for name in params[0]:
        # identical on both ranks: same noise from the same seed, DDP-averaged gradients, and each sample's
        # loss averaged over the ranks before it enters the tilt (else the ranks' weights would differ)
        assert torch.equal(params[0][name], params[1][name]), name
    # ... while each rank saw its own half of the data: its batch-norm statistics are its own
    assert not torch.equal(ranks[0]["state"]["net.stem.1.running_mean"], ranks[1]["state"]["net.stem.1.running_mean"])
