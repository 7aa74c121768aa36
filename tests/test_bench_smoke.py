"""Smoke test of the benchmarks (bench/throughput.py and its modes, on bench/harness.py) on tiny models: they
run end to end, every method passes the check against the reference, a wrong method aborts the run
before timing, results are timestamped files plus a pointer outside the checkout, and the default run has
its transformer LM. The main job talks: under redirection it prints a line per phase and ends with a
verdict; the time budget cuts rows short and says so; rows too noisy to read are marked unreliable."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402
import methods  # noqa: E402
import presets  # noqa: E402
import report  # noqa: E402
import throughput  # noqa: E402
from baselines import ForeachTSAM, TSAMConfig  # noqa: E402
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
    # the verdict ends stdout: one line per tsam_fast row, naming the floor and both baselines
    tail = [line for line in table.splitlines() if line.strip()][-len(record["models"][0]["methods"]) + 4:]
    assert all(line.startswith("verdict (cpu, ") for line in tail), tail
    assert all("the floor" in line and "plain foreach TSAM" in line and "the authors' loop" in line for line in tail)
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
            assert row["steps"] == row["steps_planned"] and not row["cut_short"], key  # no budget ran out
            assert row["reliable"] == (not row["unreliable"]), key
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
        return real(*args, **kwargs) + [methods.Method("tsam_untilted", "untilted", "tsam", UntiltedTSAM)]

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


def test_reference_rows_and_the_oracle_hand_tsam_their_own_backend_objects():
    """Through the public ``TSAM(backend=<Backend>)``: the oracle runs the plain ``ReferenceOps``; each reference
    row (compiled or eager) holds a backend object of its own, so that its kept buffers are its alone."""
    from tsam_fast.backends.reference import ReferenceOps
    from tsam_fast.backends.reference_fast import FastReferenceBackend
    cfg = TSAMConfig()
    oracle = methods.plain_oracle([torch.nn.Parameter(torch.randn(5))], cfg)
    assert type(oracle.backend.ops) is ReferenceOps and oracle.backend_name() == "reference"
    rows = {m.key: m for m in methods.all_methods(torch.device("cpu"), ["reference"], eager_reference=True)}
    opts = [rows[key].make([torch.nn.Parameter(torch.randn(5))], cfg, None).opt
            for key in ("tsam_fast_reference", "tsam_fast_reference", "tsam_fast_reference_eager")]
    assert all(isinstance(o.backend, FastReferenceBackend) and o.backend_name() == "reference" for o in opts)
    assert len({id(o.backend) for o in opts}) == 3


def test_default_preset_has_a_real_shaped_transformer():
    """The default CPU run's LM: at least 75 parameter tensors, a few million parameters."""
    (gpt,) = presets.PRESETS["models"]["cpu"]["small"]["models"]["gpt"]
    params = list(build(ModelSpec("gpt", gpt), torch.device("cpu")).make_model().parameters())
    assert len(params) >= 75 and 2e6 <= sum(p.numel() for p in params) <= 10e6


def test_floor_is_the_design_notes_budget():
    assert harness.floor_bytes(1000, 3) == 42 * 4 * 1000
    assert abs(harness.floor_ms(10**6, 3, 42 * 4 / 1e3) - 1e3) < 1e-9  # 168 MB at 0.168 GB/s: one second


# -- the main job talks -------------------------------------------------------------------------


def stamped_line(text: str):
    """A progress line as a log gets it: ``[  12.3 s] ...``."""
    return re.match(r"^\[\s*\d+\.\d s\] ", text)


