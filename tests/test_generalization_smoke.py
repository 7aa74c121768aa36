"""Smoke test of the generalization benchmark (bench/generalization.py) with its tiny preset: it runs end
to end on load_digits, counts equal forward/backward passes in the equal-compute table, records sensible
numbers, and its best-validation-epoch selection is consistent with the per-epoch curves it records."""

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


def test_validation_split_and_noise():
    split = generalization.load_split(0.3, 0.15, split_seed=0)
    n_fit, n_val, n_test = len(split.y_train), len(split.y_val), len(split.y_test)
    assert n_fit + n_val + n_test == 1797 and n_val == len(split.y_pool) - n_fit
    assert abs(n_val / (n_fit + n_val) - 0.15) < 0.01
    # disjoint: fit and validation are complementary positions of the training part
    assert sorted(torch.cat([split.fit_idx, split.val_idx]).tolist()) == list(range(len(split.y_pool)))
    assert torch.equal(split.y_pool[split.val_idx], split.y_val)
    # stratified: every class in the validation set, in about its share
    assert torch.bincount(split.y_val, minlength=10).min() >= 0.8 * n_val / 10
    # noise: one draw over fit + validation, both noisy at about the rate, deterministic per seed
    fit, val = generalization.noisy_labels(split, 0.4, seed=1)
    pool = generalization.symmetric_noise(split.y_pool, 0.4, generalization.noise_seed(1, 0.4))
    assert torch.equal(fit, pool[split.fit_idx]) and torch.equal(val, pool[split.val_idx])
    assert abs((fit != split.y_train).float().mean().item() - 0.4) < 0.05
    assert abs((val != split.y_val).float().mean().item() - 0.4) < 0.1
    assert torch.equal(generalization.noisy_labels(split, 0.0, seed=1)[1], split.y_val)


def test_select_epoch_ties_to_earliest():
    assert generalization.select_epoch([0.5, 0.7, 0.6, 0.7]) == 1
    assert generalization.select_epoch([0.9]) == 0
    assert generalization.select_epoch([0.2, 0.2, 0.2]) == 0


def test_compact_number_lists_keeps_the_json():
    obj = dict(a=[0.1234, 1, -2.5e-05], b=dict(c=[], d=["x", 1], e=[[1, 2], [3]]), f=[1.0])
    text = generalization.compact_number_lists(json.dumps(obj, indent=1))
    assert json.loads(text) == obj and "[0.1234, 1, -2.5e-05]" in text


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
        # per-epoch curves: one point per epoch; the selection is the best-val epoch's test accuracy
        val, test = r["curves"]["val_acc"], r["curves"]["test_acc"]
        assert len(val) == len(test) == r["epochs"]
        assert all(0.0 <= v <= 1.0 and round(v, 4) == v for v in val + test)
        assert 1 <= r["selected_epoch"] <= r["epochs"]
        best = r["selected_epoch"] - 1
        assert val[best] == max(val) and max(val) not in val[:best]  # ties -> earliest
        assert round(r["test_acc_selected"], 4) == test[best]
        assert round(r["val_acc_selected"], 4) == val[best] and round(r["val_acc_final"], 4) == val[-1]
        assert round(r["test_acc"], 4) == test[-1]  # final = the last point of the curve
    assert saved["data"]["val"] > 0 and cfg["val_size"] == 0.15
    for p in cfg["noise"]:
        assert runs[("erm", p)]["labels_flipped"] == pytest.approx(p, abs=0.05)
        assert runs[("erm", p)]["val_labels_flipped"] == pytest.approx(p, abs=0.1)
        tsam = runs[(generalization.tilt_key(cfg["tilts"][0]), p)]
        assert tsam["calls_per_step"] == 2 * cfg["num_samples"] and tsam["backend"]
        # equal compute: ERM and SAM make as many forward/backward passes as TSAM
        assert runs[("erm_x6", p)]["passes"] == runs[("sam_x3", p)]["passes"] == tsam["passes"]
    assert runs[("erm", 0.0)]["test_acc"] > 0.5  # well above chance (0.1) after 3 epochs on clean labels

    for table in ("same_epochs", "equal_compute"):
        for entry in saved["summary"][table]:
            assert set(entry["test_acc"]) == {"mean", "std", "n"}
            assert set(entry["test_acc_selected"]) == {"mean", "std", "n"}
            assert set(entry["delta_vs_erm_selected"]) == {"mean", "std", "n"}
            r = runs[(entry["method"], entry["noise"])]  # one seed: the summary is the run
            assert entry["test_acc_selected"]["mean"] == r["test_acc_selected"]
            assert entry["selected_epoch"]["mean"] == r["selected_epoch"]
            erm = runs[(entry["erm"], entry["noise"])]
            assert entry["delta_vs_erm_selected"]["mean"] == pytest.approx(
                r["test_acc_selected"] - erm["test_acc_selected"])
            assert entry["label"] in out
    assert "no tuning" in out and "| noise | method |" in out
    assert "test acc % (final)" in out and "test acc % (best-val epoch)" in out and "best-val epoch |" in out
    assert "Test accuracy % at the final epoch" in out and "Test accuracy % at the best-validation epoch" in out


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        generalization.parse_args(["--help"])
    assert e.value.code == 0
    assert "--val-size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        generalization.parse_args(["--val-size", "0"])
