"""Smoke test of the benchmarks (bench/throughput.py and its modes, on bench/harness.py) on tiny models: they
run end to end, every method passes the check against the reference, a wrong method aborts the run
before timing, results are timestamped files plus a pointer, and the default run has its transformer LM."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import harness  # noqa: E402
import throughput  # noqa: E402
from baselines import ForeachTSAM  # noqa: E402
from models import ModelSpec, build  # noqa: E402

TINY = ["--device", "cpu", "--models", "mlp,cnn,gpt", "--mlp-width", "16", "--mlp-depth", "2",
        "--cnn-width", "4", "--gpt-dim", "16", "--gpt-layers", "1", "--gpt-heads", "2", "--vocab", "32",
        "--seq-len", "8", "--batch-size", "4", "--warmup", "1", "--steps", "3", "--min-steps", "2",
        "--bandwidth-mib", "8", "--no-progress",
        # one thread: two OpenMP threads crawl when the rest of the suite keeps the other core busy
        "--threads", "1"]


class UntiltedTSAM(ForeachTSAM):
    """A plausible bug: the samples' gradients are averaged, ignoring the tilt."""

    def __init__(self, params, cfg, noise):
        cfg = copy.copy(cfg)
        cfg.tilt = 0.0
        super().__init__(params, cfg, noise)


def test_default_run_checks_and_records(tmp_path, capsys):
    threads_before = torch.get_num_threads()
    assert throughput.main(TINY + ["--out-dir", str(tmp_path), "--no-plot"]) == 0
    record = json.loads(harness.latest(tmp_path, "latest-models-cpu.txt").read_text())
    table = capsys.readouterr().out
    expected = {"erm", "sam", "tsam_authors", "tsam_foreach"} | {
        f"tsam_fast_{n}" for n, st in __import__("tsam_fast").backend_info().items()
        if st.available and ("any" in st.devices or "cpu" in st.devices)}
    assert [m["kind"] for m in record["models"]] == ["mlp", "cnn", "gpt"]
    for model in record["models"]:
        assert set(model["methods"]) == expected
        assert set(model["check"]) == {"timed", "tilt_sensitive"}
        assert all(c["passed"] for checks in model["check"].values() for c in checks.values())
        assert "tsam_fast_reference" in model["check"]["timed"]  # checked against the plain definition too
        for key, row in model["methods"].items():
            assert row["step_ms"]["median"] > 0 and row["steps"] >= 2, key
            assert 0 < row["fwd_bwd_ms"] < row["step_ms"]["median"], key  # time inside the closure, per step
            assert row["label"] in table
        assert model["methods"]["tsam_authors"]["extra_memory_x"] > model["methods"]["tsam_foreach"]["extra_memory_x"]
    assert "tokens_per_s" in record["models"][2]["methods"]["erm"]
    assert record["bandwidth_gbps"] > 0 and record["versions"]["torch"] == torch.__version__
    assert "generator" in record["backends"]["reference"]
    # timestamped files and a pointer, no duplicate
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([harness.latest(tmp_path, "latest-models-cpu.txt").name,
                            harness.latest(tmp_path, "latest-models-cpu.txt").with_suffix(".md").name,
                            "latest-models-cpu.txt"])
    assert torch.get_num_threads() == threads_before  # --threads is undone when run() returns


def test_wrong_method_aborts_before_timing(capsys, monkeypatch):
    real = throughput.all_methods

    def with_wrong(*args, **kwargs):
        return real(*args, **kwargs) + [throughput.Method("tsam_untilted", "untilted", "tsam", UntiltedTSAM)]

    monkeypatch.setattr(throughput, "all_methods", with_wrong)
    timed = []
    monkeypatch.setattr(throughput, "bench_model", lambda *a, **k: timed.append(a))
    assert throughput.main(TINY + ["--no-save", "--models", "mlp"]) == 2
    err = capsys.readouterr().err
    assert "ABORTED before timing" in err and "tsam_untilted" in err
    assert "tsam_foreach" not in err  # the correct methods are not blamed
    assert not timed


def test_other_modes_run(tmp_path, capsys):
    """overhead (with the eager reference row), gpu's code path on a flat model, fixed (with the loop rows)."""
    common = ["--device", "cpu", "--warmup", "1", "--steps", "2", "--min-steps", "2", "--bandwidth-mib", "8",
              "--no-progress", "--threads", "1", "--out-dir", str(tmp_path), "--no-plot"]
    assert throughput.main(["--mode", "overhead", "--models", "mlp", "--mlp-width", "8", "--mlp-depth", "2",
                            "--methods", "tsam_foreach,tsam_fast_reference,tsam_fast_reference_eager"] + common) == 0
    rec = json.loads(harness.latest(tmp_path, "latest-overhead-cpu.txt").read_text())
    assert set(rec["models"][0]["methods"]) == {"tsam_foreach", "tsam_fast_reference", "tsam_fast_reference_eager"}
    assert rec["models"][0]["check"]["timed"]["tsam_fast_reference_eager"]["passed"]
    assert throughput.main(["--mode", "gpu", "--sizes", "3001", "--tensors", "3"] + common) == 0
    rec = json.loads(harness.latest(tmp_path, "latest-gpu-cpu.txt").read_text())
    assert rec["models"][0]["params"] == 3001 and rec["models"][0]["tensors"] == 3
    assert throughput.main(["--mode", "fixed", "--methods", "tsam_foreach,tsam_fast_reference_loop"] + common) == 0
    rec = json.loads(harness.latest(tmp_path, "latest-fixed-cpu.txt").read_text())
    assert rec["models"][0]["check"]["timed"]["tsam_fast_reference_loop"]["passed"]


def test_default_preset_has_a_real_shaped_transformer():
    """The default CPU run's LM: at least 75 parameter tensors, a few million parameters."""
    (gpt,) = throughput.PRESETS["models"]["cpu"]["small"]["models"]["gpt"]
    params = list(build(ModelSpec("gpt", gpt), torch.device("cpu")).make_model().parameters())
    assert len(params) >= 75 and 2e6 <= sum(p.numel() for p in params) <= 10e6


def test_floor_is_the_design_notes_budget():
    assert harness.floor_bytes(1000, 3) == 42 * 4 * 1000
    assert abs(harness.floor_ms(10**6, 3, 42 * 4 / 1e3) - 1e3) < 1e-9  # 168 MB at 0.168 GB/s: one second
