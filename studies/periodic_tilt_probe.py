#!/usr/bin/env python3
"""What the periodic tilt (``tilt_every``) keeps of TSAM's step, measured along a training run.

An instrument, not part of the library: it trains one model of the generalization study (its data, label
noise, model, SGD + cosine schedule and batch order) with TSAM(tilt_every=k) and, before every step, measures
at the current weights theta and batch B, with a probe copy of the model:

    g      the plain gradient of L_B at theta
    G, G'  two TSAM tilted gradients at theta on B (the study's TSAM, two independent noise draws)

and, after every full step, the cache the optimizer keeps: its own tilted gradient G0 (left in ``.grad``),
the plain gradient g0 of the same step, beta = G0.g0/||g0||^2 and v = G0 - beta g0. Per step it writes one
JSON line: beta and ||v||/||g|| of the fresh G (what a full step would cache here), cos(v, v') of the two
draws (how much of v is the random starts' noise), cos(cached v, fresh v) (how stale the cache is), and
for every candidate update u of a step between full ones, cos(u, G) and ||u||/||G|| against the fresh
tilted gradient and against the mean of the two draws (what TSAM's step would be on average).

Candidates (g: this step's plain gradient; g0, v, beta: the last full step's):

    erm       g
    plain     g + (||g||/||g0||) v              (tilt_every's step before 2026-12-04)
    beta      beta g + (||g||/||g0||) v         (keeps the tilt's rescaling along g0)
    looksam   g + a (||g||/||v||) v, a = 0.7    (LookSAM's own form)
    stale     (||g||/||g0||) G0                 (the last tilted gradient, rescaled)

    PYTHONPATH=. python -P studies/periodic_tilt_probe.py --model cnn --epochs 4 --out probe.jsonl
    PYTHONPATH=. python -P studies/periodic_tilt_probe.py --summary probe.jsonl   # the tables of a log
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from generalization_data import load_split, noisy_labels  # noqa: E402
from generalization_train import make_model  # noqa: E402
from tsam_fast import TSAM  # noqa: E402


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def summary(path: Path) -> str:
    """Markdown tables of a probe's log: its means over each quarter of the run, and by the cache's age."""
    text = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
    recs = [json.loads(line) for line in text.splitlines()]
    epochs = max(r["epoch"] for r in recs) + 1
    quarters = [(epochs * i // 4, epochs * (i + 1) // 4) for i in range(4)]

    def mean(rs, key):
        v = [r[key] for r in rs if key in r]
        return f"{statistics.fmean(v):.3f}" if v else "–"

    def slope(rs):  # of log||v|| on log||g||, each epoch's means removed (how v scales with ||g||)
        xs, ys = [], []
        for e in {r["epoch"] for r in rs}:
            lg = [math.log(r["g_norm"]) for r in rs if r["epoch"] == e]
            lv = [math.log(r["v_over_g"] * r["g_norm"]) for r in rs if r["epoch"] == e]
            xs += [x - statistics.fmean(lg) for x in lg]
            ys += [y - statistics.fmean(lv) for y in lv]
        return f"{sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs):.2f}"

    quarter = [(f"{a + 1}–{b}", [r for r in recs if a <= r["epoch"] < b]) for a, b in quarters]
    out = [f"{path.name}: {len(recs)} steps, {epochs} epochs; means over the steps of each span of epochs", "",
           "| epochs | ‖g‖ | β | ‖v‖/‖g‖ | cos(G, g) | cos(v, v') same batch | cos(cached v, fresh v) | "
           "slope log‖v‖ on log‖g‖ |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, rs in quarter:
        out.append(f"| {label} | " + " | ".join(mean(rs, k) for k in ("g_norm", "beta", "v_over_g", "cos_G_g",
                                                                      "cos_v_v2", "cos_vcache_v")) + f" | {slope(rs)} |")
    names = ("erm", "plain", "beta", "looksam", "stale")
    out += ["", "Steps between full ones, each candidate u against the mean Ḡ of the two fresh tilted gradients: "
            "cos(u, Ḡ) / ‖u‖÷‖G‖ / ‖u − Ḡ‖÷‖Ḡ‖ (noise floor: a fresh draw G' against Ḡ)", "",
            "| epochs | " + " | ".join(names) + " | floor |", "|---|" + "---:|" * (len(names) + 1)]
    for label, rs in quarter:
        out.append(f"| {label} | " + " | ".join(
            f"{mean(rs, f'cos_{n}_Gmean')} / {mean(rs, f'norm_{n}_G')} / {mean(rs, f'err_{n}_Gmean')}" for n in names)
            + f" | {mean(rs, 'err_G2_Gmean')} |")
    out += ["", "| cache age (steps) | cos(cached v, fresh v) | ‖u − Ḡ‖÷‖Ḡ‖ erm | plain | beta |", "|---|---:|---:|---:|---:|"]
    for age in sorted({r["age"] for r in recs if "age" in r}):
        rs = [r for r in recs if r.get("age") == age]
        out.append(f"| {age} | {mean(rs, 'cos_vcache_v')} | {mean(rs, 'err_erm_Gmean')} | {mean(rs, 'err_plain_Gmean')} | "
                   f"{mean(rs, 'err_beta_Gmean')} |")
    betas = sorted(r["beta"] for r in recs)
    out += ["", f"β over all steps: min {betas[0]:.3f}, 5% {betas[len(betas) // 20]:.3f}, median "
                f"{betas[len(betas) // 2]:.3f}, 95% {betas[-1 - len(betas) // 20]:.3f}, max {betas[-1]:.3f}"]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", choices=("mlp", "cnn"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--fit-size", type=int, default=3000)
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--options", default="{}", help="more TSAM options of the trained optimizer, as JSON")
    p.add_argument("--tsam", default="{}", help="TSAM options replacing the study's, of the trained optimizer and "
                                                 "the probes alike, as JSON (e.g. a relative radius)")
    p.add_argument("--out", type=Path)
    p.add_argument("--summary", type=Path, help="train nothing: the tables of this probe log")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    if args.out is None:
        p.error("--out is needed to train")
    torch.set_num_threads(1)
    study = argparse.Namespace(mlp_hidden=(256, 256), cnn_channels=(16, 32))
    lr, momentum, wd, bs = 0.05, 0.9, 5e-4, 128
    tsam = dict(tilt=1.0, num_samples=3, sampler="ascent", start="gaussian", rho=0.1, radius=1.0, noise_scale=1.0)
    tsam.update(json.loads(args.tsam))
    split = load_split("mnist", 0.2, 0.125, 0, args.fit_size)
    y_noisy, _ = noisy_labels(split, args.noise, args.seed)
    model = make_model(args.model, study, args.seed)
    probe = make_model(args.model, study, args.seed)
    opt = TSAM(model.parameters(), torch.optim.SGD, seed=args.seed, tilt_every=args.every, lr=lr, momentum=momentum,
               weight_decay=wd, **tsam, **json.loads(args.options))
    # lr 0: the probe's step leaves its weights alone and its tilted gradient in .grad
    probes = [TSAM(probe.parameters(), torch.optim.SGD, seed=1000 + i, lr=0.0, **tsam) for i in range(2)]
    n = len(y_noisy)
    total = args.epochs * math.ceil(n / bs)
    order = torch.Generator().manual_seed(args.seed)
    cache = None  # (g0, G0, beta, v) of the last full step
    step = 0
    with open(args.out, "w") as out:
        for epoch in range(args.epochs):
            perm = torch.randperm(n, generator=order)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                xb, yb = split.x_train[idx], y_noisy[idx]

                def closure(m=model):
                    loss = F.cross_entropy(m(xb), yb)
                    loss.backward()
                    return loss

                probe.load_state_dict(model.state_dict())
                probe.zero_grad()
                closure(probe)
                g = flat_grad(probe)
                fresh = []
                for q in probes:
                    q.step(lambda: closure(probe))
                    fresh.append(flat_grad(probe))
                big, big2 = fresh
                mean = (big + big2) / 2
                beta = float(big @ g / (g @ g))
                v, v2 = big - beta * g, big2 - float(big2 @ g / (g @ g)) * g
                rec = dict(step=step, epoch=epoch, g_norm=float(g.norm()), beta=beta,
                           v_over_g=float(v.norm() / g.norm()), cos_G_g=cos(big, g), cos_v_v2=cos(v, v2),
                           cos_G_G2=cos(big, big2))
                full = opt.evaluations_per_step > 1
                rec["full"] = full
                if not full and cache is not None:
                    g0, big0, beta0, v0 = cache
                    s = float(g.norm() / g0.norm())
                    cands = dict(erm=g, plain=g + s * v0, beta=beta0 * g + s * v0,
                                 looksam=g + 0.7 * float(g.norm() / v0.norm()) * v0, stale=s * big0)
                    for name, u in cands.items():
                        rec[f"cos_{name}_G"] = cos(u, big)
                        rec[f"cos_{name}_Gmean"] = cos(u, mean)
                        rec[f"norm_{name}_G"] = float(u.norm() / big.norm())
                        rec[f"err_{name}_Gmean"] = float((u - mean).norm() / mean.norm())
                    rec["cos_vcache_v"] = cos(v0, v)
                    rec["cos_vcache_vmean"] = cos(v0, mean - float(mean @ g / (g @ g)) * g)
                    rec["age"] = step - cache_step
                    # the noise floor: what a fresh draw G' gets against the fresh G and against the mean
                    rec["cos_G2_G"] = cos(big2, big)
                    rec["err_G2_Gmean"] = float((big2 - mean).norm() / mean.norm())
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
                opt.step(closure)
                if full:  # the optimizer's own cache: its G0 is in .grad, g0 is g (the same theta and batch)
                    big0 = flat_grad(model)
                    beta0 = float(big0 @ g / (g @ g))
                    cache, cache_step = (g.clone(), big0, beta0, big0 - beta0 * g), step
                    rec["cached_beta"] = beta0
                    rec["cached_v_over_g0"] = float(cache[3].norm() / g.norm())
                out.write(json.dumps(rec) + "\n")
                step += 1
    print(f"wrote {args.out} ({step} steps)")


if __name__ == "__main__":
    main()
