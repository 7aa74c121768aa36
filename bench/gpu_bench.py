#!/usr/bin/env python3
"""Optimizer overhead of one TSAM step on a GPU: the Triton backend against the bandwidth floor and
against plain-PyTorch versions, side by side in one run (issue 4's performance targets).

For each size d (fp32 parameters; default 50M, 200M, 500M) and s samples of the ``ascent`` sampler with
the ``gaussian`` start and SGD with momentum as the base optimizer, it times:

    copy            a device-to-device copy: the memory bandwidth of this GPU, measured here
    floor           the bytes of docs/design.md §5, (11 s + 9) * 4 d, divided by that bandwidth
    triton_ops      the op sequence TSAM.step issues, through the Triton backend, on one flat bucket
    torch_flat      the same step in the best plain PyTorch over the flat buffers (torch.randn noise,
                    addcmul/lerp, vector_norm; device scalars, no host sync)
    authors_loop    the published loop's structure over the same d split into --tensors parameters:
                    a clone and a noise tensor per parameter per sample, a .item() per parameter,
                    s gradient copies, host-side weights, Python aggregation
    tsam_step       tsam_fast.TSAM(backend="triton").step with a minimal closure, minus the closure

Every method's closure is replaced by ``grad.copy_(source)`` (the gradient a backward would write); the
overhead is the step time minus 2 s such copies, timed in the same run. Results: median and interquartile
range over --steps timed steps (CUDA events), the ratio to the floor, and the speed-ups; a markdown table
on stdout and a JSON record (device, versions, date) in --out.

Before timing, the Triton op sequence is checked against the reference backend's on a small bucket.
``--sweep`` also times the Triton op sequence for a few block-size configurations (they are untuned).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

import tsam_fast
from tsam_fast import rng
from tsam_fast.backends import resolve_backend

PASSES_PER_SAMPLE, PASSES_PER_STEP = 11, 9
RHO, RADIUS, SCALE, TILT, LR, MOMENTUM = 0.05, 1.0, 1.0, 1.0, 0.01, 0.9


def floor_bytes(d: int, s: int) -> int:
    """docs/design.md §5: about 11 passes per sample plus 9 per step over 4-byte elements (42 for s = 3)."""
    return (PASSES_PER_SAMPLE * s + PASSES_PER_STEP) * d * 4


def _events_ms(fn: Callable[[], object], warmup: int, steps: int, device: torch.device) -> List[float]:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        import time
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    torch.cuda.synchronize()
    pairs = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        pairs.append((a, b))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in pairs]


def summarize(ms: List[float]) -> dict:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return dict(median=statistics.median(ms), q25=q[0], q75=q[2], n=len(ms))


# -- the methods --------------------------------------------------------------------------------------


class Buffers:
    """One flat fp32 bucket: theta, grad, theta0, the accumulator, SGD's momentum and a gradient source."""

    def __init__(self, d: int, device: torch.device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.theta = torch.randn(d, device=device, generator=gen)
        self.grad = torch.zeros(d, device=device)
        self.source = torch.randn(d, device=device, generator=gen) * 0.1
        self.theta0 = torch.empty(d, device=device)
        self.acc = torch.empty(d, device=device)
        self.losses = torch.tensor([1.0, 1.3, 0.8, 1.1, 0.9, 1.2, 1.05, 0.95], device=device)
        self.param = torch.nn.Parameter(self.theta)
        self.param.grad = self.grad
        self.sgd = torch.optim.SGD([self.param], lr=LR, momentum=MOMENTUM)

    def closure(self) -> None:
        self.grad.copy_(self.source)


def ops_step(backend, buf: Buffers, s: int, step: int) -> None:
    """The backend ops TSAM.step issues for one bucket (sampler ascent, start gaussian), as it issues them."""
    ops = backend.ops  # the op contract over plain tensors (tsam_fast/backends/contract.py)
    dev = buf.theta.device
    runs = (0, 0, buf.theta.numel())  # one run: flat (buffer_offset, global_offset, length)
    one = torch.ones((), device=dev)

    def start(j):
        seed = rng.stream_seed(0, step, j, rng.STREAM_START)
        norm = ops.noise_sqnorm(runs, seed, dev).sqrt().clamp_min(1e-30)
        return seed, torch.clamp_max(RADIUS / norm, SCALE)

    seed, coef = start(0)
    ops.perturb(buf.theta, buf.theta0, runs, seed, coef, True)
    m = z = None
    for j in range(s):
        buf.grad.zero_()
        buf.closure()
        kick = RHO / (ops.sqnorm(buf.grad).sqrt() + 1e-12)
        ops.leapfrog(buf.theta, buf.grad, kick, one)
        buf.grad.zero_()
        buf.closure()
        x = buf.losses[j % buf.losses.numel()] * TILT
        if j == 0:
            m, z, a, e = x, torch.ones_like(x), torch.zeros_like(x), torch.ones_like(x)
        else:
            m_new = torch.maximum(m, x)
            a, e = torch.exp(m - m_new), torch.exp(x - m_new)
            m, z = m_new, z * a + e
        if j + 1 < s:
            seed, coef = start(j + 1)
            ops.tilt_accumulate(buf.acc, buf.grad, a, e, j == 0, buf.theta, buf.theta0, runs, seed, coef)
        else:
            ops.finalize(buf.acc, buf.grad, a, e, 1.0 / z, j == 0, buf.theta, buf.theta0)
    buf.sgd.step()


def torch_flat_step(buf: Buffers, s: int, step: int) -> None:
    """The same step in plain PyTorch over the flat buffers, at its best (streaming lerp accumulator)."""
    buf.theta0.copy_(buf.theta)
    m = z = None
    for j in range(s):
        buf.grad.normal_()  # the noise, drawn into the idle gradient buffer
        coef = torch.clamp_max(RADIUS / torch.linalg.vector_norm(buf.grad).clamp_min(1e-30), SCALE)
        torch.addcmul(buf.theta0, buf.grad, coef, out=buf.theta)
        buf.grad.zero_()
        buf.closure()
        kick = RHO / (torch.linalg.vector_norm(buf.grad) + 1e-12)
        buf.theta.addcmul_(buf.grad, kick)
        buf.grad.zero_()
        buf.closure()
        x = buf.losses[j % buf.losses.numel()] * TILT
        if j == 0:
            m, z = x, torch.ones_like(x)
            buf.acc.copy_(buf.grad)
        else:
            m_new = torch.maximum(m, x)
            a, e = torch.exp(m - m_new), torch.exp(x - m_new)
            m, z = m_new, z * a + e
            buf.acc.lerp_(buf.grad, e / z)  # A is kept normalised: sum_j w_j g_j so far
    buf.grad.copy_(buf.acc)
    buf.theta.copy_(buf.theta0)
    buf.sgd.step()


class AuthorsLoop:
    """The published loop's costs over ``k`` parameter tensors (see bench/baselines.py for the full one)."""

    def __init__(self, d: int, k: int, device: torch.device):
        sizes = [d // k + (1 if i < d % k else 0) for i in range(k)]
        self.params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in sizes]
        self.sources = [torch.randn(n, device=device) * 0.1 for n in sizes]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.sgd = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM)
        self.losses = [1.0, 1.3, 0.8, 1.1, 0.9, 1.2, 1.05, 0.95]

    def closure(self) -> None:
        for p, src in zip(self.params, self.sources):
            p.grad.copy_(src)

    @torch.no_grad()
    def step(self, s: int) -> None:
        grads, losses = [], []
        for j in range(s):
            old = [p.data.clone() for p in self.params]
            noise = [SCALE * torch.randn_like(p) for p in self.params]
            norm = sum(n.norm(2).item() ** 2 for n in noise) ** 0.5
            clip = min(norm, RADIUS)
            for p, n in zip(self.params, noise):
                p.add_(n * clip / norm)
            for p in self.params:
                p.grad.zero_()
            self.closure()
            gnorm = torch.norm(torch.stack([p.grad.norm(2) for p in self.params]), 2)
            for p in self.params:
                p.add_(p.grad * (RHO / (gnorm + 1e-12)))
            for p in self.params:
                p.grad.zero_()
            self.closure()
            losses.append(float(torch.tensor(self.losses[j % len(self.losses)]).item()))
            grads.append({i: p.grad.clone() for i, p in enumerate(self.params)})
            for p, o in zip(self.params, old):
                p.data.copy_(o)
        w = torch.softmax(torch.tensor(losses) * TILT, 0).tolist()
        for i, p in enumerate(self.params):
            p.grad.copy_(sum(wj * g[i] for wj, g in zip(w, grads)))
        self.sgd.step()


