#!/usr/bin/env python3
"""Which part of the periodic tilt's step between full ones holds TSAM's accuracy: an instrument, not part of
the library. It trains runs of the generalization study (``train_one``: its data, label noise, models,
schedule and batch order, at ``--fit-size``/``--epochs``) with ``tilt_every = k`` and the step between full
ones replaced, in each worker process, by one of these forms (g: this step's plain gradient; g0, G, the
tilted gradient, beta = G.g0/||g0||^2 and v = G - beta g0 of the last full step):

    plain       g + (||g||/||g0||) v          tilt_every's step until 2026-12-04
    beta        beta g + (||g||/||g0||) v     its step since (the library's, up to rounding: ``library``)
    betaonly    beta g                        the rescaling along g, no v
    ermbetween  g                             plain ERM steps between the full ones
    looksam07   g + 0.7 (||g||/||v||) v       LookSAM's own form, alpha = 0.7
    randv       g + (||g||/||g0||) r          r: a random Gaussian direction of ||v||, drawn at each full step
    library     whatever tsam_fast's tilt_every does (no patch)

and the references ``erm``, ``sam``, ``tsam`` (the study's methods). One JSON line per run (``--out``).
``--report FILE...`` trains nothing: it pairs by (model, seed) the runs of these files and of the study's
``.runs.jsonl`` logs made with the same options (``tsam_t1_every3`` there is ``every3`` here; ``FILE::A=B``
calls that file's method A B) and prints each method's test-accuracy difference to TSAM and to SAM, final and
best-val, and its noisy-label fit, mean ± std over the seeds.

    PYTHONPATH=. python -P studies/periodic_tilt_ablation.py --methods tsam,sam,plain,beta --seeds 0,1,2,3 \\
        --models cnn --fit-size 3000 --epochs 20 --out ablation.jsonl
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import json
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent / "bench", HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import generalization as study  # noqa: E402
from generalization_data import load_split  # noqa: E402
from generalization_train import Method, train_one  # noqa: E402

# name -> (the plain gradient times beta?, how v is scaled: "norm" ||g||/||g0||, "looksam" ||g||/||v||, "none"; a)
FORMS = {"plain": (False, "norm", 1.0), "beta": (True, "norm", 1.0), "betaonly": (True, "none", 0.0),
         "ermbetween": (False, "none", 0.0), "looksam07": (False, "looksam", 0.7), "randv": (False, "norm", 1.0)}


def patch(name: str) -> None:
    """Replace the engine's periodic moves by form ``name`` (in this process)."""
    from tsam_fast.engine.moves import periodic
    along, scale, a = FORMS[name]

    def cache_correction(step):
        dots = [periodic._dot(t.bucket.grad, t.bucket.cache) for t in step.targets]
        beta = step.reduce({"dot": dots})[1]["dot"] / step.num.clamp_min(step.g0_sqnorm, 1e-30)
        for t in step.targets:
            t.bucket.cache.mul_(-step.to_bucket(beta, t.bucket)).add_(t.bucket.grad)
        vsq = step.reduce({"v": [periodic._dot(t.bucket.cache, t.bucket.cache) for t in step.targets]})[1]["v"]
        if name == "randv":  # v's norm, a random direction (one process: the buckets' draws are independent)
            gen = torch.Generator().manual_seed(step.seed * 1_000_003 + step.k)
            noise = [torch.randn(t.bucket.cache.shape, generator=gen, dtype=t.bucket.cache.dtype) for t in step.targets]
            rsq = sum(float(n.double().pow(2).sum()) for n in noise)
            for t, n in zip(step.targets, noise):
                t.bucket.cache.copy_(n * math.sqrt(vsq / rsq))
        step.correction = (step.g0_sqnorm, beta, vsq)

    def after_reusing_correction(step, ev, loss):
        g0sq, beta, vsq = step.session.correction
        loss, totals = step.reduce({"grad": step.grad_parts()}, loss)
        step.losses.append(loss)
        c = {"norm": a * math.sqrt(totals["grad"] / max(g0sq, 1e-30)),
             "looksam": a * math.sqrt(totals["grad"] / max(vsq, 1e-30)), "none": 0.0}[scale]
        for t in step.targets:
            if along:
                t.bucket.grad.mul_(beta)
            if c:
                t.bucket.grad.add_(t.bucket.cache, alpha=c)
        step.guard.after_samples(clipped=False)

    periodic.cache_correction = cache_correction
    periodic.after_reusing_correction = after_reusing_correction


_WORKER: dict = {}


