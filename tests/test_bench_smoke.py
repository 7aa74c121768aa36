"""Smoke test of the throughput benchmark (bench/throughput.py) on tiny models: it runs end to end,
every method passes the check against the reference, and a wrong method aborts the run before timing."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import throughput  # noqa: E402
from baselines import ForeachTSAM  # noqa: E402

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
    record = json.loads((tmp_path / "latest-cpu.json").read_text())
    table = capsys.readouterr().out
    expected = {"erm", "sam", "tsam_authors", "tsam_foreach"} | {
        f"tsam_fast_{n}" for n, st in __import__("tsam_fast").backend_info().items()
        if st.available and ("any" in st.devices or "cpu" in st.devices)}
    assert [m["kind"] for m in record["models"]] == ["mlp", "cnn", "gpt"]
    for model in record["models"]:
        assert set(model["methods"]) == expected
        assert set(model["check"]) == {"timed", "tilt_sensitive"}
        assert all(c["passed"] for checks in model["check"].values() for c in checks.values())
        for key, row in model["methods"].items():
            assert row["step_ms"]["median"] > 0 and row["steps"] >= 2, key
            assert row["label"] in table
        assert model["methods"]["tsam_authors"]["extra_memory_x"] > model["methods"]["tsam_foreach"]["extra_memory_x"]
    assert "tokens_per_s" in record["models"][2]["methods"]["erm"]
    assert record["bandwidth_gbps"] > 0 and record["versions"]["torch"] == torch.__version__
    assert torch.get_num_threads() == threads_before  # --threads is undone when run() returns


def test_wrong_method_aborts_before_timing(capsys, monkeypatch):
    real = throughput.default_methods

    def with_wrong(*args, **kwargs):
        return real(*args, **kwargs) + [throughput.Method("tsam_untilted", "untilted", "tsam", UntiltedTSAM)]

    monkeypatch.setattr(throughput, "default_methods", with_wrong)
    timed = []
    monkeypatch.setattr(throughput, "bench_model", lambda *a, **k: timed.append(a))
    assert throughput.main(TINY + ["--no-save", "--models", "mlp"]) == 2
    err = capsys.readouterr().err
    assert "ABORTED before timing" in err and "tsam_untilted" in err
    assert "tsam_foreach" not in err  # the correct methods are not blamed
    assert not timed