# -- the run --------------------------------------------------------------------------------------


def check_against_reference(device: torch.device, s: int) -> float:
    """Max relative difference of theta and grad after one op-level step: triton vs reference."""
    out = {}
    for name in ("triton", "reference"):
        buf = Buffers(1_000_003 if device.type == "cuda" else 4097, device)
        ops_step(resolve_backend(name, device.type), buf, s, 0)
        out[name] = (buf.theta.clone(), buf.grad.clone())
    err = 0.0
    for a, b in zip(out["triton"], out["reference"]):
        err = max(err, float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()))
    return err


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _events_ms(lambda: dst.copy_(src), 3, 20, device)
    return 2 * nbytes / (statistics.median(ms) * 1e-3) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50e6,200e6,500e6", help="comma-separated parameter counts")
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method and size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tensors", type=int, default=200, help="parameter tensors of the authors' loop")
    p.add_argument("--methods", default="triton_ops,torch_flat,authors_loop,tsam_step")
    p.add_argument("--authors-max-size", type=float, default=200e6,
                   help="skip the (slow, memory-hungry) authors' loop above this size")
    p.add_argument("--sweep", action="store_true",
                   help="also time the triton ops for a few block configs (at --sweep-size, or the first size)")
    p.add_argument("--sweep-size", type=float, default=200e6)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu_bench.json"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    s = args.num_samples
    sizes = [int(float(x)) for x in args.sizes.split(",")]
    methods = args.methods.split(",")
    info = tsam_fast.backend_info()["triton"]
    if not info.available or device.type not in info.devices:
        print(f"gpu_bench: the triton backend cannot run on {device.type}: {info.reason}", file=sys.stderr)
        return 2
    triton_backend = resolve_backend("triton", device.type)

    err = check_against_reference(device, s)
    print(f"check: triton vs reference op-level step, max relative difference {err:.2e}")
    if err > 1e-4:
        print("gpu_bench: the triton step disagrees with the reference; not timing it", file=sys.stderr)
        return 1

    bw = copy_bandwidth(device, min(max(sizes) * 4, 2 << 30))
    record = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        versions=dict(torch=torch.__version__, triton=_triton_version(), tsam_fast=tsam_fast.__version__,
                      python=platform.python_version()),
        num_samples=s, copy_bandwidth_gbps=bw, check_max_rel_diff=err, rows=[])
    print(f"device: {record['device']}; copy bandwidth {bw:.0f} GB/s; s = {s}\n")
    print("| d | method | overhead ms (median) | IQR | ÷ floor | floor ms |")
    print("|---|---|---|---|---|---|")

    for d in sizes:
        floor_ms = floor_bytes(d, s) / (bw * 1e9) * 1e3
        row = dict(d=d, floor_ms=floor_ms, methods={})
        buf = Buffers(d, device)
        closure_ms = statistics.median(_events_ms(buf.closure, 3, args.steps, device))
        row["closure_ms"] = closure_ms
        counter = iter(range(10**9))

        def record_method(name, fn, calls=2 * s, closure=closure_ms):
            ms = _events_ms(fn, args.warmup, args.steps, device)
            stats = summarize([m - calls * closure for m in ms])
            stats["ratio_to_floor"] = stats["median"] / floor_ms
            row["methods"][name] = stats
            print(f"| {d / 1e6:g}M | {name} | {stats['median']:.3f} | {stats['q75'] - stats['q25']:.3f} | "
                  f"{stats['ratio_to_floor']:.2f} | {floor_ms:.3f} |", flush=True)

        if "triton_ops" in methods:
            record_method("triton_ops", lambda: ops_step(triton_backend, buf, s, next(counter)))
        sweep_at = int(args.sweep_size) if int(args.sweep_size) in sizes else sizes[0]
        if args.sweep and d == sweep_at:
            from tsam_fast._kernels import launch
            for plain in ((1024, 4), (4096, 8)):
                for noise in ((512, 4), (1024, 4), (2048, 8), (4096, 8)):
                    launch.set_config("plain", plain)
                    launch.set_config("noise", noise)
                    record_method(f"triton_ops[plain={plain},noise={noise}]",
                                  lambda: ops_step(triton_backend, buf, s, next(counter)))
            launch.set_config("plain", None)
            launch.set_config("noise", None)
        if "torch_flat" in methods:
            record_method("torch_flat", lambda: torch_flat_step(buf, s, next(counter)))
        buf = None  # frees the buffers before the next method allocates its own
        if "tsam_step" in methods:
            row["methods"].update(_tsam_step(d, device, s, args, floor_ms))
            st = row["methods"]["tsam_step"]
            print(f"| {d / 1e6:g}M | tsam_step | {st['median']:.3f} | {st['q75'] - st['q25']:.3f} | "
                  f"{st['ratio_to_floor']:.2f} | {floor_ms:.3f} |", flush=True)
        if "authors_loop" in methods and d <= args.authors_max_size:
            loop = AuthorsLoop(d, args.tensors, device)
            c_ms = statistics.median(_events_ms(loop.closure, 2, args.steps, device))
            record_method("authors_loop", lambda: loop.step(s), closure=c_ms)
            loop = None
        m = row["methods"]
        if "triton_ops" in m:
            for other in ("torch_flat", "authors_loop"):
                if other in m:
                    row[f"speedup_vs_{other}"] = m[other]["median"] / m["triton_ops"]["median"]
        record["rows"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    for row in record["rows"]:
        parts = [f"{k}={v:.1f}x" for k, v in row.items() if k.startswith("speedup")]
        print(f"d={row['d'] / 1e6:g}M: " + (", ".join(parts) or "-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")
    return 0


def _tsam_step(d: int, device: torch.device, s: int, args, floor_ms: float) -> Dict[str, dict]:
    """The whole TSAM.step (Python bookkeeping included) with a closure whose backward writes a gradient."""
    w = torch.nn.Parameter(torch.randn(d, device=device))
    source = torch.randn(d, device=device) * 0.1
    opt = tsam_fast.TSAM([w], torch.optim.SGD, lr=LR, momentum=MOMENTUM, num_samples=s, rho=RHO,
                         radius=RADIUS, noise_scale=SCALE, tilt=TILT, backend="triton", check_finite=False)

    def closure():
        loss = torch.dot(w, source)
        loss.backward()
        return loss

    def bare_closure():  # what one call of the closure costs by itself, grad zeroing included
        w.grad.zero_()
        closure()

    opt.step(closure)
    c_ms = statistics.median(_events_ms(bare_closure, 3, args.steps, device))
    ms = _events_ms(lambda: opt.step(closure), args.warmup, args.steps, device)
    stats = summarize([m - 2 * s * c_ms for m in ms])
    stats["ratio_to_floor"] = stats["median"] / floor_ms
    stats["closure_ms"] = c_ms
    return {"tsam_step": stats}


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as exc:  # reported, not fatal: the record says why
        return f"unavailable ({exc})"


if __name__ == "__main__":
    sys.exit(main())
