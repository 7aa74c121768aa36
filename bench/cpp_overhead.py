#!/usr/bin/env python3
"""TSAM optimizer overhead of the C++ CPU backend, against the reference backend, the authors' loop and
the bandwidth floor -- all measured in this one run (issue 3's performance check).

    python bench/cpp_overhead.py              # ~10M-parameter fp32 MLP, s=3, ascent

Overhead per step = step time - the time spent inside the closure (forward + backward, timed inside the
step itself), so it is exactly the optimizer's own work. The floor is the byte count of docs/design.md §5 for one
step, (11 s + 9) passes of 4 d bytes (42 for s = 3), divided by the best copy bandwidth measured during the run: that
of a 256 MiB buffer (memory bandwidth, as bench/throughput.py measures it) gives "floor"; that of a
buffer of d floats gives "cache floor" -- on a CPU whose last-level cache holds the optimizer's buffers
(this container reports 480 MiB of L3) the passes can run at that faster speed, so both are shown. Steps of the methods are interleaved (order rotated every round); medians over the timed steps, with min-max. The cpp backend's parameters after the
warm-up steps are checked against the reference backend's before anything is printed (the authors' loop
draws torch.randn noise, so it is not comparable element-wise; bench/throughput.py checks it).
"""

from __future__ import annotations

import argparse
import os
import datetime as _dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tsam_fast  # noqa: E402
from tsam_fast import TSAM  # noqa: E402

PASSES_PER_SAMPLE, PASSES_PER_STEP = 11, 9  # docs/design.md §5


def mlp(widths):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(widths):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def copy_bandwidth(numel, repeats=15):
    """GB/s of dst.copy_(src) (read + write counted), median of ``repeats``."""
    src, dst = torch.ones(numel), torch.empty(numel)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * numel * 4 / statistics.median(times) / 1e9


