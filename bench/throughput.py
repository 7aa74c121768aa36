#!/usr/bin/env python3
"""tsam_fast's throughput benchmark: the main job our users run (``bash scripts/bench.sh``).

One run, on one device, with the same models, batches and base optimizer for every method, steps
interleaved so that drifting clocks and neighbours hit every method alike:

    erm              the base optimizer alone (1 forward/backward per step)
    sam              one normalized ascent step (2 forward/backward)
    tsam_authors     the published TSAM loop, re-implemented faithfully (2*s forward/backward)
    tsam_foreach     TSAM in plain PyTorch at its best (foreach ops, no host syncs, streaming)
    tsam_fast_<b>    tsam_fast.TSAM with backend <b>, for every backend available here

Before timing, every method's parameters after two steps are checked against tsam_fast's reference
optimizer (ERM and SAM are special cases of it); the run aborts if any disagrees.

For each model it reports the step time (median and interquartile range), the forward/backward time
of the closure measured in the same run, the optimizer overhead = step - calls * forward/backward,
the bandwidth floor (``floor_bytes`` / the copy bandwidth measured here) and overhead / floor, the
extra memory the method holds, and samples (and tokens) per second. Results go to stdout (markdown),
``bench/results/*.json`` and a PNG plot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script from anywhere, or imported by the tests
    sys.path.insert(0, str(HERE))

import tsam_fast  # noqa: E402
from baselines import (ERM, SAM, AuthorsTSAM, FastTSAM, ForeachTSAM, PhiloxNoise, TorchNoise,  # noqa: E402
                       TSAMConfig, tsam_oracle)
import record as record_io  # noqa: E402
from record import cpu_name, load_average, versions  # noqa: E402
from models import ModelSpec, Workload, build, param_count  # noqa: E402

RESULTS_DIR = HERE / "results"


class CheckFailed(RuntimeError):
    """A method's update disagrees with the reference: its timing would be meaningless."""


# -- the bandwidth floor ------------------------------------------------------------------------

# Passes over d fp32 elements of one TSAM step with the ``ascent`` sampler (docs/design.md §5).
#   per sample (11): ||g0||^2 reads g (1); theta += k*g0 reads theta, g, writes theta (3);
#                    tilt update fused with the next random start reads A, g, theta0, writes A, theta (5);
#                    zeroing the gradient before each of the 2 backwards (2)
#   per step    (9): backup fused with the first random start reads theta, writes theta0, theta (3);
#                    the end of the step also writes grad (1); SGD with momentum reads theta, grad,
#                    buf and writes theta, buf (5)
PASSES_PER_SAMPLE = 11
PASSES_PER_STEP = 9


def floor_bytes(numel: int, num_samples: int, elem_bytes: int = 4) -> int:
    """Minimum memory traffic of one TSAM step over ``numel`` fp32 parameters (docs/design.md §5).

    ``(11 * s + 9) * d * 4`` bytes: 42 passes for s = 3. Noise is generated, not read, so it adds no
    traffic. Divided by the measured copy bandwidth this is the time no implementation can beat;
    forward and backward are the model's and are not counted.
    """
    return (PASSES_PER_SAMPLE * num_samples + PASSES_PER_STEP) * numel * elem_bytes


# -- timing -------------------------------------------------------------------------------------


