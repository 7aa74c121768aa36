"""The generalization study's methods, models and training: one run (``train_one``: a method from a seed's
initialisation on the seed's noisy labels, evaluated after every epoch), the wall-clock calibration of the
equal-time rows (``calibrate``), and the worker of the process pool that trains runs side by side.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from generalization_data import NUM_CLASSES, SIDE, Split, noisy_labels
from tsam_fast import TSAM
from tsam_fast.metrics import sharpness


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


# -- the worker of the process pool (--jobs) ------------------------------------------------------

_WORKER: dict = {}


def init_worker(split: Split, args) -> None:
    """A pool process: one torch thread, and the split and options every run of it uses."""
    torch.set_num_threads(1)
    _WORKER.update(split=split, args=args)


def work(method: Method, model_name: str, noise: float, seed: int) -> dict:
    """One run in a pool process (``init_worker`` first)."""
    return train_one(method, model_name, _WORKER["split"], noise, seed, _WORKER["args"])