class TimedClosure:
    """The closure, with the time spent inside it summed (it is the model's cost, not the optimizer's)."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.inside = 0.0

    def __call__(self):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.inside += time.perf_counter() - t0
        return loss


class Method:
    """One optimizer on its own copy of the model, stepped in turn with the others."""

    def __init__(self, name, make_opt, model_state, args):
        torch.manual_seed(1)
        self.name = name
        self.model = mlp(args.widths)
        self.model.load_state_dict(model_state)
        x, y = torch.randn(args.batch, args.widths[0]), torch.randint(0, args.widths[-1], (args.batch,))
        self.opt = make_opt(self.model)
        self.closure = TimedClosure(self.model, x, y)
        self.step_ms, self.overhead, self.fwd_bwd = [], [], []
        self.params = None

    def step(self, timed: bool):
        self.closure.inside = 0.0
        t0 = time.perf_counter()
        self.opt.step(self.closure)
        total = time.perf_counter() - t0
        if timed:
            self.step_ms.append(total * 1e3)
            self.fwd_bwd.append(self.closure.inside * 1e3)
            self.overhead.append((total - self.closure.inside) * 1e3)

    def snapshot(self):
        self.params = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])


def tsam_factory(backend, cfg):
    def make(model):
        return TSAM(model.parameters(), torch.optim.SGD, backend=backend, sampler="ascent", start="gaussian",
                    check_finite=False, **cfg)
    return make


def authors_factory(cfg):
    try:
        from baselines import AuthorsTSAM, TorchNoise, TSAMConfig
    except Exception as exc:  # the colleague's harness module may be absent: report, do not fake it
        print(f"(authors' loop unavailable: {type(exc).__name__}: {exc})")
        return None

    def make(model):
        c = TSAMConfig(base_optimizer=torch.optim.SGD, base_kwargs=dict(lr=cfg["lr"], momentum=cfg["momentum"]),
                       tilt=cfg["tilt"], num_samples=cfg["num_samples"], rho=cfg["rho"], radius=cfg["radius"],
                       noise_scale=cfg["noise_scale"], seed=cfg["seed"])
        return AuthorsTSAM(model.parameters(), c, TorchNoise(cfg["seed"]))
    return make


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 2048, 1024, 1536, 10],
                    help="MLP layer widths (default: 9.98M parameters)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each method")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    state = mlp(args.widths).state_dict()
    d = sum(v.numel() for v in state.values())
    cfg = dict(lr=0.01, momentum=0.9, tilt=1.0, num_samples=args.samples, rho=0.05, radius=1.0,
               noise_scale=0.01, seed=0)
    bw_mem_all, bw_d_all = [copy_bandwidth(64 * 2**20)], [copy_bandwidth(d)]  # 256 MiB; d floats
    step_bytes = (PASSES_PER_SAMPLE * args.samples + PASSES_PER_STEP) * d * 4

    status = tsam_fast.backend_info()["cpp"]
    print(f"# cpp backend overhead -- {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# cpp: {status.reason}")
    print(f"# MLP {args.widths}: d = {d / 1e6:.2f}M fp32 params, batch {args.batch}, s = {args.samples}, ascent, "
          "SGD momentum")
    methods = [Method("cpp", tsam_factory("cpp", cfg), state, args),
               Method("reference", tsam_factory("reference", cfg), state, args)]
    authors = authors_factory(cfg)
    if authors is not None:
        methods.append(Method("authors' loop", authors, state, args))
    # steps interleaved (one step of each method in turn): neighbours and clock drift hit all alike
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # every method has taken the same steps: the correctness check's point
            for m in methods:
                m.snapshot()
        # rotate the order every round: the method stepped right after the bandwidth samples (or after
        # the authors' loop, which allocates a lot) finds colder caches
        for m in methods[i % len(methods):] + methods[:i % len(methods)]:
            m.step(timed=i >= args.warmup)
        bw_mem_all.append(copy_bandwidth(64 * 2**20))  # sampled through the run: neighbours come and go
        bw_d_all.append(copy_bandwidth(d))
    results = [dict(name=m.name, step=m.step_ms, overhead=m.overhead, fwd_bwd=m.fwd_bwd, params=m.params)
               for m in methods]

    ref = next(r for r in results if r["name"] == "reference")["params"]
    for r in results:
        if r["name"] == "authors' loop":  # torch.randn noise, not the Philox of docs/design.md §4: nothing to compare
            r["err"] = float("nan")
            continue
        r["err"] = (r["params"] - ref).abs().max().item()
        if r["err"] > 1e-5:  # cpp vs reference: a few-ulp noise difference only
            raise SystemExit(f"{r['name']}: parameters after {args.warmup} steps differ from the reference "
                             f"backend by {r['err']:.3g}")

    # the floor uses the best bandwidth seen (what the machine can do when no neighbour runs)
    bw_mem, bw_d = max(bw_mem_all), max(bw_d_all)
    floor_ms = step_bytes / (bw_mem * 1e9) * 1e3
    cache_floor_ms = step_bytes / (bw_d * 1e9) * 1e3
    print(f"# copy bandwidth (best / median of {len(bw_mem_all)} samples): {bw_mem:.1f} / {med(bw_mem_all):.1f} GB/s "
          f"on 256 MiB, {bw_d:.1f} / {med(bw_d_all):.1f} GB/s on d floats; load average {os.getloadavg()[0]:.1f} "
          "(other processes share these cores)")
    print(f"# floor = {step_bytes / 1e6:.0f} MB ({PASSES_PER_SAMPLE * args.samples + PASSES_PER_STEP} passes x 4d) / "
          f"{bw_mem:.1f} GB/s = {floor_ms:.1f} ms; cache floor = {step_bytes / 1e6:.0f} MB / {bw_d:.1f} GB/s = "
          f"{cache_floor_ms:.1f} ms")
    cpp = results[0]
    print(f"\n| method | step ms | fwd+bwd ms | overhead ms (min-max) | ÷ floor | ÷ cache floor | "
          "÷ cpp overhead | max |Δθ| vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        o = med(r["overhead"])
        print(f"| {r['name']} | {med(r['step']):.1f} | {med(r['fwd_bwd']):.1f} | {o:.1f} "
              f"({min(r['overhead']):.1f}-{max(r['overhead']):.1f}) | {o / floor_ms:.2f} | {o / cache_floor_ms:.2f} | "
              f"{o / med(cpp['overhead']):.1f}x | {r['err']:.1e} |")
    best = min(cpp["overhead"])
    print(f"\nBest steps (least disturbed by neighbours): cpp overhead {best:.1f} ms = {best / floor_ms:.2f} x floor, "
          f"{best / cache_floor_ms:.2f} x cache floor; " + ", ".join(
              f"{r['name']} {min(r['overhead']):.1f} ms ({min(r['overhead']) / best:.1f}x cpp)" for r in results[1:]))


if __name__ == "__main__":
    main()