def _porcelain():
    """``git status --porcelain`` of the checkout (untracked files included), or None without git."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    return out.stdout if out.returncode == 0 else None


def test_redirected_run_talks_and_leaves_the_checkout_clean(tmp_path):
    """The main job as CI or nohup runs it, stdout and stderr to files: a stamped line per phase on stderr,
    the verdict last on stdout, the results in $TSAM_FAST_RESULTS, and nothing written into the checkout."""
    res = tmp_path / "results"
    env = {**os.environ, "TSAM_FAST_RESULTS": str(res), "TSAM_FAST_COMPILE": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    before = _porcelain()
    recorded_before = sorted(p.name for p in harness.RECORDED_DIR.iterdir())
    # the reference and cpp rows (not triton's, which the suite runs in its interpreter on a CPU: slow)
    args = [a for a in TINY if a != "--no-progress"] + ["--models", "mlp", "--backends", "reference,cpp", "--no-plot"]
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.run([sys.executable, "bench/throughput.py"] + args, cwd=REPO, env=env, stdout=out,
                              stderr=err, timeout=300)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, stderr
    lines = [line for line in stderr.splitlines() if stamped_line(line)]
    for phase in ("time budget", "copy bandwidth", "mlp .*: check of", "mlp .*: warm-up", "mlp .*: timing",
                  "done in"):
        assert any(re.search(phase, line) for line in lines), (phase, stderr)
    assert "\r" not in stderr  # no bar drawn into a file
    last = [line for line in stdout.splitlines() if line.strip()][-1]
    assert last.startswith("verdict (cpu, mlp ") and "the floor" in last, stdout
    written = sorted(p.name for p in res.iterdir())
    assert "latest-models-cpu.txt" in written and any(n.endswith(".json") for n in written)
    assert sorted(p.name for p in harness.RECORDED_DIR.iterdir()) == recorded_before
    if before is not None:
        assert _porcelain() == before  # nothing tracked rewritten, nothing untracked added


def test_default_results_dir_is_outside_the_checkout(monkeypatch):
    monkeypatch.delenv(harness.RESULTS_ENV, raising=False)
    default = harness.results_dir()
    assert default == Path.home() / ".cache" / "tsam_fast" / "results"
    assert REPO not in default.resolve().parents
    monkeypatch.setenv(harness.RESULTS_ENV, "/somewhere/else")
    assert harness.results_dir() == Path("/somewhere/else")
    assert throughput.parse_args([]).out_dir == Path("/somewhere/else")
    assert throughput.parse_args(["--record"]).out_dir == harness.RECORDED_DIR
    assert not list(harness.RECORDED_DIR.glob("latest-*.txt"))  # no pointer file is committed


def test_time_budget_cuts_rows_short_and_says_so(capsys, tmp_path):
    """A spent budget (0 s: the checks alone overrun it) keeps 2 warm-up rounds and --min-steps per row,
    and every row cut short says so in the record, the table and the progress lines."""
    args = throughput.parse_args([a for a in TINY if a not in ("--no-progress",)]
                                 + ["--models", "mlp", "--warmup", "3", "--steps", "6", "--min-steps", "3",
                                    "--time-budget", "0", "--methods", "erm,tsam_foreach"])
    record = throughput.run(args)
    err = capsys.readouterr().err
    (model,) = record["models"]
    assert model["warmup_rounds"] == 2
    for key, row in model["methods"].items():
        assert row["steps"] == 3 and row["steps_planned"] == 6 and row["cut_short"], key
    table = report.markdown(record)
    assert table.count("3 of 6 (time budget)") == 2
    assert "warm-up cut to 2 of 3 rounds by the time budget" in table
    assert "time budget spent" in err and "cut short" in err and "warm-up cut to 2 of 3 rounds" in err
    # --record's writer: the timestamped files, no pointer (it would change the committed tree every run)
    written = report.save(record, tmp_path, make_plot=False, pointer=False)
    assert sorted(p.suffix for p in written) == [".json", ".md"] and sorted(tmp_path.iterdir()) == sorted(written)


# -- unreliable rows, the verdict, progress, the plot (synthetic, no timing) ---------------------


def test_unreliable_marks_wide_spreads_and_few_samples():
    tight = harness.summarize([100.0 + 0.5 * (i % 5) for i in range(15)])
    assert harness.unreliable(tight) is None
    wide = harness.summarize([100.0, 140.0, 70.0, 180.0, 95.0, 60.0, 150.0, 110.0])  # a busy machine
    why = harness.unreliable(wide, "overhead")
    assert why.startswith("overhead ±") and "8 samples" in why
    assert "under 3" in harness.unreliable(harness.summarize([1.0, 1.0]))
    assert "≤ 0" in harness.unreliable(harness.summarize([-1.0, -2.0, -1.5, -1.2]))
    # the same spread is readable with enough samples: the bound is on the median's 95% interval, 2 IQR/√n
    spread = [85.0, 90.0, 100.0, 110.0, 115.0]  # IQR/median 0.25: ±22% at 5 samples, ±3.5% at 200
    few, many = harness.summarize(spread), harness.summarize(spread * 40)
    assert harness.unreliable(few) is not None and harness.unreliable(many) is None
    assert abs(harness.median_half_width(many) - 2 * many["iqr"] / (200 ** 0.5 * 100.0)) < 1e-12


def _row(label, overhead, floor=10.0, reliable=True):
    st = dict(median=overhead, q25=0.9 * overhead, q75=1.1 * overhead, iqr=0.2 * overhead, n=15)
    return dict(label=label, overhead_ms=overhead, overhead=st, overhead_over_floor=overhead / floor,
                reliable=reliable, unreliable=[] if reliable else ["overhead ±40%"])


def _record(models):
    return dict(device=dict(type="cpu", name="test cpu"), mode="models", date="2026-12-04T00:00:00+00:00",
                models=models)


def test_verdict_per_backend_names_missing_and_unreliable_rows():
    small = dict(kind="mlp", params=1_000_000, floor_ms=10.0, methods=dict(
        tsam_authors=_row("TSAM authors'-style", 390.0), tsam_foreach=_row("TSAM foreach", 180.0),
        tsam_fast_cpp=_row("tsam_fast cpp (auto)", 100.0)))
    big = dict(kind="gpt", params=5_280_000, floor_ms=50.0, methods=dict(
        tsam_foreach=_row("TSAM foreach", 190.0, 50.0, reliable=False),
        tsam_fast_cpp=_row("tsam_fast cpp (auto)", 85.0, 50.0),
        tsam_fast_reference=_row("tsam_fast reference", 300.0, 50.0)))
    cpp, ref = report.verdict(_record([small, big]))
    assert cpp == ("verdict (cpu, gpt 5.28M): tsam_fast cpp (auto): overhead 85.0 ms = 1.7× the floor, 2.2× below "
                   "plain foreach TSAM [unreliable], 3.9× below the authors' loop (on mlp 1M)")
    assert ref == ("verdict (cpu, gpt 5.28M): tsam_fast reference: overhead 300 ms = 6.0× the floor, 1.6× above "
                   "plain foreach TSAM [unreliable], no row of the authors' loop in this run")
    only_baselines = dict(small, methods={"tsam_foreach": small["methods"]["tsam_foreach"]})
    assert report.verdict(_record([only_baselines])) == [
        "verdict (cpu): no tsam_fast row ran (rows: tsam_foreach): nothing to compare"]


def test_progress_lines_when_not_a_terminal():
    stream = io.StringIO()  # not a terminal
    progress = harness.Progress(10, every_s=3600.0, stream=stream)
    assert progress.mode == "lines"
    progress.note("mlp: check")
    progress.update(1, "a fast row")  # within every_s of the last line: no line of its own
    progress.warn("time budget spent")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("] mlp: check") and lines[1].endswith("] time budget spent")
    assert all(stamped_line(line) for line in lines)
    eager = io.StringIO()
    progress = harness.Progress(10, every_s=0.0, stream=eager)
    progress.update(1, "row 1")
    progress.update(1, "row 2")
    assert eager.getvalue().count("\n") == 2
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    progress = harness.Progress(10, stream=tty)
    assert progress.mode == "bar"
    progress.note("gpt: timing"), progress.update(3, "round 1"), progress.warn("time budget spent")
    progress.close()
    assert "time budget spent" in tty.getvalue() and not stamped_line(tty.getvalue())
    quiet = io.StringIO()
    progress = harness.Progress(10, enabled=False, stream=quiet)
    progress.note("x"), progress.warn("y"), progress.update(1, "z")
    assert quiet.getvalue() == ""


def test_plot_has_error_bars_and_only_the_models_that_ran(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k)))
    gpt = dict(kind="gpt", params=5_280_000, floor_ms=50.0, methods=dict(
        tsam_foreach=_row("TSAM foreach", 190.0, 50.0, reliable=False),
        tsam_fast_cpp=_row("tsam_fast cpp", 85.0, 50.0)))
    assert harness.plot_overheads(_record([gpt]), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    (fig,) = figures
    title = fig.axes[0].get_legend().get_title().get_text()
    assert "gpt" in title and not any(k in title for k in ("mlp", "cnn", "flat")) and "unreliable" in title
    from matplotlib.container import ErrorbarContainer
    assert all(sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 2 for ax in fig.axes)
