"""Smoke test of the generalization benchmark (bench/generalization.py) with its tiny preset: it runs end
to end on load_digits, counts equal forward/backward passes in the equal-compute table, and records
sensible numbers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import generalization  # noqa: E402


def test_symmetric_noise_flips_to_other_classes():
    y = torch.arange(10).repeat(2000)
    noisy = generalization.symmetric_noise(y, 0.4, seed=3)
    flipped = noisy != y
    assert abs(flipped.float().mean().item() - 0.4) < 0.02
    counts = torch.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].max()  # uniform over the OTHER classes
    assert torch.equal(noisy, generalization.symmetric_noise(y, 0.4, seed=3))
    assert torch.equal(generalization.symmetric_noise(y, 0.0, seed=3), y)


def test_smoke_preset_runs_and_records(tmp_path, capsys):
    threads_before = torch.get_num_threads()
    record = generalization.main(["--preset", "smoke", "--out-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads_before

    saved = json.loads((tmp_path / "generalization-latest.json").read_text())
    assert saved["runs"] == record["runs"]
    assert len(list(tmp_path.glob("generalization-smoke-*.json"))) == 1
    assert (tmp_path / "generalization-latest.png").stat().st_size > 0
    for key in ("config", "hyperparameter_budget", "data", "versions", "host", "summary", "wall_s"):
        assert key in saved, key
    cfg = saved["config"]
    assert cfg["preset"] == "smoke" and cfg["seeds"] == [0] and cfg["noise"] == [0.0, 0.4]

    keys = {"erm", "sam", "erm_x6", "sam_x3"} | {generalization.tilt_key(t) for t in cfg["tilts"]}
    runs = {(r["method"], r["noise"]): r for r in saved["runs"]}
    assert set(runs) == {(k, p) for k in keys for p in cfg["noise"]}
    for r in saved["runs"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_acc_noisy"] <= 1.0
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["sharpness"]["mean"])
        assert r["sharpness"]["max"] >= r["sharpness"]["mean"]
        assert r["passes"] == r["steps"] * r["calls_per_step"]
    for p in cfg["noise"]:
        assert runs[("erm", p)]["labels_flipped"] == pytest.approx(p, abs=0.05)
        tsam = runs[(generalization.tilt_key(cfg["tilts"][0]), p)]
        assert tsam["calls_per_step"] == 2 * cfg["num_samples"] and tsam["backend"]
        # equal compute: ERM and SAM make as many forward/backward passes as TSAM
        assert runs[("erm_x6", p)]["passes"] == runs[("sam_x3", p)]["passes"] == tsam["passes"]
    assert runs[("erm", 0.0)]["test_acc"] > 0.5  # well above chance (0.1) after 3 epochs on clean labels

    for table in ("same_epochs", "equal_compute"):
        for entry in saved["summary"][table]:
            assert set(entry["test_acc"]) == {"mean", "std", "n"}
            assert entry["label"] in out
    assert "no tuning" in out and "| noise | method |" in out


def test_help():
    with pytest.raises(SystemExit) as e:
        generalization.parse_args(["--help"])
    assert e.value.code == 0
