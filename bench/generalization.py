#!/usr/bin/env python3
"""Does TSAM generalize better? ERM, SAM and TSAM on real data with label noise, same protocol for all.

Data: scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``: 1797 images, 10
classes, no download), pixels scaled to [0, 1]. Splits, all stratified on the clean labels and fixed by
``--split-seed`` (the same for every seed and method): first train/test (70/30, ``--test-size``), then a
validation split carved out of the TRAINING part (15% of it, ``--val-size``). The model trains on the
remaining training examples only ("fit" set; quick preset: 1068 fit / 189 validation / 540 test).

Label noise, symmetric: with probability p a label is replaced by a uniformly random *other* class.
Exactly: for run seed s and level p, ``symmetric_noise(y, p, noise_seed(s, p))`` draws the noisy labels of
the whole training part (fit + validation, in the order of the train/test split) in one go, and the fit
and validation labels are its two subsets, so validation labels are as noisy as the training labels
(realistic: a practitioner only has noisy labels) and come from the same per-seed noise process. The
test labels stay clean.

Model: an MLP 64-128-128-10 with ReLU (``--hidden``), initialised from the run seed, so every method
starts from the same weights and sees the same mini-batch order for a given seed.

Methods (all on SGD with momentum, the same learning-rate schedule, batches and epochs):

    erm          the base optimizer alone (1 forward/backward per step)
    sam          tsam_fast.TSAM(num_samples=1, sampler="ascent", start="none"): one normalized ascent
                 step of length rho, exactly SAM (tests/test_optimizer.py::test_single_ascent_sample_is_sam;
                 2 forward/backward per step)
    tsam_t<t>    tsam_fast.TSAM(tilt=t, num_samples=s, sampler="ascent", start="gaussian") with the
                 library's defaults for everything else (2*s forward/backward per step)

Model selection, the same rule for every method: after every epoch the model is evaluated (full batch,
``torch.no_grad``, eval mode) on the validation set with its NOISY labels and on the clean test set. Two
test accuracies are reported per run: "final" (after the last epoch) and "best-val epoch" (the test
accuracy after the epoch with the highest noisy-validation accuracy, ties -> the earliest epoch; epochs
are counted from 1). The test set never influences the choice.

Two comparisons:

1. Same epochs: every method takes the same optimizer steps on the same batches (TSAM does 2*s
   forward/backward passes per step, SAM 2, ERM 1).
2. Equal compute: ERM and SAM trained for (2*s) and s times the epochs (``erm_x6``, ``sam_x3`` for
   s = 3; the cosine schedule stretched to the longer run), so all three make the same number of
   forward/backward passes over batches of the same size. The passes are counted in the closures and
   checked to be equal (the per-epoch evaluations are forward-only and not counted). The final-epoch
   column mixes compute with training length (the longer runs memorise more of the noisy labels); the
   best-val column removes that confound, since every run may stop at its best validation epoch.

Hyperparameter budget: NONE, for every method. One fixed setting, chosen before any run and the same
for all methods: SGD lr 0.05 with cosine decay to 0 over the run, momentum 0.9, weight decay 5e-4,
batch 64; SAM rho = 0.05 (the usual default); TSAM rho = 0.05, start = "gaussian" with radius 1.0 and
noise_scale 1.0 (tsam_fast's defaults), s = 3. The validation split picks only the epoch (the rule
above), never a hyperparameter; nothing was tuned on the validation or the test set; the tilts t in
{0, 1, 5, 20} are all reported, not the best one picked.

Measured per run: per-epoch curves of validation accuracy (noisy labels) and test accuracy (clean),
rounded to 4 digits; the final and the best-val-epoch test accuracy and the selected epoch; at the
final weights: training loss and accuracy on the NOISY fit labels (how much of the noise was memorised)
and accuracy on the clean fit labels, and the sharpness (``tsam_fast.metrics.sharpness`` on the noisy
fit set: mean and max rise of the loss under 20 Gaussian perturbations of relative scale 0.05, the same
perturbation seed for every run; measured on the FINAL weights, not the selected epoch's); the number
of forward/backward passes and the wall time; for TSAM also how far the tilt moves the sample weights
away from uniform (the largest softmax(t*L) weight and the spread of the samples' losses, averaged over
the last epoch). Tables report the mean and the standard deviation over seeds, and each method's
accuracy difference to ERM paired by seed (same init, noisy labels and batches), final and best-val.

Outputs: markdown tables on stdout, ``bench/results/generalization-<preset>-<UTC time>.json`` and a
copy ``generalization-latest.json`` (number lists written on one line each), a PNG plot of test
accuracy against the noise level (error bars: std over seeds; left: same epochs, final; right: equal
compute, best-val epoch) next to them. ``--preset quick`` (default) takes about 4 minutes on 2 CPU
cores (one torch thread).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):  # the working tree's tsam_fast and bench/, also when run as a script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import record as record_io  # noqa: E402
from record import cpu_name, load_average, versions  # noqa: E402
from tsam_fast import TSAM  # noqa: E402
from tsam_fast.metrics import sharpness  # noqa: E402

RESULTS_DIR = HERE / "results"
NUM_CLASSES = 10

PRESETS = {
    # seeds, epochs of the same-epochs table, training-label noise levels, TSAM tilts
    "smoke": dict(seeds=1, epochs=3, noise=(0.0, 0.4), tilts=(0.0, 5.0)),
    "quick": dict(seeds=3, epochs=40, noise=(0.0, 0.2, 0.4), tilts=(0.0, 1.0, 5.0, 20.0)),
    "full": dict(seeds=8, epochs=60, noise=(0.0, 0.2, 0.4), tilts=(0.0, 1.0, 5.0, 20.0)),
}


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Split:
    x_train: torch.Tensor  # the fit set: what the model trains on
    y_train: torch.Tensor  # clean
    x_val: torch.Tensor
    y_val: torch.Tensor  # clean (the runs use noisy copies, see noisy_labels)
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean
    y_pool: torch.Tensor  # clean labels of the whole training part (fit + validation), split order
    fit_idx: torch.Tensor  # positions of the fit examples in y_pool
    val_idx: torch.Tensor  # positions of the validation examples in y_pool


def load_split(test_size: float, val_size: float, split_seed: int) -> Split:
    """load_digits, pixels / 16; a stratified train/test split, then a stratified validation split carved
    out of the training part (``val_size`` of it), both fixed by ``split_seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit(f"bench/generalization.py needs scikit-learn ({e}): python3 -m pip install scikit-learn")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(list(range(len(y))), test_size=test_size, stratify=digits.target,
                                   random_state=split_seed)
    train, test = torch.tensor(train), torch.tensor(test)
    fit, val = train_test_split(list(range(len(train))), test_size=val_size, stratify=y[train].numpy(),
                                random_state=split_seed)
    fit, val = torch.tensor(fit), torch.tensor(val)
    x_pool, y_pool = x[train], y[train]
    return Split(x_pool[fit], y_pool[fit], x_pool[val], y_pool[val], x[test], y[test], y_pool, fit, val)