def init_worker(split, args) -> None:
    torch.set_num_threads(1)
    _WORKER.update(split=split, args=args)


def work(name: str, model: str, seed: int, every: int) -> dict:
    args = _WORKER["args"]
    refs = {"erm": Method("erm", "ERM", "erm", "same_epochs"), "sam": Method("sam", "SAM", "sam", "same_epochs"),
            "tsam": Method("tsam", "TSAM", "tsam", "same_epochs", tilt=args.tilts[0], radius=args.radius)}
    if name in refs:
        method = refs[name]
    else:
        if name != "library":
            patch(name)
        method = Method(name, name, "tsam", "efficient", tilt=args.tilts[0], radius=args.radius,
                        options=(("tilt_every", every),))
    r = train_one(method, model, _WORKER["split"], args.noise[0], seed, args)
    keep = ("model", "method", "seed", "noise", "test_acc", "test_acc_selected", "train_acc_noisy", "sharpness",
            "train_s", "passes")
    return dict({k: r[k] for k in keep}, every=every)


def report(paths) -> str:
    """Paired differences (points) to TSAM and SAM of every method in the JSON-lines files ``paths``."""
    runs = {}
    for path in paths:
        path, _, rename = str(path).partition("::")
        rename = dict([rename.split("=")]) if rename else {}
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if "method" not in r or r.get("table", "efficient") not in ("same_epochs", "efficient"):
                continue
            name = r["method"]
            name = {"tsam_t1": "tsam"}.get(name, name[len("tsam_t1_"):] if name.startswith("tsam_t1_") else name)
            runs[(r["model"], rename.get(name, name), r["seed"])] = r
    out = []
    for model in sorted({k[0] for k in runs}):
        names = sorted({k[1] for k in runs if k[0] == model}, key=lambda n: (n not in ("erm", "sam", "tsam"), n))
        out += [f"\n{model}: test accuracy %, mean ± std over seeds; difference in points, paired by seed",
                "| method | seeds | final | best-val | Δ vs TSAM final | Δ vs TSAM best-val | Δ vs SAM final | "
                "Δ vs SAM best-val | noisy fit % |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            seeds = sorted(s for (m, n, s) in runs if m == model and n == name)
            cells = []
            for key in ("test_acc", "test_acc_selected"):
                v = [100 * runs[(model, name, s)][key] for s in seeds]
                cells.append(f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}")
            for ref in ("tsam", "sam"):
                for key in ("test_acc", "test_acc_selected"):
                    both = [s for s in seeds if (model, ref, s) in runs]
                    d = [100 * (runs[(model, name, s)][key] - runs[(model, ref, s)][key]) for s in both]
                    cells.append("—" if name == ref or len(d) < 2 else
                                 f"{statistics.fmean(d):+.2f} ± {statistics.stdev(d):.2f}")
            fit = [100 * runs[(model, name, s)]["train_acc_noisy"] for s in seeds]
            cells.append(f"{statistics.fmean(fit):.1f}")
            out.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="tsam,sam,plain,beta", help=f"of erm, sam, tsam, library, {', '.join(FORMS)}")
    p.add_argument("--models", default="cnn")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, help="JSON lines, appended")
    p.add_argument("--report", nargs="+", help="train nothing: the paired differences of these runs (FILE or "
                                                "FILE::A=B, its method A called B)")
    p.add_argument("study", nargs="*", help="after --: options of studies/generalization.py (the same for every "
                                            "run), e.g. -- --fit-size 3000 --epochs 20 --noise 0.4 --tilts 1")
    a = p.parse_args(argv)
    if a.report:
        print(report(a.report))
        return
    if a.out is None:
        p.error("--out is needed to train")
    args = study.parse_args(["--preset", "full", "--no-save", "--no-plot", "--noise", "0.4", "--rel-noise", "0.4",
                             "--tilts", "1", "--fit-size", "3000"] + a.study)
    split = load_split(args.data, args.test_size, args.val_size, args.split_seed, args.fit_size)
    jobs = [(name, model, int(s), a.every) for s in a.seeds.split(",") for model in a.models.split(",")
            for name in a.methods.split(",")]
    t0 = time.perf_counter()
    with futures.ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=init_worker, initargs=(split, args)) as pool:
        for fut in futures.as_completed([pool.submit(work, *job) for job in jobs]):
            r = fut.result()
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{r['model']} {r['method']} k={r['every']} seed={r['seed']}: final {100 * r['test_acc']:.2f} "
                  f"best-val {100 * r['test_acc_selected']:.2f} noisy fit {100 * r['train_acc_noisy']:.1f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