class Timer:
    """Wall time of a callable: ``perf_counter`` on the CPU, CUDA events (read after a sync) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending = []

    def time(self, fn: Callable[[], object], sink: List[float]) -> None:
        """Run ``fn``; its time in ms lands in ``sink`` now (CPU) or at the next ``flush`` (GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self._pending.append((start, end, sink))
        else:
            t0 = time.perf_counter()
            fn()
            sink.append((time.perf_counter() - t0) * 1e3)

    def flush(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for start, end, sink in self._pending:
                sink.append(start.elapsed_time(end))
            self._pending = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Copy bandwidth in GB/s (read + write counted), median of ``repeats`` copies of ``nbytes``."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    times: List[float] = []
    dst.copy_(src)  # first touch of the pages, outside the timing
    for _ in range(repeats):
        timer.time(lambda: dst.copy_(src), times)
    timer.flush()
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def summarize(ms: Sequence[float]) -> dict:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return dict(median=statistics.median(ms), q25=q[0], q75=q[2], iqr=q[2] - q[0], min=min(ms),
                mean=statistics.fmean(ms), n=len(ms))


class Progress:
    """A one-line progress bar on stderr (tqdm's when installed); silent when stderr is not a terminal."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.text = max(total, 1), 0, ""
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = None
        self._last = 0.0
        if self.enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=self.total, unit="step", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self, n: int = 1, text: Optional[str] = None) -> None:
        self.done = min(self.done + n, self.total)
        if text is not None:
            self.text = text
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_description(self.text, refresh=False)
            return
        now = time.monotonic()
        if now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        frac = self.done / self.total
        sys.stderr.write(f"\r[{'#' * int(30 * frac):<30}] {100 * frac:3.0f}% {self.text[:60]:<60}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


# -- the methods --------------------------------------------------------------------------------


@dataclass
class Method:
    """A row of the table: how to build it on a model's parameters and which oracle checks it."""

    key: str
    label: str
    oracle: str  # "erm", "sam" or "tsam": the reference TSAM configuration it must match
    make: Callable  # (params, cfg, noise) -> object with step(closure), calls_per_step, held_bytes()


ORACLE_KEY = "tsam_fast_reference"
ORACLES = {
    "erm": dict(num_samples=1, sampler="random", start="none"),
    "sam": dict(num_samples=1, sampler="ascent", start="none"),
    "tsam": dict(),
}


def available_backends() -> List[str]:
    return [name for name, st in tsam_fast.backend_info().items() if st.available]


def auto_backend(device: torch.device) -> str:
    probe = torch.zeros(1, device=device, requires_grad=True)
    return tsam_fast.TSAM([probe], torch.optim.SGD, lr=0.0).backend_name(device)


def default_methods(device: torch.device, backends: Optional[Sequence[str]] = None,
                    check_finite: bool = False) -> List[Method]:
    """ERM, SAM, the two TSAM baselines and one tsam_fast row per backend that runs on ``device``."""
    info = tsam_fast.backend_info()
    names = [n for n in (backends or available_backends())
             if info[n].available and ("any" in info[n].devices or device.type in info[n].devices)]
    auto = auto_backend(device)
    methods = [
        Method("erm", "ERM (base optimizer)", "erm", ERM),
        Method("sam", "SAM", "sam", SAM),
        Method("tsam_authors", "TSAM authors'-style", "tsam", AuthorsTSAM),
        Method("tsam_foreach", "TSAM foreach", "tsam", ForeachTSAM),
    ]
    for name in names:
        def make(params, cfg, noise, _name=name):
            return FastTSAM(params, cfg, backend=_name, check_finite=check_finite)
        methods.append(Method(f"tsam_fast_{name}", f"tsam_fast {name}" + (" (auto)" if name == auto else ""),
                              "tsam", make))
    return methods


def _closure(workload: Workload, model: torch.nn.Module):
    def closure():
        loss = workload.loss(model)
        loss.backward()
        return loss
    return closure


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


# Rounding a parameter after its update may land one ulp either way whenever two correct
# implementations' gradients differ in the last bits (e.g. LayerNorm weights near 1.0 moved by 1e-3).
ULP_ALLOWANCE = 4 * torch.finfo(torch.float32).eps


@contextlib.contextmanager
def _full_fp32():
    """TF32 off while checking: it rounds matmul/conv inputs to 10 bits, so two correct methods whose
    perturbed parameters differ in the last bit could round some products differently."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sensitive_config(workload: Workload, cfg: TSAMConfig) -> TSAMConfig:
    """The benchmark's hyperparameters with the tilt made visible, for the second correctness check.

    At the timed settings the samples' losses differ by ~1e-4 on a large model, so the weights are
    ~uniform and a method that gets them wrong still matches. Perturbations of 5% of the parameter
    norm and t = 20 make the weights clearly non-uniform while keeping the amplification of float
    rounding in the losses (t * |L| * 1e-7) far below the tolerance.
    """
    norm = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1).float()
                                               for p in workload.make_model().parameters()])).item()
    out = copy.copy(cfg)
    out.tilt, out.radius, out.rho = 20.0, 0.05 * norm, 0.05 * norm
    return out


def check_methods(workload: Workload, cfg: TSAMConfig, methods: Sequence[Method], steps: int = 2,
                  rtol: float = 1e-4) -> Dict[str, dict]:
    """Run ``steps`` steps of every method with tsam_fast's noise and compare with the reference TSAM.

    Two configurations: the timed one and ``sensitive_config``'s (both with SGD as the base optimizer). The error is measured on the
    parameter change ``d = theta_after - theta_before``, relative to its largest element (a relative
    error on the parameters themselves would hide a wrong update under their magnitude), after
    allowing ``ULP_ALLOWANCE`` of each stored parameter: ``max(|theta - theta_ref| - 4 eps |theta_ref|)
    / max|d_ref|``. The returned losses are compared too. Raises ``CheckFailed`` naming every method
    that is off by more than ``rtol``.
    """
    if cfg.base_optimizer is not torch.optim.SGD:
        # Adam-like optimizers take lr * sign(g) at first: a rounding-level difference in a near-zero
        # gradient becomes a full-size update difference. The base optimizer is torch's own in every
        # row; what the check must pin down is the gradient handed to it, which SGD passes on linearly.
        cfg = copy.copy(cfg)
        cfg.base_optimizer, cfg.base_kwargs = torch.optim.SGD, dict(lr=0.01, momentum=0.9)
    init = _flat_params(workload.make_model())

    def run(make):
        model = workload.make_model()
        opt = make(list(model.parameters()))
        closure = _closure(workload, model)
        losses = torch.stack([torch.as_tensor(opt.step(closure)).detach().float().cpu() for _ in range(steps)])
        return _flat_params(model), losses

    report, failures = {}, []
    with _full_fp32():
        for name, c in (("timed", cfg), ("tilt_sensitive", sensitive_config(workload, cfg))):
            refs = {}
            report[name] = {}
            for m in methods:
                if m.key == ORACLE_KEY and m.oracle == "tsam":  # the oracle itself: nothing to compare
                    report[name][m.key] = dict(update_rel_err=0.0, loss_rel_err=0.0, passed=True, oracle=True)
                    continue
                if m.oracle not in refs:
                    refs[m.oracle] = run(lambda ps: tsam_oracle(ps, c, backend="reference", **ORACLES[m.oracle]))
                want, want_loss = refs[m.oracle]
                got, got_loss = run(lambda ps: m.make(ps, c, PhiloxNoise(c.seed)))
                off = ((got - want).abs() - ULP_ALLOWANCE * want.abs()).clamp_min(0).max()
                err = (off / (want - init).abs().max().clamp_min(1e-30)).item()
                loss_err = ((got_loss - want_loss).abs() / want_loss.abs().clamp_min(1e-30)).max().item()
                ok = err <= rtol and loss_err <= rtol  # NaN compares False: a NaN fails
                report[name][m.key] = dict(update_rel_err=err, loss_rel_err=loss_err, passed=ok)
                if not ok:
                    failures.append(f"{m.key} ({name} settings: t={c.tilt:g}, r={c.radius:.3g}, rho={c.rho:.3g}): "
                                    f"parameter change off by {err:.3g} (relative to its largest element), "
                                    f"loss off by {loss_err:.3g}")
    if failures:
        raise CheckFailed(
            f"{workload.spec.name}: {len(failures)} check(s) disagree with the reference TSAM after {steps} "
            f"steps (tolerance {rtol:g}):\n  " + "\n  ".join(failures)
            + "\nA benchmark of a wrong answer is worthless: fix the method (or its backend) before timing it.")
    return report


# -- one model ----------------------------------------------------------------------------------


@dataclass
class Runner:
    key: str
    calls: int
    fn: Callable[[], object]
    opt: object
    times: List[float]
    steps: int = 0


def bench_model(workload: Workload, cfg: TSAMConfig, methods: Sequence[Method], *, device: torch.device,
                warmup: int, steps: int, min_steps: int, row_budget_s: float, time_budget_s: float,
                bandwidth_gbps: float, noise: str, progress: Progress) -> dict:
    """Time every method (and the bare forward/backward) on ``workload``, interleaved step by step.

    Each row runs ``steps`` timed steps, fewer (not under ``min_steps``) when its warm-up step says it
    would exceed ``row_budget_s``; all rows stop after ``min_steps`` once ``time_budget_s`` is spent.
    """
    timer = Timer(device)
    probe = workload.make_model()
    d = param_count(probe)
    param_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    del probe

    runners: List[Runner] = []
    fwd_model = workload.make_model()
    fwd_closure = _closure(workload, fwd_model)

    def fwd_bwd():
        fwd_model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            fwd_closure()
    runners.append(Runner("fwd_bwd", 1, fwd_bwd, None, []))
    for m in methods:
        model = workload.make_model()
        source = (TorchNoise if noise == "torch" else PhiloxNoise)(cfg.seed)
        opt = m.make(list(model.parameters()), cfg, source)
        closure = _closure(workload, model)
        runners.append(Runner(m.key, opt.calls_per_step, (lambda o=opt, c=closure: o.step(c)), opt, []))

    # Warm-up, interleaved. The last warm-up step also measures memory and the step time estimate
    # that caps slow rows to about ``row_budget_s`` seconds of timed steps.
    estimate, peak = {}, {}
    for w in range(warmup):
        last = w == warmup - 1
        for r in runners:
            progress.update(1, f"{workload.spec.kind} warm-up {r.key}")
            if not last:
                r.fn()
                continue
            if hasattr(r.opt, "track_memory"):
                r.opt.track_memory = True
            if timer.cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            r.fn()
            timer.sync()
            estimate[r.key] = time.perf_counter() - t0
            if timer.cuda:
                peak[r.key] = torch.cuda.max_memory_allocated() - base
            if hasattr(r.opt, "track_memory"):
                r.opt.track_memory = False
    for r in runners:
        r.steps = max(min_steps, min(steps, int(row_budget_s / max(estimate.get(r.key, 0.0), 1e-9))))

    rounds = max(r.steps for r in runners)
    t_timing = time.perf_counter()
    deadline = t_timing + time_budget_s
    done = 0
    for i in range(rounds):
        if i >= min_steps and time.perf_counter() > deadline:
            break
        k = i % len(runners)  # rotate the order so no method always runs right after the same one
        for r in runners[k:] + runners[:k]:
            if i < r.steps:
                timer.time(r.fn, r.times)
        timer.flush()
        done += 1
        progress.update(len(runners), f"{workload.spec.kind} step {i + 1}/{rounds}")
    progress.update(len(runners) * (steps - done))  # rounds skipped by the budgets

    timing_s = time.perf_counter() - t_timing
    fwd = summarize(runners[0].times)
    floor_ms = floor_bytes(d, cfg.num_samples) / (bandwidth_gbps * 1e9) * 1e3
    rows = {}
    for m, r in zip(methods, runners[1:]):
        st = summarize(r.times)
        overhead = st["median"] - r.calls * fwd["median"]
        row = dict(label=m.label, calls=r.calls, steps=len(r.times), step_ms=st,
                   fwd_bwd_ms=r.calls * fwd["median"], overhead_ms=overhead,
                   overhead_over_floor=overhead / floor_ms,
                   extra_memory_bytes=r.opt.held_bytes(), extra_memory_x=r.opt.held_bytes() / param_bytes,
                   samples_per_s=workload.samples_per_batch / (st["median"] * 1e-3))
        if workload.tokens_per_batch:
            row["tokens_per_s"] = workload.tokens_per_batch / (st["median"] * 1e-3)
        if r.key in peak:
            row["peak_step_alloc_x"] = peak[r.key] / param_bytes
        rows[m.key] = row
    out = dict(name=workload.spec.name, kind=workload.spec.kind, options=workload.spec.options, params=d,
               param_bytes=param_bytes, samples_per_batch=workload.samples_per_batch,
               tokens_per_batch=workload.tokens_per_batch, fwd_bwd_ms=fwd,
               floor_bytes=floor_bytes(d, cfg.num_samples), floor_ms=floor_ms, timing_s=timing_s, methods=rows)
    if "fwd_bwd" in peak:
        out["fwd_bwd_peak_alloc_x"] = peak["fwd_bwd"] / param_bytes
    return out


# -- presets and command line -------------------------------------------------------------------

# Sizes per device type. CPU "small" is the README's default run: under 3 minutes on 2 cores,
# the slow reference-backend rows included. GPU sizes reach the 100M+ parameters the kernels are for.
PRESETS = {
    "cpu": {
        "small": dict(mlp=[dict(width=256), dict(width=512)], cnn=[dict(width=16, batch=16)],
                      gpt=[dict(dim=128, layers=2)], warmup=2, steps=20, min_steps=5, row_budget=6.0,
                      time_budget=80.0),
        "medium": dict(mlp=[dict(width=512), dict(width=1024), dict(width=2048)], cnn=[dict(width=32)],
                       gpt=[dict(dim=256, layers=4)], warmup=3, steps=30, min_steps=5, row_budget=15.0,
                       time_budget=600.0),
        "large": dict(mlp=[dict(width=1024), dict(width=2048), dict(width=4096)],
                      cnn=[dict(width=64, blocks=2)], gpt=[dict(dim=512, layers=6, seq_len=128)],
                      warmup=3, steps=30, min_steps=5, row_budget=30.0, time_budget=1800.0),
    },
    "cuda": {
        "small": dict(mlp=[dict(width=1024), dict(width=4096)], cnn=[dict(width=64, blocks=2, batch=128)],
                      gpt=[dict(dim=512, layers=6, heads=8, vocab=8192, seq_len=256, batch=16)],
                      warmup=5, steps=50, min_steps=10, row_budget=3.0, time_budget=60.0),
        "medium": dict(mlp=[dict(width=1024), dict(width=2048), dict(width=4096), dict(width=5120)],
                       cnn=[dict(width=128, blocks=2, batch=128)],
                       gpt=[dict(dim=768, layers=12, heads=12, vocab=16384, seq_len=256, batch=16)],
                       warmup=5, steps=100, min_steps=10, row_budget=10.0, time_budget=300.0),
        "large": dict(mlp=[dict(width=2048), dict(width=4096), dict(width=8192)],
                      cnn=[dict(width=128, blocks=3, batch=256)],
                      gpt=[dict(dim=1024, layers=24, heads=16, vocab=32768, seq_len=512, batch=8)],
                      warmup=5, steps=100, min_steps=10, row_budget=20.0, time_budget=900.0),
    },
}

BASE_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, lambda a: dict(lr=a.lr, momentum=a.momentum)),
    "adamw": (torch.optim.AdamW, lambda a: dict(lr=a.lr)),
}


def _int_list(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the unset ones (None: the preset or the model decides, said in the help)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description="Throughput of TSAM implementations against ERM and SAM on the same models, batches and "
                    "base optimizer, interleaved in one run. Prints a markdown table, writes a JSON record and "
                    "a PNG plot to bench/results/. Every method is checked against tsam_fast's reference "
                    "optimizer before it is timed.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--size", choices=("small", "medium", "large"), default="small",
                   help="size preset; each device type (cpu, cuda) has its own sizes")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--models", default="mlp,cnn,gpt", help="comma-separated subset of mlp, cnn, gpt")
    g.add_argument("--methods", default=None,
                   help="comma-separated method keys to run (erm, sam, tsam_authors, tsam_foreach, "
                        "tsam_fast_<backend>); default: all")
    g.add_argument("--backends", default=None,
                   help="comma-separated tsam_fast backends to give rows; default: every available one")
    g = p.add_argument_group("model sizes (override the preset)")
    g.add_argument("--mlp-width", type=_int_list, default=None,
                   help="comma-separated MLP widths, one model each (parameters ~ (depth-1) * width^2)")
    g.add_argument("--mlp-depth", type=int, default=None, help="hidden layers of the MLP (default 5)")
    g.add_argument("--cnn-width", type=int, default=None, help="channels of the CNN's first stage (default 16)")
    g.add_argument("--cnn-blocks", type=int, default=None, help="residual blocks per stage (default 1)")
    g.add_argument("--gpt-dim", type=int, default=None, help="GPT model width (default 128)")
    g.add_argument("--gpt-layers", type=int, default=None, help="GPT decoder blocks (default 2)")
    g.add_argument("--gpt-heads", type=int, default=None, help="GPT attention heads (default 4)")
    g.add_argument("--vocab", type=int, default=None, help="GPT vocabulary size (default 1024)")
    g.add_argument("--seq-len", type=int, default=None, help="GPT sequence length (default 64)")
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
    g.add_argument("--warmup", type=int, default=None, help="untimed steps per method before timing (default: per --size)")
    g.add_argument("--steps", type=int, default=None, help="timed steps per method (default: per --size)")
    g.add_argument("--min-steps", type=int, default=None,
                   help="timed steps a row keeps even when it exceeds --row-budget (default: per --size)")
    g.add_argument("--row-budget", type=float, default=None,
                   help="seconds of timed steps per row: slower rows run fewer steps (at least --min-steps; "
                        "default: per --size)")
    g.add_argument("--time-budget", type=float, default=None,
                   help="seconds of timed steps for the whole run, shared by the models (checks and warm-up "
                        "not included): once spent, rows stop at --min-steps (default: per --size)")
    g.add_argument("--baseline-noise", choices=("torch", "philox"), default="torch",
                   help="noise generator of the baselines while timed: torch's own (what their authors "
                        "call) or tsam_fast's Philox reference in tensor ops (slower); the correctness check "
                        "always uses Philox so that every method sees tsam_fast's noise")
    g.add_argument("--check-rtol", type=float, default=1e-4,
                   help="tolerance of the check against the reference (relative to the largest update)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--bandwidth-mib", type=int, default=None,
                   help="size of the copy that measures memory bandwidth (default 256 on CPU, 1024 on GPU)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON record and PNG go")
    g.add_argument("--no-save", action="store_true", help="print the table only; write no files")
    g.add_argument("--no-plot", action="store_true", help="write no PNG")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / on this machine")
    return device


def model_specs(args, preset: dict) -> List[ModelSpec]:
    overrides = {
        "mlp": dict(depth=args.mlp_depth),
        "cnn": dict(width=args.cnn_width, blocks=args.cnn_blocks),
        "gpt": dict(dim=args.gpt_dim, layers=args.gpt_layers, heads=args.gpt_heads, vocab=args.vocab,
                    seq_len=args.seq_len),
    }
    specs = []
    for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
        if kind not in overrides:
            raise SystemExit(f"--models: unknown model {kind!r}; choose from mlp, cnn, gpt")
        variants = preset[kind]
        if kind == "mlp" and args.mlp_width:
            variants = [dict(width=w) for w in args.mlp_width]
        for v in variants:
            opts = {**v, **{k: x for k, x in overrides[kind].items() if x is not None}}
            if args.batch_size is not None:
                opts["batch"] = args.batch_size
            specs.append(ModelSpec(kind, opts))
    return specs


def device_description(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return dict(type="cuda", name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, host_cpu=cpu_name(), host_cores=os.cpu_count())
    return dict(type="cpu", name=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads())


# -- output -------------------------------------------------------------------------------------


def _fmt_n(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def markdown(record: dict) -> str:
    dev = record["device"]
    lines = [f"Device: {dev['name']} ({dev['type']}"
             + (f", {dev['cores']} cores, {dev['torch_threads']} torch threads)" if dev["type"] == "cpu" else ")")
             + f"; torch {record['versions']['torch']}; copy bandwidth {record['bandwidth_gbps']:.1f} GB/s; "
             f"s = {record['config']['tsam']['num_samples']}, base optimizer {record['config']['tsam']['base_optimizer']}"
             + (f"; load average {record['load_average']['before']:.1f} before, "
                f"{record['load_average']['after']:.1f} after" if record["load_average"]["before"] is not None else ""),
             ""]
    gpu = dev["type"] == "cuda"
    head = ["method", "calls", "step ms (median [IQR])", "fwd+bwd ms", "overhead ms", "overhead ÷ floor",
            "extra mem ×params"] + (["peak step alloc ×params"] if gpu else []) + ["samples/s", "tokens/s",
                                                                                   "vs ERM"]
    for m in record["models"]:
        erm = m["methods"].get("erm")
        lines.append(f"**{m['name']}**: {_fmt_n(m['params'])} parameters; forward+backward "
                     f"{m['fwd_bwd_ms']['median']:.2f} ms; bandwidth floor {m['floor_ms']:.3f} ms "
                     f"({m['floor_bytes'] / 1e6:.0f} MB per TSAM step); largest check error "
                     f"{max(c['update_rel_err'] for cs in m['check'].values() for c in cs.values()):.1e} "
                     f"(tolerance {record['config']['check_rtol']:g})")
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for key, r in m["methods"].items():
            st = r["step_ms"]
            cells = [r["label"], str(r["calls"]), f"{st['median']:.2f} [{st['q25']:.2f}–{st['q75']:.2f}]",
                     f"{r['fwd_bwd_ms']:.2f}", f"{r['overhead_ms']:.2f}", f"{r['overhead_over_floor']:.1f}",
                     f"{r['extra_memory_x']:.2f}"]
            if gpu:
                cells.append(f"{r.get('peak_step_alloc_x', float('nan')):.2f}")
            cells += [f"{r['samples_per_s']:.0f}", f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "–",
                      f"{st['median'] / erm['step_ms']['median']:.2f}×" if erm else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("overhead = step − calls × forward/backward (measured in the same run); floor = docs/design.md §5 "
                 "bytes ÷ measured copy bandwidth; extra mem = tensors the method holds beyond parameters, "
                 "gradients and base-optimizer state. Baselines timed with "
                 f"{record['config']['baseline_noise']} noise; every row matched the reference before timing.")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = list(dict.fromkeys(k for m in record["models"] for k in m["methods"]))
    markers = {"mlp": "o", "cnn": "s", "gpt": "^"}
    for n, key in enumerate(keys):
        color = f"C{n}"
        label = next(m["methods"][key]["label"] for m in record["models"] if key in m["methods"])
        for ax, field in zip(axes, ("overhead_ms", "overhead_over_floor")):
            # the MLP sweep is a line (same architecture, growing width); the other models are points.
            # Non-positive overheads (within the timing noise of small models) cannot go on log axes.
            for kind, marker in markers.items():
                pts = sorted((m["params"], m["methods"][key][field]) for m in record["models"]
                             if m["kind"] == kind and key in m["methods"] and m["methods"][key][field] > 0)
                if pts:
                    ax.plot([p for p, _ in pts], [v for _, v in pts], marker=marker, color=color,
                            ls="-" if kind == "mlp" else "none", label=label if ax is axes[0] and kind == "mlp" else None)
    for ax, title in zip(axes, ("optimizer overhead per step (ms)", "overhead ÷ bandwidth floor")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=8, title="● mlp sweep  ■ cnn  ▲ gpt", title_fontsize=8)
    dev = record["device"]
    fig.suptitle(f"tsam_fast throughput — {dev['name']} ({dev['type']}), s={record['config']['tsam']['num_samples']}, "
                 f"{record['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def save(record: dict, out_dir: Path, make_plot: bool) -> List[Path]:
    dev = record["device"]["type"]
    stamp = record["date"].replace(":", "").replace("-", "")[:13]  # YYYYMMDDTHHMM
    return record_io.save(record, out_dir, f"{dev}-{record['config']['size']}-{stamp}", f"latest-{dev}",
                          plot if make_plot else None)


# -- main ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, methods: Optional[List[Method]] = None) -> dict:
    """The whole benchmark; returns the JSON record. Raises ``CheckFailed`` before timing a wrong method."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, methods)
    finally:
        torch.set_num_threads(threads)  # run() is also called in-process (tests): leave torch as found


def _run(args: argparse.Namespace, methods: Optional[List[Method]]) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    preset = PRESETS[device.type if device.type in PRESETS else "cpu"][args.size]
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
        methods = default_methods(device, backends, args.check_finite)
    if args.methods:
        wanted = args.methods.split(",")
        missing = set(wanted) - {m.key for m in methods}
        if missing:
            raise SystemExit(f"--methods: {sorted(missing)} not available; choose from {[m.key for m in methods]}")
        methods = [m for m in methods if m.key in wanted]
    specs = model_specs(args, preset)

    load_before = load_average()
    if device.type == "cpu" and load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_before:.1f} on {os.cpu_count()} cores before the run: other processes "
              "compete for the CPU and the times will be noisy", file=sys.stderr)
    bw_bytes = (args.bandwidth_mib or (1024 if device.type == "cuda" else 256)) * 2**20
    bandwidth = measure_bandwidth(device, bw_bytes)
    info = tsam_fast.backend_info()
    record = dict(
        schema=1, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=device_description(device), versions=versions(), bandwidth_gbps=bandwidth,
        backends={n: dict(available=s.available, devices=list(s.devices), reason=s.reason) for n, s in info.items()},
        auto_backend=auto_backend(device),
        config=dict(size=args.size, warmup=warmup, steps=steps, min_steps=min_steps, row_budget_s=row_budget,
                    time_budget_s=time_budget,
                    baseline_noise=args.baseline_noise, check_rtol=args.check_rtol,
                    check_finite=args.check_finite, models=[s.name for s in specs], methods=[m.key for m in methods],
                    tsam=cfg.as_dict(), floor_passes=dict(per_sample=PASSES_PER_SAMPLE, per_step=PASSES_PER_STEP)),
        models=[])
    progress = Progress(len(specs) * (warmup + steps) * (len(methods) + 1), enabled=not args.no_progress)
    try:
        timing_left = time_budget
        for i, spec in enumerate(specs):
            workload = build(spec, device, seed=args.seed)
            progress.update(0, f"{spec.kind}: checking against the reference")
            check = check_methods(workload, cfg, methods, rtol=args.check_rtol)
            result = bench_model(workload, cfg, methods, device=device, warmup=warmup, steps=steps,
                                 min_steps=min_steps, row_budget_s=row_budget,
                                 time_budget_s=timing_left / (len(specs) - i), bandwidth_gbps=bandwidth,
                                 noise=args.baseline_noise, progress=progress)
            timing_left = max(0.0, timing_left - result["timing_s"])
            result["check"] = check
            record["models"].append(result)
            del workload
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    record["wall_s"] = time.perf_counter() - t_start
    record["load_average"] = dict(before=load_before, after=load_average())
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        record = run(args)
    except CheckFailed as e:
        print(f"ABORTED before timing: {e}", file=sys.stderr)
        return 2
    print(markdown(record))
    print(f"\nwall time {record['wall_s']:.0f} s")
    if not args.no_save:
        for path in save(record, args.out_dir, make_plot=not args.no_plot):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
