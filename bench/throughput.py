#!/usr/bin/env python3
"""tsam_fast's benchmarks, one script on one harness (``harness.py``): ``bash scripts/bench.sh`` runs the
default mode, the main job our users run.

Modes (``--mode``; the methods and models of each are presets, every option overrides them):

    models    (default) ERM, SAM, the authors'-style TSAM loop, plain foreach TSAM and tsam_fast with
              every backend on an MLP, a ResNet-style CNN and a 77-tensor GPT-style LM: step time,
              overhead, overhead / floor, extra memory, throughput
    overhead  the optimizer overhead at ~10M parameters: the 10M MLP and the same LM, the reference
              backend compiled and eager ("no compiler") next to plain foreach TSAM and the C++ backend
    gpu       the same on a CUDA device at 50M-500M parameters of a ``flat`` model (one pass of
              forward/backward), the Triton backend against plain PyTorch and the authors'-style loop
    fixed     the fixed per-step cost on a tiny MLP (8-8-2), closure and begin_step() loop, 1 thread
    ops       each op of the contract alone (``bench_ops.py``): time and GB/s per backend

Every row is one method stepping its own copy of a model; rows are interleaved step by step (rotating
order) so that drifting clocks and neighbours hit every method alike. Before timing, every method's
parameters after two steps are checked against tsam_fast's reference optimizer (ERM and SAM are special
cases of it); the run aborts if any disagrees. Overhead per step = step time - time inside the closure
(measured inside each step on a CPU; on a GPU, step - calls x the forward/backward row's median).
Floor = ``harness.floor_bytes`` (docs/design.md §5) / the copy bandwidth measured in the same run.

The run talks: a line per phase and row on stderr when it is not a terminal (a bar when it is); a time
budget (``--time-budget``) covers checks, warm-ups and timing, and the rows it cuts short say so; rows
whose spread is too wide to read are marked unreliable (``harness.unreliable``); the last lines are the
verdict, one per tsam_fast row. Results: the markdown table on stdout, and
``<mode>-<device>-<size>-<UTC stamp>.json/.md/.png`` in ``$TSAM_FAST_RESULTS`` or
``~/.cache/tsam_fast/results`` (``--out-dir``), or in the committed ``bench/results/`` with ``--record``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script from anywhere, or imported by the tests
    sys.path.insert(0, str(HERE))

import tsam_fast  # noqa: E402
import bench_ops  # noqa: E402
import harness  # noqa: E402
from baselines import TSAMConfig  # noqa: E402
from harness import PASSES_PER_SAMPLE, PASSES_PER_STEP, Progress, model_tag, resolve_device  # noqa: E402
from methods import CheckFailed, Method, all_methods, auto_backend, check_methods, check_twin  # noqa: E402
from models import build, param_count  # noqa: E402
from presets import BASE_OPTIMIZERS, MODES, model_specs, preset_for  # noqa: E402
from report import markdown, save  # noqa: E402
from timing import bench_model  # noqa: E402


# -- command line -------------------------------------------------------------------------------


def _int_list(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description="tsam_fast's benchmarks on one harness: TSAM implementations against ERM and SAM on the same "
                    "models, batches and base optimizer, interleaved in one run, each checked against the reference "
                    "optimizer before it is timed. Prints progress on stderr (a line per phase and row when it is "
                    "not a terminal), then a markdown table and a one-line verdict per tsam_fast row on stdout; "
                    "writes JSON, markdown and a PNG to $" + harness.RESULTS_ENV + " or ~/.cache/tsam_fast/results "
                    "(never into the checkout unless --record). Modes: " + ", ".join(MODES)
                    + " (bench/README.md says what each measures).",
        formatter_class=harness.HelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--mode", choices=MODES, default="models", help="which benchmark")
    g.add_argument("--size", choices=("small", "medium", "large"), default="small",
                   help="size preset of the mode; each device type (cpu, cuda) has its own sizes")
    g.add_argument("--device", default="auto", help=harness.DEVICE_HELP)
    g.add_argument("--models", default=None, help="comma-separated subset of the preset's model kinds "
                                                  "(mlp, cnn, gpt, flat)")
    g.add_argument("--methods", default=None,
                   help="comma-separated method keys to run (erm, sam, tsam_authors, tsam_foreach, "
                        "tsam_fast_<backend>, tsam_fast_reference_eager, tsam_fast_<backend>_loop); default: "
                        "the mode's")
    g.add_argument("--backends", default=None,
                   help="comma-separated tsam_fast backends to give rows; default: every available one")
    g = p.add_argument_group("model sizes (override the preset)")
    g.add_argument("--mlp-width", type=_int_list, default=None,
                   help="comma-separated MLP widths, one model each (parameters ~ (depth-1) * width^2)")
    g.add_argument("--mlp-depth", type=int, default=None, help="hidden layers of the MLP (default 5)")
    g.add_argument("--cnn-width", type=int, default=None, help="channels of the CNN's first stage (default 16)")
    g.add_argument("--cnn-blocks", type=int, default=None, help="residual blocks per stage (default 1)")
    g.add_argument("--gpt-dim", type=int, default=None, help="GPT model width")
    g.add_argument("--gpt-layers", type=int, default=None, help="GPT decoder blocks (12 tensors each)")
    g.add_argument("--gpt-heads", type=int, default=None, help="GPT attention heads")
    g.add_argument("--vocab", type=int, default=None, help="GPT vocabulary size")
    g.add_argument("--seq-len", type=int, default=None, help="GPT sequence length")
    g.add_argument("--sizes", default=None, help="flat model: comma-separated parameter counts (e.g. 50e6,200e6)")
    g.add_argument("--tensors", type=int, default=None, help="flat model: parameter tensors")
    g.add_argument("--batch-size", type=int, default=None, help="batch size for every model (default per model)")
    g = p.add_argument_group("optimizer (shared by every method)")
    g.add_argument("--base", choices=sorted(BASE_OPTIMIZERS), default="sgd", help="base optimizer")
    g.add_argument("--lr", type=float, default=0.01, help="learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--num-samples", type=int, default=3, help="TSAM perturbations per step (s)")
    g.add_argument("--tilt", type=float, default=1.0, help="TSAM tilt t")
    g.add_argument("--rho", type=float, default=0.05, help="ascent step length (SAM and TSAM)")
    g.add_argument("--radius", type=float, default=1.0, help="TSAM random start radius r")
    g.add_argument("--noise-scale", type=float, default=1.0, help="TSAM Gaussian noise scale")
    g.add_argument("--seed", type=int, default=0, help="model, data and noise seed")
    g.add_argument("--check-finite", action="store_true",
                   help="run tsam_fast with check_finite=True (one host sync per step, as by default in "
                        "training); off by default so that no TSAM row syncs the host")
    g = p.add_argument_group("timing")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps per method before timing (default: preset)")
    g.add_argument("--steps", type=int, default=None, help="timed steps per method (default: preset)")
    g.add_argument("--min-steps", type=int, default=None,
                   help="timed steps a row keeps even when it exceeds --row-budget (default: preset)")
    g.add_argument("--row-budget", type=float, default=None,
                   help="seconds of timed steps per row: slower rows run fewer steps (at least --min-steps)")
    g.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: checks, warm-ups and timing of every model, shared by the "
                        "models (default: the preset's). Once a model's share is spent, its warm-up stops after "
                        "2 rounds and its rows after --min-steps, marked 'time budget' in the table; the checks "
                        "always run in full, so a run can overshoot by their time")
    g.add_argument("--baseline-noise", choices=("torch", "philox"), default="torch",
                   help="noise generator of the baselines while timed: torch's own (what their authors "
                        "call) or tsam_fast's Philox reference in tensor ops (slower); the correctness check "
                        "always uses Philox so that every method sees tsam_fast's noise")
    g.add_argument("--check-rtol", type=float, default=1e-4,
                   help="tolerance of the check against the reference (relative to the largest update)")
    g.add_argument("--no-check", action="store_true", help="time without the check (never for published figures)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the preset's, else torch's)")
    g.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the copy that measures memory bandwidth (default 256 on CPU, 1024 on GPU)")
    g = p.add_argument_group("ops mode")
    g.add_argument("--op-sizes", default="1e6,1e7", help="elements per op call")
    g = p.add_argument_group("output")
    harness.add_output_options(g, "the JSON, markdown and PNG",
                               pointer="a latest-<mode>-<device>.txt pointer to the newest JSON")
    g.add_argument("--no-save", action="store_true", help="print the table only; write no files")
    g.add_argument("--no-plot", action="store_true", help="write no PNG")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (neither the bar on a terminal nor the lines otherwise)")
    args = p.parse_args(argv)
    args.out_dir = harness.output_dir(args)
    return args


# -- main ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, methods: Optional[List[Method]] = None) -> dict:
    """The whole benchmark; returns the JSON record. Raises ``CheckFailed`` before timing a wrong method."""
    threads = torch.get_num_threads()
    device = resolve_device(args.device)
    want = args.threads or preset_for(args, device).get("threads")
    if want:
        torch.set_num_threads(want)
    try:
        return _run(args, device, methods)
    finally:
        torch.set_num_threads(threads)  # run() is also called in-process (tests): leave torch as found


def _run(args: argparse.Namespace, device: torch.device, methods: Optional[List[Method]]) -> dict:
    t_start = time.perf_counter()
    preset = preset_for(args, device)
    warmup = max(1, args.warmup if args.warmup is not None else preset["warmup"])  # the 1st step builds buffers
    steps = args.steps if args.steps is not None else preset["steps"]
    min_steps = min(steps, args.min_steps if args.min_steps is not None else preset["min_steps"])
    row_budget = args.row_budget if args.row_budget is not None else preset["row_budget"]
    time_budget = args.time_budget if args.time_budget is not None else preset["time_budget"]

    base_cls, base_kwargs = BASE_OPTIMIZERS[args.base]
    cfg = TSAMConfig(base_cls, base_kwargs(args), tilt=args.tilt, num_samples=args.num_samples, rho=args.rho,
                     radius=args.radius, noise_scale=args.noise_scale, seed=args.seed)
    backends = args.backends.split(",") if args.backends else None
    if backends:
        unknown = set(backends) - set(tsam_fast.backend_info())
        if unknown:
            raise SystemExit(f"--backends: unknown {sorted(unknown)}; known: {list(tsam_fast.backend_info())}")
    if methods is None:
        methods = all_methods(device, backends, args.check_finite, preset.get("eager_reference", False),
                              preset.get("loops", False))
    wanted = args.methods or preset.get("methods")
    if wanted:
        keys = {m.key for m in methods}
        wanted = [k for k in wanted.split(",") if args.methods or k in keys]  # a preset skips what cannot run here
        missing = set(wanted) - keys
        if missing:
            raise SystemExit(f"--methods: {sorted(missing)} not available; choose from {sorted(keys)}")
        methods = [m for m in methods if m.key in wanted]
    specs = model_specs(args, preset)

    progress = Progress(len(specs) * (warmup + steps) * (len(methods) + 1), enabled=not args.no_progress,
                        start=t_start)
    deadline = t_start + time_budget
    progress.note(f"{args.mode} mode on {device}: {len(specs)} model(s) × {len(methods)} methods "
                  f"({', '.join(m.key for m in methods)}); time budget {time_budget:.0f} s for checks, warm-ups and "
                  "timing")
    load_before = harness.warn_if_loaded(device)
    bw_bytes = args.bandwidth_mib * 2**20 if args.bandwidth_mib else None
    bandwidth = harness.copy_bandwidth(device, bw_bytes)
    progress.note(f"copy bandwidth {bandwidth:.1f} GB/s")
    record = dict(harness.machine_record(device), mode=args.mode, auto_backend=auto_backend(device),
                  bandwidth_gbps=bandwidth,
                  config=dict(size=args.size, warmup=warmup, steps=steps, min_steps=min_steps, row_budget_s=row_budget,
                              time_budget_s=time_budget, time_budget_covers="checks, warm-ups and timing",
                              baseline_noise=args.baseline_noise,
                              check_rtol=args.check_rtol, no_check=args.no_check, check_finite=args.check_finite,
                              models=[s.name for s in specs], methods=[m.key for m in methods], tsam=cfg.as_dict(),
                              floor_passes=dict(per_sample=PASSES_PER_SAMPLE, per_step=PASSES_PER_STEP)),
                  models=[])
    record["load_average"]["before"] = load_before
    authors_max = preset.get("authors_max", float("inf"))
    try:
        for i, spec in enumerate(specs):
            # each model's share: an equal part of what is left, so time a model leaves goes to the next
            now = time.perf_counter()
            model_deadline = now + max(0.0, deadline - now) / (len(specs) - i)
            workload = build(spec, device, seed=args.seed)
            tag = model_tag(spec.kind, param_count(workload.make_model()))
            ms = [m for m in methods if not (m.key == "tsam_authors" and spec.options.get("numel", 0) > authors_max)]
            progress.note(f"{tag}: model {i + 1}/{len(specs)}, {spec.name}; {model_deadline - now:.0f} s of the "
                          "time budget for it")
            check, t_check = {}, time.perf_counter()
            if not args.no_check:
                twin = check_twin(workload, device, seed=args.seed)
                progress.note(f"{tag}: check of {len(ms)} methods against the reference, timed and tilt-sensitive "
                              "settings")
                check = check_methods(twin, cfg, ms, rtol=args.check_rtol, progress=progress, tag=tag)
                del twin
                if time.perf_counter() > model_deadline:
                    progress.warn(f"{tag}: the check took this model's whole share of the time budget "
                                  f"({time.perf_counter() - t_check:.0f} s): warm-up and timing get their minimum")
            check_s = time.perf_counter() - t_check
            result = bench_model(workload, cfg, ms, device=device, warmup=warmup, steps=steps,
                                 min_steps=min_steps, row_budget_s=row_budget, deadline=model_deadline,
                                 bandwidth_gbps=bandwidth, noise=args.baseline_noise, progress=progress)
            result["check"], result["check_s"] = check, check_s
            record["models"].append(result)
            del workload
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        progress.note("copy bandwidth again, for the record")
        record["bandwidth_after_gbps"] = harness.copy_bandwidth(device, bw_bytes)
        record["wall_s"] = time.perf_counter() - t_start
        progress.note(f"done in {record['wall_s']:.0f} s (time budget {time_budget:.0f} s)")
    finally:
        progress.close()
    record["load_average"]["after"] = harness.load_average()
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "ops":
        return bench_ops.main(args)
    try:
        record = run(args)
    except CheckFailed as e:
        print(f"ABORTED before timing: {e}", file=sys.stderr)
        return 2
    if not args.no_save:  # first, so that the verdict is the last thing printed
        for path in save(record, args.out_dir, make_plot=not args.no_plot, pointer=not args.record):
            print(f"wrote {path}", file=sys.stderr)
    sys.stderr.flush()
    print(markdown(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