def symmetric_noise(y: torch.Tensor, p: float, seed: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """With probability p, replace each label by a uniformly random OTHER class: (y + U{1..C-1}) mod C."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < p
    shift = torch.randint(1, num_classes, (len(y),), generator=g)
    return torch.where(flip, (y + shift) % num_classes, y)


def noise_seed(seed: int, p: float) -> int:
    return 1_000_003 * seed + round(1000 * p) + 17


def noisy_labels(split: Split, p: float, seed: int):
    """The run's noisy (fit, validation) labels: ONE draw of ``symmetric_noise`` with ``noise_seed(seed, p)``
    over the whole training part (fit + validation, in ``y_pool`` order), then its two subsets."""
    pool = symmetric_noise(split.y_pool, p, noise_seed(seed, p))
    return pool[split.fit_idx], pool[split.val_idx]


# -- methods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str  # "erm", "sam" or "tsam"
    tilt: float = 0.0
    epoch_factor: int = 1  # multiple of the preset's epochs (equal-compute rows)


def calls_per_step(method: Method, num_samples: int) -> int:
    """Forward/backward passes per optimizer step (README: 2*s for ``ascent``)."""
    return {"erm": 1, "sam": 2, "tsam": 2 * num_samples}[method.kind]


def tilt_key(t: float) -> str:
    return f"tsam_t{t:g}".replace(".", "p")


def methods_for(tilts: Sequence[float], num_samples: int) -> Dict[str, List[Method]]:
    tsam_calls = 2 * num_samples
    same = [Method("erm", "ERM", "erm"), Method("sam", "SAM", "sam")]
    same += [Method(tilt_key(t), f"TSAM t={t:g}", "tsam", tilt=t) for t in tilts]
    equal = [Method(f"erm_x{tsam_calls}", f"ERM, {tsam_calls}x epochs", "erm", epoch_factor=tsam_calls)]
    if tsam_calls % 2 == 0:
        equal.append(Method(f"sam_x{tsam_calls // 2}", f"SAM, {tsam_calls // 2}x epochs", "sam",
                            epoch_factor=tsam_calls // 2))
    return dict(same_epochs=same, equal_compute=equal)


def make_model(hidden: Sequence[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers, width = [], 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


def make_optimizer(method: Method, model: nn.Module, args, seed: int):
    sgd = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if method.kind == "erm":
        return torch.optim.SGD(model.parameters(), **sgd)
    if method.kind == "sam":
        return TSAM(model.parameters(), torch.optim.SGD, num_samples=1, sampler="ascent", start="none",
                    rho=args.rho, tilt=0.0, seed=seed, backend="auto", **sgd)
    return TSAM(model.parameters(), torch.optim.SGD, tilt=method.tilt, num_samples=args.num_samples,
                sampler="ascent", rho=args.rho, radius=args.radius, noise_scale=args.noise_scale, seed=seed,
                backend="auto", **sgd)


# -- one run ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    out = model(x)
    model.train(was_training)
    return dict(loss=F.cross_entropy(out, y).item(), acc=(out.argmax(1) == y).float().mean().item())


def select_epoch(val_acc: Sequence[float]) -> int:
    """Index (from 0) of the epoch with the highest validation accuracy; ties -> the earliest."""
    return max(range(len(val_acc)), key=lambda i: (val_acc[i], -i))


def train_one(method: Method, split: Split, noise: float, seed: int, args) -> dict:
    """Train ``method`` from the seed's initialisation on the seed's noisy fit labels; evaluate on the
    noisy validation labels and the clean test set after every epoch; final and best-val metrics."""
    y_noisy, y_val_noisy = noisy_labels(split, noise, seed)
    model = make_model(args.hidden, seed)
    opt = make_optimizer(method, model, args, seed)
    epochs = args.epochs * method.epoch_factor
    n, bs = len(y_noisy), args.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total_steps = epochs * steps_per_epoch
    order = torch.Generator().manual_seed(seed)  # the same batch order for every method of a seed
    passes = 0
    xb = yb = None

    def closure():
        nonlocal passes
        passes += 1
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    step = 0
    # TSAM's tilt at work, over the last epoch: the largest softmax(t*L) weight (1/s = inert) and the
    # spread max_j L_j - min_j L_j of the samples' losses (device sums, read once at the end)
    top_weight = torch.zeros(())
    spread = torch.zeros(())
    val_curve: List[float] = []  # per epoch, noisy validation labels
    test_curve: List[float] = []  # per epoch, clean test labels
    eval_s = 0.0
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            xb, yb = split.x_train[idx], y_noisy[idx]
            lr = 0.5 * args.lr * (1.0 + math.cos(math.pi * step / total_steps))  # cosine to 0
            for group in opt.param_groups:
                group["lr"] = lr
            if method.kind == "erm":
                opt.zero_grad()
                closure()
                opt.step()
            else:
                opt.step(closure)
                if method.kind == "tsam" and epoch == epochs - 1:
                    top_weight += opt.last_weights.max()
                    spread += opt.last_losses.max() - opt.last_losses.min()
            step += 1
        t_eval = time.perf_counter()
        val_curve.append(evaluate(model, split.x_val, y_val_noisy)["acc"])
        test_curve.append(evaluate(model, split.x_test, split.y_test)["acc"])
        eval_s += time.perf_counter() - t_eval
    train_s = time.perf_counter() - t0 - eval_s
    expected = total_steps * calls_per_step(method, args.num_samples)
    if passes != expected:
        raise RuntimeError(f"{method.key}: {passes} forward/backward passes, expected {expected}")

    best = select_epoch(val_curve)
    test = evaluate(model, split.x_test, split.y_test)
    noisy = evaluate(model, split.x_train, y_noisy)
    clean = evaluate(model, split.x_train, split.y_train)
    sharp = sharpness(model, F.cross_entropy, [(split.x_train, y_noisy)], eps=args.sharpness_eps,
                      n=args.sharpness_n, seed=args.sharpness_seed)
    record = dict(method=method.key, kind=method.kind, noise=noise, seed=seed, epochs=epochs, steps=total_steps,
                  passes=passes, calls_per_step=calls_per_step(method, args.num_samples),
                  test_acc=test["acc"], test_loss=test["loss"],
                  test_acc_selected=test_curve[best], selected_epoch=best + 1, val_acc_selected=val_curve[best],
                  val_acc_final=val_curve[-1],
                  train_loss=noisy["loss"], train_acc_noisy=noisy["acc"], train_acc_clean=clean["acc"],
                  labels_flipped=float((y_noisy != split.y_train).float().mean()),
                  val_labels_flipped=float((y_val_noisy != split.y_val).float().mean()),
                  sharpness=dict(mean=sharp.mean, max=sharp.max, std=sharp.std, base_loss=sharp.base_loss),
                  curves=dict(val_acc=[round(v, 4) for v in val_curve], test_acc=[round(v, 4) for v in test_curve]),
                  train_s=train_s, eval_s=eval_s, wall_s=time.perf_counter() - t0)
    if isinstance(opt, TSAM):
        record["backend"] = opt.backend_name("cpu")
    if method.kind == "tsam":
        record["tilt_top_weight"] = top_weight.item() / steps_per_epoch
        record["sample_loss_spread"] = spread.item() / steps_per_epoch
    return record


# -- summaries ----------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values))


def summarize(runs: List[dict], methods: Dict[str, List[Method]], noise_levels: Sequence[float]) -> dict:
    """Per table, noise level and method: mean and std over seeds, and the accuracy difference to the
    table's ERM row paired by seed, at the final epoch and at the best-validation epoch."""
    by = {(r["method"], r["noise"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = {}
    tsam_rows = [m for m in methods["same_epochs"] if m.kind == "tsam"]
    tables = (("same_epochs", methods["same_epochs"]), ("equal_compute", methods["equal_compute"] + tsam_rows))
    for table, rows in tables:
        erm = next(m for m in rows if m.kind == "erm")
        entries = []
        for p in noise_levels:
            for m in rows:
                rs = [by[(m.key, p, s)] for s in seeds]
                delta = [by[(m.key, p, s)]["test_acc"] - by[(erm.key, p, s)]["test_acc"] for s in seeds]
                delta_sel = [by[(m.key, p, s)]["test_acc_selected"] - by[(erm.key, p, s)]["test_acc_selected"]
                             for s in seeds]
                entries.append(dict(
                    method=m.key, label=m.label, noise=p, epochs=rs[0]["epochs"], passes=rs[0]["passes"],
                    calls_per_step=rs[0]["calls_per_step"],
                    test_acc=_mean_std([r["test_acc"] for r in rs]),
                    delta_vs_erm=_mean_std(delta), erm=erm.key,
                    test_acc_selected=_mean_std([r["test_acc_selected"] for r in rs]),
                    delta_vs_erm_selected=_mean_std(delta_sel),
                    selected_epoch=dict(_mean_std([r["selected_epoch"] for r in rs]),
                                        min=min(r["selected_epoch"] for r in rs),
                                        max=max(r["selected_epoch"] for r in rs)),
                    val_acc_selected=_mean_std([r["val_acc_selected"] for r in rs]),
                    train_loss=_mean_std([r["train_loss"] for r in rs]),
                    train_acc_noisy=_mean_std([r["train_acc_noisy"] for r in rs]),
                    train_acc_clean=_mean_std([r["train_acc_clean"] for r in rs]),
                    sharpness_mean=_mean_std([r["sharpness"]["mean"] for r in rs]),
                    sharpness_max=_mean_std([r["sharpness"]["max"] for r in rs]),
                    wall_s=_mean_std([r["wall_s"] for r in rs]),
                    tilt_top_weight=_mean_std([r["tilt_top_weight"] for r in rs]) if m.kind == "tsam" else None,
                    sample_loss_spread=_mean_std([r["sample_loss_spread"] for r in rs]) if m.kind == "tsam" else None))
        out[table] = entries
    return out


def _pm(stat: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def equal_compute_note(record: dict) -> str:
    """The caveat under the equal-compute table: what the final column mixes, what the best-val column
    removes, where the longer runs' validation accuracy peaked, and how coarse the selection is."""
    entries = record["summary"]["equal_compute"]
    stops, latest = [], 0.0  # the longer runs (ERM, SAM): mean best-val epoch per noise level
    for key in dict.fromkeys(e["method"] for e in entries if not e["method"].startswith("tsam")):
        rows = [e for e in entries if e["method"] == key]
        stops.append(f"{rows[0]['label']} at epoch " + " / ".join(f"{e['selected_epoch']['mean']:.0f}" for e in rows)
                     + f" of {rows[0]['epochs']}")
        latest = max([latest] + [e["selected_epoch"]["max"] / e["epochs"] for e in rows])
    early = (f", i.e. on every seed the selected model comes from the first {math.ceil(100 * latest)}% of the long "
             "run (its stretched learning rate still high): by this rule most of the extra compute goes unused"
             if latest <= 0.5 else "")
    noise = " / ".join(f"{100 * p:.0f}" for p in record["config"]["noise"])
    n_val = record["data"]["val"]
    return ("ERM and SAM reach equal passes by training longer (the same cosine schedule stretched over the longer "
            "run): under label noise that also means memorising the noisy labels (see train acc (noisy)), so the "
            "FINAL column mixes compute with training length and is not evidence for or against any method. The "
            "best-val column removes that confound: every run, long or short, is scored at its own best "
            "noisy-validation epoch, so a longer run can no longer lose by overtraining. Mean best-val epoch at "
            f"{noise}% noise: " + "; ".join(stops) + early + ". Read the best-val "
            f"column with its noise: {n_val} validation examples with noisy labels (one example = "
            f"{100 / n_val:.2f} pp of validation accuracy), ties go to the earliest epoch, and the selected "
            "epoch's test accuracy can be below the final one; compare the paired Δ with its std (line below "
            "the table).")


def _signed(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:+.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def beyond_seed_noise(entries: List[dict]) -> str:
    """One line: the best-val paired Δ vs ERM whose |mean| exceeds the std of the paired differences over
    seeds (a crude bar; with 3 seeds it is roughly a t-statistic above 1.7)."""
    others = [e for e in entries if e["method"] != e["erm"]]
    if not others:
        return ""
    if others[0]["delta_vs_erm_selected"]["n"] < 2:
        return "One seed: no seed-to-seed spread to compare the best-val differences with."
    big = [f"{e['label']} at {100 * e['noise']:.0f}% ({_signed(e['delta_vs_erm_selected'])})" for e in others
           if abs(e["delta_vs_erm_selected"]["mean"]) > e["delta_vs_erm_selected"]["std"]]
    head = f"Best-val Δ vs ERM with |mean| > std of the paired differences ({len(big)} of {len(others)}): "
    return head + ("; ".join(big) if big else "none") + "; all others are within seed-to-seed noise."


def markdown(record: dict) -> str:
    cfg = record["config"]
    data = record["data"]
    lines = [f"## Generalization on load_digits ({data['train']} train / {data['val']} validation / "
             f"{data['test']} test), preset `{cfg['preset']}`, seeds {cfg['seeds']}",
             "",
             f"Hyperparameters (fixed, NO search, identical for every method): {record['hyperparameter_budget']}",
             "",
             "Mean ± std over seeds. Test acc % (final): after the last epoch. Test acc % (best-val epoch): "
             "after the epoch with the highest accuracy on the NOISY validation labels (ties: earliest), the "
             "same rule for every method; best-val epoch: its mean over seeds [min–max]. Δ vs ERM: "
             "test-accuracy difference to the table's ERM row, paired by seed (same init, noisy labels and "
             "batches), for each of the two. Train loss/acc on the noisy training labels, at the final "
             "weights. Sharpness, also at the FINAL weights (not the selected epoch's): mean (max) loss rise "
             f"under {cfg['sharpness_n']} Gaussian perturbations of relative scale {cfg['sharpness_eps']:g} "
             "on the noisy training set.",
             ""]
    titles = dict(same_epochs=f"### Same epochs ({cfg['epochs']} epochs for every method)",
                  equal_compute="### Equal compute (ERM and SAM given as many forward/backward passes as TSAM)")
    notes = dict(
        same_epochs=f"Top weight: TSAM's largest softmax(t·L) weight, averaged over the last epoch "
                    f"(1/{cfg['num_samples']} = {1 / cfg['num_samples']:.3f}: the tilt changes nothing); "
                    "spread: max − min of the samples' losses in a step, same average.",
        equal_compute=equal_compute_note(record))
    header = ("| noise | method | epochs | fwd/bwd passes | test acc % (final) | Δ vs ERM final (pp) | "
              "test acc % (best-val epoch) | Δ vs ERM best-val (pp) | best-val epoch | train loss | "
              "train acc (noisy) % | sharpness mean (max) | top weight (spread) | wall s |")
    for table in ("same_epochs", "equal_compute"):
        entries = record["summary"][table]
        lines += [titles[table], "", notes[table], "", header, "|---|---|" + "---:|" * 12]
        for e in entries:
            is_erm = e["method"] == e["erm"]
            delta = "—" if is_erm else _signed(e["delta_vs_erm"])
            delta_sel = "—" if is_erm else _signed(e["delta_vs_erm_selected"])
            ep = e["selected_epoch"]
            tilt = "—" if e["tilt_top_weight"] is None else \
                f"{e['tilt_top_weight']['mean']:.3f} ({e['sample_loss_spread']['mean']:.3f})"
            lines.append(
                f"| {100 * e['noise']:.0f}% | {e['label']} | {e['epochs']} | {e['passes']} | "
                f"{_pm(e['test_acc'], 100)} | {delta} | {_pm(e['test_acc_selected'], 100)} | {delta_sel} | "
                f"{ep['mean']:.1f} [{ep['min']}–{ep['max']}] | {_pm(e['train_loss'], 1, 3)} | "
                f"{_pm(e['train_acc_noisy'], 100)} | "
                f"{e['sharpness_mean']['mean']:.3f} ({e['sharpness_max']['mean']:.3f}) | {tilt} | "
                f"{e['wall_s']['mean']:.1f} |")
        lines += ["", beyond_seed_noise(entries), ""]
    # compact view: accuracy per method and noise level, final and best-val epoch
    noise = cfg["noise"]
    for key, what in (("test_acc", "final epoch"), ("test_acc_selected", "best-validation epoch")):
        lines += [f"### Test accuracy % at the {what} (mean ± std over seeds)", "",
                  "| method | " + " | ".join(f"noise {100 * p:.0f}%" for p in noise) + " |",
                  "|---|" + "---:|" * len(noise)]
        seen = set()
        for table in ("same_epochs", "equal_compute"):
            for e in record["summary"][table]:
                if e["method"] in seen:
                    continue
                seen.add(e["method"])
                cells = [_pm(x[key], 100) for p in noise for x in record["summary"][table]
                         if x["method"] == e["method"] and x["noise"] == p]
                lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")



# -- output -------------------------------------------------------------------------------------


def plot(record: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    tables = [("same_epochs", "test_acc", f"same epochs ({record['config']['epochs']}): final-epoch test accuracy"),
              ("equal_compute", "test_acc_selected", "equal forward/backward passes (ERM, SAM: more epochs):\n"
                                                     "test accuracy at the best noisy-validation epoch")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (table, acc, title) in zip(axes, tables):
        entries = record["summary"][table]
        keys = list(dict.fromkeys(e["method"] for e in entries))
        for i, key in enumerate(keys):
            rows = [e for e in entries if e["method"] == key]
            offset = (i - (len(keys) - 1) / 2) * 0.6
            ax.errorbar([100 * e["noise"] + offset for e in rows], [100 * e[acc]["mean"] for e in rows],
                        yerr=[100 * e[acc]["std"] for e in rows], marker="o", capsize=3,
                        linestyle="--" if key.startswith("tsam") else "-", label=rows[0]["label"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("symmetric label noise on the training and validation labels (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    fig.suptitle(f"MLP on load_digits, {len(record['config']['seeds'])} seeds, preset {record['config']['preset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


_NUMBER_LIST = re.compile(r"\[\s*-?\d[\d.eE+-]*(?:\s*,\s*-?\d[\d.eE+-]*)*\s*\]")


def compact_number_lists(text: str) -> str:
    """``json.dumps(indent=...)`` puts every list element on its own line; put lists of plain numbers (the
    per-epoch curves, seeds, noise levels) on one line each. The parsed JSON is unchanged."""
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(0)[1:-1].split(",")) + "]", text)


def save(record: dict, out_dir: Path, make_plot: bool) -> List[Path]:
    written = record_io.save(record, out_dir, f"generalization-{record['config']['preset']}-{record['stamp']}",
                             "generalization-latest", plot if make_plot else None)
    for path in written:
        if path.suffix == ".json":
            path.write_text(compact_number_lists(path.read_text()))
    record["files"] = [str(p) for p in written]
    return written


class Progress:
    """Runs done, on stderr: tqdm's bar when installed, otherwise a counter line (rewritten in place on a
    terminal, one line per run in a log)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="run", file=sys.stderr)
            except ImportError:
                pass

    def update(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description(text, refresh=False)
            self._bar.update(1)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        line = f"[{self.done:>{len(str(self.total))}}/{self.total}] {text:<40} {elapsed:5.0f} s, eta {eta:4.0f} s"
        end = "\r" if sys.stderr.isatty() and self.done < self.total else "\n"
        sys.stderr.write(line + end)
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- main ---------------------------------------------------------------------------------------


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/generalization.py",
        description="Test accuracy, training loss and sharpness of ERM, SAM and TSAM (several tilts) for an MLP "
                    "on scikit-learn's load_digits with symmetric label noise on the training and validation "
                    "labels, over several seeds, at equal epochs and at equal forward/backward passes. Test "
                    "accuracy is reported after the final epoch and at the epoch with the best noisy-validation "
                    "accuracy (the same selection rule for every method). One fixed hyperparameter setting for "
                    "all methods (no search). Writes markdown to stdout and JSON + PNG to bench/results/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                   help="quick: 3 seeds x 40 epochs (about 4 min on 2 cores); full: 8 seeds x 60 epochs; "
                        "smoke: 1 seed, 2 noise levels, 3 epochs (tests)")
    p.add_argument("--seeds", type=_ints, default=None,
                   help="comma-separated run seeds (default: 0..n-1 of the preset)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the same-epochs table (default: the preset's)")
    p.add_argument("--noise", type=_floats, default=None,
                   help="comma-separated symmetric label-noise levels, applied to the training and validation "
                        "labels, never the test labels (default: the preset's)")
    p.add_argument("--tilts", type=_floats, default=None, help="comma-separated TSAM tilts (default: the preset's)")
    g = p.add_argument_group("hyperparameters (the same for every method; change them for every method or none)")
    g.add_argument("--hidden", type=_ints, default=[128, 128], help="hidden widths of the MLP")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate (cosine decay to 0)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--rho", type=float, default=0.05, help="ascent step length of SAM and TSAM")
    g.add_argument("--num-samples", type=int, default=3, help="TSAM's s")
    g.add_argument("--radius", type=float, default=1.0, help="TSAM's random-start radius")
    g.add_argument("--noise-scale", type=float, default=1.0, help="TSAM's Gaussian start scale")
    g = p.add_argument_group("evaluation")
    g.add_argument("--test-size", type=float, default=0.3, help="fraction of load_digits held out for testing")
    g.add_argument("--val-size", type=float, default=0.15,
                   help="fraction of the TRAINING part held out for validation (stratified on the clean labels; "
                        "its labels get the same noise as the training labels). The validation accuracy after "
                        "each epoch picks the epoch whose test accuracy is reported as best-val; the model never "
                        "trains on it")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the stratified train/test and train/validation splits")
    g.add_argument("--sharpness-eps", type=float, default=0.05,
                   help="relative perturbation scale of the sharpness, measured on the final weights")
    g.add_argument("--sharpness-n", type=int, default=20, help="perturbations per sharpness estimate")
    g.add_argument("--sharpness-seed", type=int, default=0, help="perturbation seed (the same for every run)")
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=int, default=1, help="torch threads (restored afterwards)")
    g.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    g.add_argument("--no-plot", action="store_true", help="no PNG")
    g.add_argument("--no-save", action="store_true", help="write nothing to --out-dir")
    g.add_argument("--no-progress", action="store_true", help="no progress counter on stderr")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.seeds = args.seeds if args.seeds is not None else list(range(preset["seeds"]))
    args.epochs = args.epochs if args.epochs is not None else preset["epochs"]
    args.noise = args.noise if args.noise is not None else list(preset["noise"])
    args.tilts = args.tilts if args.tilts is not None else list(preset["tilts"])
    for name, value, ok in (("--epochs", args.epochs, args.epochs >= 1), ("--seeds", args.seeds, len(args.seeds) >= 1),
                            ("--noise", args.noise, args.noise and all(0 <= v < 1 for v in args.noise)),
                            ("--test-size", args.test_size, 0 < args.test_size < 1),
                            ("--val-size", args.val_size, 0 < args.val_size < 1),
                            ("--batch-size", args.batch_size, args.batch_size >= 1),
                            ("--num-samples", args.num_samples, args.num_samples >= 1)):
        if not ok:
            p.error(f"invalid {name} {value!r}")
    return args


def budget_text(args) -> str:
    return (f"SGD lr {args.lr:g} (cosine to 0), momentum {args.momentum:g}, weight decay {args.weight_decay:g}, "
            f"batch {args.batch_size}, MLP 64-{'-'.join(map(str, args.hidden))}-10 ReLU; SAM rho {args.rho:g}; "
            f"TSAM s={args.num_samples}, sampler ascent, rho {args.rho:g}, start gaussian radius {args.radius:g} "
            f"noise_scale {args.noise_scale:g}; {100 * args.val_size:g}% of the training part held out (noisy labels) "
            f"to pick the epoch only, same rule for all; no tuning")


def run(args: argparse.Namespace) -> dict:
    """Every (method, noise level, seed) run; returns the JSON record."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # also called in-process by the tests: leave torch as found


def _run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    start = _dt.datetime.now(_dt.timezone.utc)
    load_before = load_average()
    split = load_split(args.test_size, args.val_size, args.split_seed)
    methods = methods_for(args.tilts, args.num_samples)
    todo = [(m, p, s) for p in args.noise for s in args.seeds
            for m in methods["same_epochs"] + methods["equal_compute"]]
    progress = Progress(len(todo), enabled=not args.no_progress)
    runs = []
    try:
        for m, p, s in todo:
            runs.append(train_one(m, split, p, s, args))
            progress.update(f"{m.key} noise={p:g} seed={s}")
    finally:
        progress.close()
    config = dict(preset=args.preset, seeds=args.seeds, epochs=args.epochs, noise=args.noise, tilts=args.tilts,
                  hidden=args.hidden, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                  weight_decay=args.weight_decay, rho=args.rho, num_samples=args.num_samples, radius=args.radius,
                  noise_scale=args.noise_scale, sampler="ascent", start="gaussian", test_size=args.test_size,
                  val_size=args.val_size, selection="best noisy-validation accuracy, ties -> earliest epoch",
                  split_seed=args.split_seed, sharpness_eps=args.sharpness_eps, sharpness_n=args.sharpness_n,
                  sharpness_seed=args.sharpness_seed, threads=args.threads)
    return dict(
        benchmark="generalization", stamp=start.strftime("%Y%m%dT%H%M%S"), date=start.isoformat(timespec="seconds"),
        config=config, hyperparameter_budget=budget_text(args),
        methods={table: [asdict(m) for m in ms] for table, ms in methods.items()},
        data=dict(name="sklearn.datasets.load_digits", train=len(split.y_train), val=len(split.y_val),
                  test=len(split.y_test),
                  classes=NUM_CLASSES, features=split.x_train.shape[1]),
        host=dict(cpu=cpu_name(), cores=os.cpu_count(), torch_threads=args.threads),
        versions=versions(sklearn=sys.modules["sklearn"].__version__),
        runs=runs, summary=summarize(runs, methods, args.noise),
        wall_s=time.perf_counter() - t0, load_average=dict(before=load_before, after=load_average()))


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
