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
import contextlib
import copy
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script from anywhere, or imported by the tests
    sys.path.insert(0, str(HERE))

import tsam_fast  # noqa: E402
from tsam_fast.backends.reference import FastReferenceBackend, FastReferenceOps, NoiseGenerator  # noqa: E402
from baselines import (ERM, SAM, AuthorsTSAM, FastTSAM, ForeachTSAM, PhiloxNoise, TorchNoise,  # noqa: E402
                       TSAMConfig, tsam_oracle)
import harness  # noqa: E402
from harness import PASSES_PER_SAMPLE, PASSES_PER_STEP, Progress, Timer, floor_bytes, summarize  # noqa: E402,F401
from models import ModelSpec, Workload, build, param_count  # noqa: E402

CHECK_FLAT_MAX = 2_000_003
MODES = ("models", "overhead", "gpu", "fixed", "ops")


class CheckFailed(RuntimeError):
    """A method's update disagrees with the reference: its timing would be meaningless."""


# -- the methods --------------------------------------------------------------------------------


@dataclass
class Method:
    """A row of the table: how to build it on a model's parameters and which oracle checks it.

    ``make(params, cfg, noise)`` returns an object with ``step(closure)``, ``calls_per_step`` and
    ``held_bytes()``; ``loop`` rows drive tsam_fast's ``begin_step()`` loop instead of ``step(closure)``."""

    key: str
    label: str
    oracle: str  # "erm", "sam" or "tsam": the reference TSAM configuration it must match
    make: Callable
    loop: bool = False


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


class _OwnReference(FastTSAM):
    """tsam_fast with the reference backend on its own backend object: its kept buffers (``held_bytes``)
    are this optimizer's alone, and ``eager=True`` gives the generator a machine without a compiler has
    (the same path as ``TSAM_FAST_COMPILE=0``). Bench-only: it replaces the optimizer's resolved backend."""

    def __init__(self, params, cfg, noise=None, *, eager: bool = False, check_finite: bool = False):
        super().__init__(params, cfg, noise, backend="reference", check_finite=check_finite)
        ops = FastReferenceOps(NoiseGenerator(compile=False)) if eager else None
        self.backend = FastReferenceBackend(ops) if ops else FastReferenceBackend(_shared_reference_ops())
        for key in list(self.opt._backends):  # noqa: SLF001 (no public hook: see bench/README.md)
            self.opt._backends[key] = self.backend

    def held_bytes(self) -> int:
        return self.opt.extra_memory_bytes()


def _shared_reference_ops():
    from tsam_fast.backends import reference
    return reference._shared_ops()


def tsam_fast_methods(device: torch.device, backends: Optional[Sequence[str]], check_finite: bool,
                      eager_reference: bool, loops: bool) -> List[Method]:
    info = tsam_fast.backend_info()
    names = [n for n in (backends or available_backends())
             if info[n].available and ("any" in info[n].devices or device.type in info[n].devices)]
    auto = auto_backend(device)
    out = []
    for name in names:
        label = f"tsam_fast {name}" + (" (auto)" if name == auto else "")
        if name == "reference":
            def make(params, cfg, noise, _eager=False):
                return _OwnReference(params, cfg, noise, eager=_eager, check_finite=check_finite)
            out.append(Method("tsam_fast_reference", label, "tsam", make))
            if eager_reference:
                out.append(Method("tsam_fast_reference_eager", "tsam_fast reference, no compiler (eager)", "tsam",
                                  lambda p, c, n, _make=make: _make(p, c, n, _eager=True)))
        else:
            def make(params, cfg, noise, _name=name):
                return FastTSAM(params, cfg, backend=_name, check_finite=check_finite)
            out.append(Method(f"tsam_fast_{name}", label, "tsam", make))
        if loops:
            out.append(Method(f"tsam_fast_{name}_loop", f"tsam_fast {name}, begin_step() loop", "tsam",
                              out[-1 if name != "reference" or not eager_reference else -2].make, loop=True))
    return out


def all_methods(device: torch.device, backends: Optional[Sequence[str]] = None, check_finite: bool = False,
                eager_reference: bool = False, loops: bool = False) -> List[Method]:
    """ERM, SAM, the two TSAM baselines and the tsam_fast rows of every backend that runs on ``device``."""
    return [
        Method("erm", "ERM (base optimizer)", "erm", ERM),
        Method("sam", "SAM", "sam", SAM),
        Method("tsam_authors", "TSAM authors'-style", "tsam", AuthorsTSAM),
        Method("tsam_foreach", "TSAM foreach", "tsam", ForeachTSAM),
    ] + tsam_fast_methods(device, backends, check_finite, eager_reference, loops)


def default_methods(device: torch.device, backends: Optional[Sequence[str]] = None,
                    check_finite: bool = False) -> List[Method]:
    """The rows of the default mode."""
    return all_methods(device, backends, check_finite)


def _closure(workload: Workload, model: torch.nn.Module):
    def closure():
        loss = workload.loss(model)
        loss.backward()
        return loss
    return closure


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def _step(opt, closure, loop: bool):
    if not loop:
        return opt.step(closure)
    run = opt.opt.begin_step()
    for _ in run:
        run.record(closure())
    return run.finish()


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


def plain_oracle(params, cfg: TSAMConfig, **kwargs) -> tsam_fast.TSAM:
    """``tsam_oracle`` on ``ReferenceOps`` itself, the plain definition (not the fast fallback that
    ``backend="reference"`` runs), so that the reference rows are checked too."""
    from tsam_fast.backends.base import Backend
    from tsam_fast.backends.reference import REFERENCE_DTYPES, ReferenceOps
    opt = tsam_oracle(params, cfg, backend="reference", **kwargs)
    plain = Backend("reference", ReferenceOps(), REFERENCE_DTYPES)
    for key in list(opt._backends):  # noqa: SLF001 (bench-only, see _OwnReference)
        opt._backends[key] = plain
    return opt


def check_methods(workload: Workload, cfg: TSAMConfig, methods: Sequence[Method], steps: int = 2,
                  rtol: float = 1e-4, progress: Optional[Progress] = None, tag: str = "") -> Dict[str, dict]:
    """Run ``steps`` steps of every method with tsam_fast's noise and compare with the reference TSAM
    (``plain_oracle``: ``ReferenceOps``, the definition).

    Two configurations: the timed one and ``sensitive_config``'s (both with SGD as the base optimizer). The error is measured on the
    parameter change ``d = theta_after - theta_before``, relative to its largest element (a relative
    error on the parameters themselves would hide a wrong update under their magnitude), after
    allowing ``ULP_ALLOWANCE`` of each stored parameter: ``max(|theta - theta_ref| - 4 eps |theta_ref|)
    / max|d_ref|``. The returned losses are compared too. Raises ``CheckFailed`` naming every method
    that is off by more than ``rtol``. ``progress`` notes each method and setting as checked, tagged ``tag``.
    """
    if cfg.base_optimizer is not torch.optim.SGD:
        # Adam-like optimizers take lr * sign(g) at first: a rounding-level difference in a near-zero
        # gradient becomes a full-size update difference. The base optimizer is torch's own in every
        # row; what the check must pin down is the gradient handed to it, which SGD passes on linearly.
        cfg = copy.copy(cfg)
        cfg.base_optimizer, cfg.base_kwargs = torch.optim.SGD, dict(lr=0.01, momentum=0.9)
    init = _flat_params(workload.make_model())

    def run(make, loop=False):
        model = workload.make_model()
        opt = make(list(model.parameters()))
        closure = _closure(workload, model)
        losses = torch.stack([torch.as_tensor(_step(opt, closure, loop)).detach().float().cpu()
                              for _ in range(steps)])
        return _flat_params(model), losses

    report, failures = {}, []
    with _full_fp32():
        for name, c in (("timed", cfg), ("tilt_sensitive", sensitive_config(workload, cfg))):
            refs = {}
            report[name] = {}
            for m in methods:
                t_row = time.perf_counter()
                if m.oracle not in refs:
                    refs[m.oracle] = run(lambda ps: plain_oracle(ps, c, **ORACLES[m.oracle]))
                want, want_loss = refs[m.oracle]
                got, got_loss = run(lambda ps: m.make(ps, c, PhiloxNoise(c.seed)), m.loop)
                off = ((got - want).abs() - ULP_ALLOWANCE * want.abs()).clamp_min(0).max()
                err = (off / (want - init).abs().max().clamp_min(1e-30)).item()
                loss_err = ((got_loss - want_loss).abs() / want_loss.abs().clamp_min(1e-30)).max().item()
                ok = err <= rtol and loss_err <= rtol  # NaN compares False: a NaN fails
                report[name][m.key] = dict(update_rel_err=err, loss_rel_err=loss_err, passed=ok)
                if progress is not None:
                    progress.note(f"{tag}: check, {name} settings: {m.key} {'ok' if ok else 'DISAGREES'} "
                                  f"(error {err:.1e}; {time.perf_counter() - t_row:.1f} s)")
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
    opt: object
    closure: Callable
    loop: bool = False
    times: List[float] = field(default_factory=list)  # ms per step
    inside: List[float] = field(default_factory=list)  # ms inside the closure, per step (CPU)
    steps: int = 0


class _TimedClosure:
    """The closure, with the time spent inside it summed (on a CPU: the model's cost, not the optimizer's)."""

    def __init__(self, fn: Callable, on: bool):
        self.fn, self.on, self.ms = fn, on, 0.0

    def __call__(self):
        if not self.on:
            return self.fn()
        t0 = time.perf_counter()
        try:
            return self.fn()
        finally:
            self.ms += (time.perf_counter() - t0) * 1e3


def model_tag(kind: str, params: int) -> str:
    """How progress lines and the verdict name a model: ``gpt 5.28M``."""
    return f"{kind} {harness.fmt_count(params)}"


def bench_model(workload: Workload, cfg: TSAMConfig, methods: Sequence[Method], *, device: torch.device,
                warmup: int, steps: int, min_steps: int, row_budget_s: float, deadline: float,
                bandwidth_gbps: float, noise: str, progress: Progress) -> dict:
    """Time every method (and the bare forward/backward) on ``workload``, interleaved step by step.

    Each row runs ``steps`` timed steps, fewer (not under ``min_steps``) when its warm-up step says it
    would exceed ``row_budget_s``. ``deadline`` (a ``time.perf_counter()`` value) ends this model's share
    of the run's time budget: once it has passed, warm-up stops after its second round and timing after
    ``min_steps`` rounds, and every row that lost steps to it is marked ``cut_short``. Each row says
    whether its medians can be read (``harness.unreliable``).
    """
    timer = Timer(device)
    cpu = not timer.cuda
    probe = workload.make_model()
    d = param_count(probe)
    tensors = sum(1 for p in probe.parameters() if p.requires_grad)
    param_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    del probe
    tag = model_tag(workload.spec.kind, d)

    fwd_model = workload.make_model()
    fwd_closure = _closure(workload, fwd_model)

    class _FwdBwd:
        calls_per_step = 1

        def step(self, closure):
            fwd_model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                closure()

        def held_bytes(self):
            return 0

    runners = [Runner("fwd_bwd", 1, _FwdBwd(), _TimedClosure(fwd_closure, cpu))]
    for m in methods:
        model = workload.make_model()
        source = (TorchNoise if noise == "torch" else PhiloxNoise)(cfg.seed)
        opt = m.make(list(model.parameters()), cfg, source)
        runners.append(Runner(m.key, opt.calls_per_step, opt, _TimedClosure(_closure(workload, model), cpu), m.loop))

    def one_step(r: Runner, sink: Optional[List[float]]):
        r.closure.ms = 0.0
        if sink is None:
            _step(r.opt, r.closure, r.loop)
            return
        timer.time(lambda: _step(r.opt, r.closure, r.loop), sink)
        if cpu:
            r.inside.append(r.closure.ms)

    # Warm-up, interleaved. The last warm-up step also measures memory and the step time estimate
    # that caps slow rows to about ``row_budget_s`` seconds of timed steps. The first round builds
    # buffers (and compiles); past the deadline, the second round is the last.
    estimate, peak = {}, {}
    t_warmup = time.perf_counter()
    progress.note(f"{tag}: warm-up, {warmup} round(s) of {len(runners)} rows")
    rounds_warm = 0
    for w in range(warmup):
        last = w == warmup - 1 or (w >= 1 and time.perf_counter() > deadline)
        for r in runners:
            t_row = time.perf_counter()
            if not last:
                one_step(r, None)
                progress.update(1, f"{tag}: warm-up {w + 1}/{warmup}: {r.key} "
                                   f"({time.perf_counter() - t_row:.2f} s)")
                continue
            if hasattr(r.opt, "track_memory"):
                r.opt.track_memory = True
            if timer.cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            one_step(r, None)
            timer.sync()
            estimate[r.key] = time.perf_counter() - t0
            if timer.cuda:
                peak[r.key] = torch.cuda.max_memory_allocated() - base
            if hasattr(r.opt, "track_memory"):
                r.opt.track_memory = False
            progress.update(1, f"{tag}: warm-up {w + 1}/{warmup}: {r.key} ({estimate[r.key]:.2f} s)")
        rounds_warm += 1
        if last:
            break
    if rounds_warm < warmup:
        progress.update(len(runners) * (warmup - rounds_warm))
        progress.warn(f"{tag}: time budget spent: warm-up cut to {rounds_warm} of {warmup} rounds")
    warmup_s = time.perf_counter() - t_warmup
    for r in runners:
        r.steps = max(min_steps, min(steps, int(row_budget_s / max(estimate.get(r.key, 0.0), 1e-9))))

    rounds = max(r.steps for r in runners)
    t_timing = time.perf_counter()
    progress.note(f"{tag}: timing, up to {rounds} interleaved rounds of {len(runners)} rows; "
                  f"{max(0.0, deadline - t_timing):.0f} s of the time budget left for this model")
    done = 0
    for i in range(rounds):
        if i >= min_steps and time.perf_counter() > deadline:
            break
        k = i % len(runners)  # rotate the order so no method always runs right after the same one
        for r in runners[k:] + runners[:k]:
            if i < r.steps:
                one_step(r, r.times)
        timer.flush()
        done += 1
        progress.update(len(runners), f"{tag}: timing round {i + 1}/{rounds} "
                                      f"({time.perf_counter() - t_timing:.1f} s)")
    progress.update(len(runners) * (steps - done))  # rounds skipped by the budgets
    cut = [r.key for r in runners[1:] if len(r.times) < r.steps]
    if cut:
        progress.warn(f"{tag}: time budget spent after {done} of {rounds} rounds: {', '.join(cut)} cut short "
                      "(fewer samples; marked in the table)")

    timing_s = time.perf_counter() - t_timing
    fwd = summarize(runners[0].times)
    floor = harness.floor_ms(d, cfg.num_samples, bandwidth_gbps)
    gc.collect()  # the checks' optimizers: their kept buffers must not count as anyone's memory
    rows = {}
    for m, r in zip(methods, runners[1:]):
        st = summarize(r.times)
        if cpu:  # exact per step: what the step spent outside its own closure calls
            over = summarize([t - c for t, c in zip(r.times, r.inside)])
            inside = statistics.median(r.inside)
        else:
            over = summarize([t - r.calls * fwd["median"] for t in r.times])
            inside = r.calls * fwd["median"]
        held = r.opt.held_bytes()
        why = [w for w in (harness.unreliable(over, "overhead"), harness.unreliable(st, "step")) if w]
        row = dict(label=m.label, calls=r.calls, steps=len(r.times), steps_planned=r.steps,
                   cut_short=len(r.times) < r.steps, row_budget_capped=r.steps < steps,
                   reliable=not why, unreliable=why, step_ms=st, fwd_bwd_ms=inside,
                   overhead=over, overhead_ms=over["median"], overhead_over_floor=over["median"] / floor,
                   extra_memory_bytes=held, extra_memory_x=held / param_bytes,
                   samples_per_s=workload.samples_per_batch / (st["median"] * 1e-3))
        if workload.tokens_per_batch:
            row["tokens_per_s"] = workload.tokens_per_batch / (st["median"] * 1e-3)
        if r.key in peak:
            row["peak_step_alloc_x"] = peak[r.key] / param_bytes
        rows[m.key] = row
    out = dict(name=workload.spec.name, kind=workload.spec.kind, options=workload.spec.options, params=d,
               tensors=tensors, param_bytes=param_bytes, samples_per_batch=workload.samples_per_batch,
               tokens_per_batch=workload.tokens_per_batch, fwd_bwd_ms=fwd,
               floor_bytes=floor_bytes(d, cfg.num_samples), floor_ms=floor, warmup_rounds=rounds_warm,
               warmup_s=warmup_s, timing_s=timing_s, methods=rows)
    if "fwd_bwd" in peak:
        out["fwd_bwd_peak_alloc_x"] = peak["fwd_bwd"] / param_bytes
    return out


# -- presets and command line -------------------------------------------------------------------

GPT_LM = dict(dim=256, layers=6, heads=4, vocab=1024, seq_len=64, batch=8)  # 5.3M parameters in 77 tensors
MLP_10M = dict(width=1536, depth=5, in_dim=256, batch=64)  # 9.85M parameters in 12 tensors

# Per mode, per device type, per size: models ({kind: [options, ...]}), methods (None: every row),
# timing; time_budget is the seconds of the whole run: checks, warm-ups and timing of every model.
# CPU models/small is the README's default run: about 2 minutes on 2 cores (124 s on 2026-12-04), checks
# included; its 180 s budget holds a loaded machine near 3 minutes.
PRESETS = {
    "models": {
        "cpu": {
            "small": dict(models=dict(mlp=[dict(width=512)], cnn=[dict(width=16, batch=16)], gpt=[GPT_LM]),
                          warmup=2, steps=15, min_steps=5, row_budget=8.0, time_budget=180.0),
            "medium": dict(models=dict(mlp=[dict(width=512), dict(width=1024), dict(width=2048)],
                                       cnn=[dict(width=32)], gpt=[GPT_LM, dict(GPT_LM, dim=512)]),
                           warmup=3, steps=30, min_steps=5, row_budget=15.0, time_budget=900.0),
            "large": dict(models=dict(mlp=[dict(width=1024), dict(width=2048), dict(width=4096)],
                                      cnn=[dict(width=64, blocks=2)], gpt=[dict(dim=512, layers=6, seq_len=128)]),
                          warmup=3, steps=30, min_steps=5, row_budget=30.0, time_budget=2700.0),
        },
        "cuda": {
            "small": dict(models=dict(mlp=[dict(width=1024), dict(width=4096)],
                                      cnn=[dict(width=64, blocks=2, batch=128)],
                                      gpt=[dict(dim=512, layers=6, heads=8, vocab=8192, seq_len=256, batch=16)]),
                          warmup=5, steps=50, min_steps=10, row_budget=3.0, time_budget=180.0),
            "medium": dict(models=dict(mlp=[dict(width=1024), dict(width=2048), dict(width=4096), dict(width=5120)],
                                       cnn=[dict(width=128, blocks=2, batch=128)],
                                       gpt=[dict(dim=768, layers=12, heads=12, vocab=16384, seq_len=256, batch=16)]),
                           warmup=5, steps=100, min_steps=10, row_budget=10.0, time_budget=600.0),
            "large": dict(models=dict(mlp=[dict(width=2048), dict(width=4096), dict(width=8192)],
                                      cnn=[dict(width=128, blocks=3, batch=256)],
                                      gpt=[dict(dim=1024, layers=24, heads=16, vocab=32768, seq_len=512, batch=8)]),
                          warmup=5, steps=100, min_steps=10, row_budget=20.0, time_budget=1500.0),
        },
    },
    "overhead": {
        "cpu": {
            "small": dict(models=dict(mlp=[MLP_10M], gpt=[GPT_LM]), eager_reference=True,
                          methods="tsam_authors,tsam_foreach,tsam_fast_reference,tsam_fast_reference_eager,tsam_fast_cpp",
                          warmup=2, steps=10, min_steps=4, row_budget=20.0, time_budget=600.0),
        },
        "cuda": {
            "small": dict(models=dict(mlp=[dict(width=4096)], gpt=[dict(dim=768, layers=12, heads=12, vocab=16384,
                                                                        seq_len=256, batch=16)]),
                          eager_reference=True, warmup=3, steps=20, min_steps=5, row_budget=5.0, time_budget=300.0),
        },
    },
    "gpu": {
        "cuda": {
            "small": dict(models=dict(flat=[dict(numel=int(50e6), tensors=200), dict(numel=int(200e6), tensors=200),
                                            dict(numel=int(500e6), tensors=200)]),
                          methods="tsam_authors,tsam_foreach,tsam_fast_triton", authors_max=200e6,
                          warmup=3, steps=15, min_steps=5, row_budget=10.0, time_budget=120.0),
        },
        "cpu": {  # the same code path on a CPU, for the smoke test and for a look without a GPU
            "small": dict(models=dict(flat=[dict(numel=int(4e6), tensors=20)]),
                          methods="tsam_authors,tsam_foreach,tsam_fast_cpp", authors_max=200e6,
                          warmup=2, steps=10, min_steps=3, row_budget=5.0, time_budget=60.0),
        },
    },
    "fixed": {
        "cpu": {
            "small": dict(models=dict(mlp=[dict(in_dim=8, width=8, depth=1, classes=2, batch=16)]), loops=True,
                          methods="tsam_foreach,tsam_fast_reference,tsam_fast_reference_loop,tsam_fast_cpp,"
                                  "tsam_fast_cpp_loop", threads=1,
                          warmup=100, steps=1500, min_steps=200, row_budget=60.0, time_budget=120.0),
        },
    },
}
PRESETS["fixed"]["cuda"] = PRESETS["fixed"]["cpu"]

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
        description="tsam_fast's benchmarks on one harness: TSAM implementations against ERM and SAM on the same "
                    "models, batches and base optimizer, interleaved in one run, each checked against the reference "
                    "optimizer before it is timed. Prints progress on stderr (a line per phase and row when it is "
                    "not a terminal), then a markdown table and a one-line verdict per tsam_fast row on stdout; "
                    "writes JSON, markdown and a PNG to $" + harness.RESULTS_ENV + " or ~/.cache/tsam_fast/results "
                    "(never into the checkout unless --record). Modes: " + ", ".join(MODES)
                    + " (bench/README.md says what each measures).",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--mode", choices=MODES, default="models", help="which benchmark")
    g.add_argument("--size", choices=("small", "medium", "large"), default="small",
                   help="size preset of the mode; each device type (cpu, cuda) has its own sizes")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
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
    out = g.add_mutually_exclusive_group()
    out.add_argument("--out-dir", type=Path, default=None,
                     help="where the JSON, markdown and PNG go, with a latest-<mode>-<device>.txt pointer to the "
                          f"newest JSON (default: ${harness.RESULTS_ENV}, else ~/.cache/tsam_fast/results: outside "
                          "the checkout)")
    out.add_argument("--record", action="store_true",
                     help="write the results into the committed bench/results/ (no pointer file): for figures "
                          "the docs cite")
    g.add_argument("--no-save", action="store_true", help="print the table only; write no files")
    g.add_argument("--no-plot", action="store_true", help="write no PNG")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (neither the bar on a terminal nor the lines otherwise)")
    args = p.parse_args(argv)
    args.out_dir = harness.RECORDED_DIR if args.record else args.out_dir or harness.results_dir()
    return args


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / on this machine")
    return device


def preset_for(args, device: torch.device) -> dict:
    by_device = PRESETS[args.mode]
    if device.type not in by_device:
        raise SystemExit(f"--mode {args.mode} has no preset for {device.type} (has: {', '.join(by_device)})")
    sizes = by_device[device.type]
    if args.size not in sizes:
        raise SystemExit(f"--mode {args.mode} on {device.type}: sizes {', '.join(sizes)}")
    return sizes[args.size]


def model_specs(args, preset: dict) -> List[ModelSpec]:
    overrides = {
        "mlp": dict(depth=args.mlp_depth),
        "cnn": dict(width=args.cnn_width, blocks=args.cnn_blocks),
        "gpt": dict(dim=args.gpt_dim, layers=args.gpt_layers, heads=args.gpt_heads, vocab=args.vocab,
                    seq_len=args.seq_len),
        "flat": dict(tensors=args.tensors),
    }
    kinds = list(preset["models"]) if args.models is None else [k.strip() for k in args.models.split(",") if k.strip()]
    specs = []
    for kind in kinds:
        if kind not in overrides:
            raise SystemExit(f"--models: unknown model {kind!r}; choose from {', '.join(overrides)}")
        variants = preset["models"].get(kind) or [{}]
        if kind == "mlp" and args.mlp_width:
            variants = [dict(variants[0], width=w) for w in args.mlp_width]
        if kind == "flat" and args.sizes:
            variants = [dict(variants[0], numel=int(float(x))) for x in args.sizes.split(",") if x]
        for v in variants:
            opts = {**v, **{k: x for k, x in overrides[kind].items() if x is not None}}
            if args.batch_size is not None:
                opts["batch"] = args.batch_size
            specs.append(ModelSpec(kind, opts))
    return specs


# -- output -------------------------------------------------------------------------------------


def _sig(x: float, digits: int = 2) -> str:
    """``x`` to ``digits`` significant digits (at least), never in exponent form: 1.7, 2.0, 0.96, 84.4, 1234."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _steps_cell(row: dict) -> str:
    """The timed steps of a row, and what cut them: the time budget (marked) or the row budget."""
    n, planned = row["steps"], row.get("steps_planned", row["steps"])
    if row.get("cut_short"):
        return f"{n} of {planned} (time budget)"
    if row.get("row_budget_capped"):
        return f"{n} (row budget)"
    return str(n)


def _note_cell(row: dict) -> str:
    why = row.get("unreliable") or []
    return "**unreliable**: " + "; ".join(why) if why else ""


#: the rows each tsam_fast row is compared with in the verdict, and how the verdict names them
VERDICT_BASELINES = (("tsam_foreach", "plain foreach TSAM"), ("tsam_authors", "the authors' loop"))


def verdict(record: dict) -> List[str]:
    """One line per tsam_fast row (a backend, or its ``begin_step()`` loop): its optimizer overhead per step on
    the largest model it ran, as a multiple of the bandwidth floor and against plain foreach TSAM and the
    authors'-style loop on that model (or on the largest model both ran, then named). A baseline that did not
    run is said to be missing; a figure read from a row marked unreliable is marked ``[unreliable]``."""
    dev = record["device"]["type"]
    models = record["models"]
    keys = list(dict.fromkeys(k for m in models for k in m["methods"] if k.startswith("tsam_fast_")))
    if not keys:
        ran = ", ".join(dict.fromkeys(k for m in models for k in m["methods"])) or "none"
        return [f"verdict ({dev}): no tsam_fast row ran (rows: {ran}): nothing to compare"]

    def flag(*rows) -> str:
        return " [unreliable]" if any(not r.get("reliable", True) for r in rows) else ""

    out = []
    for key in keys:
        ran = [m for m in models if key in m["methods"]]
        big = max(ran, key=lambda m: m["params"])
        row = big["methods"][key]
        parts = [f"overhead {_sig(row['overhead_ms'], 3)} ms = {_sig(row['overhead_over_floor'])}× the floor"
                 + flag(row)]
        for base, what in VERDICT_BASELINES:
            both = [m for m in ran if base in m["methods"]]
            if not both:
                parts.append(f"no row of {what} in this run")
                continue
            m = big if big in both else max(both, key=lambda m: m["params"])
            mine, theirs = m["methods"][key], m["methods"][base]
            where = "" if m is big else f" (on {model_tag(m['kind'], m['params'])})"
            if mine["overhead_ms"] <= 0 or theirs["overhead_ms"] <= 0:
                parts.append(f"no ratio to {what}{where}: an overhead ≤ 0")
                continue
            ratio = theirs["overhead_ms"] / mine["overhead_ms"]
            parts.append((f"{_sig(ratio)}× below " if ratio >= 1 else f"{_sig(1 / ratio)}× above ")
                         + what + where + flag(mine, theirs))
        out.append(f"verdict ({dev}, {model_tag(big['kind'], big['params'])}): "
                   f"{row['label']}: " + ", ".join(parts))
    return out


def markdown(record: dict) -> str:
    """The run as markdown: a header line, a table per model, what the columns mean, the verdict last."""
    dev = record["device"]
    cfg = record["config"]
    lines = [f"{record['mode']} mode — {dev['name']} ({dev['type']}"
             + (f", {dev['cores']} cores, {dev['torch_threads']} torch threads)" if dev["type"] == "cpu" else ")")
             + f"; torch {record['versions']['torch']}; copy bandwidth {record['bandwidth_gbps']:.1f} GB/s; "
             f"s = {cfg['tsam']['num_samples']}, base optimizer {cfg['tsam']['base_optimizer']}; reference "
             f"generator: {record['backends']['reference']['generator']}"
             + (f"; load average {record['load_average']['before']:.1f} before, "
                f"{record['load_average']['after']:.1f} after" if record["load_average"]["before"] is not None else "")
             + (f"; wall time {record['wall_s']:.0f} s of a {cfg['time_budget_s']:.0f} s time budget"
                if "wall_s" in record else ""),
             ""]
    gpu = dev["type"] == "cuda"
    head = ["method", "calls", "steps", "step ms (median [IQR])", "fwd+bwd ms", "overhead ms (median [IQR])",
            "overhead ÷ floor", "÷ foreach", "extra mem ×params"] + (["peak step alloc ×params"] if gpu else []) + [
        "samples/s", "tokens/s", "note"]
    for m in record["models"]:
        check = m.get("check") or {}
        errs = [c["update_rel_err"] for cs in check.values() for c in cs.values()]
        phases = "; ".join(f"{name} {m[k]:.0f} s" for name, k in (("check", "check_s"), ("warm-up", "warmup_s"),
                                                                   ("timing", "timing_s")) if k in m)
        lines.append(f"**{m['name']}**: {harness.fmt_count(m['params'])} parameters in {m['tensors']} tensors; "
                     f"forward+backward {m['fwd_bwd_ms']['median']:.2f} ms; bandwidth floor {m['floor_ms']:.3f} ms "
                     f"({m['floor_bytes'] / 1e6:.0f} MB per TSAM step)"
                     + (f"; largest check error {max(errs):.1e} (tolerance {cfg['check_rtol']:g})" if errs
                        else "; NOT CHECKED")
                     + (f"; {phases}" if phases else "")
                     + (f"; warm-up cut to {m['warmup_rounds']} of {cfg['warmup']} rounds by the time budget"
                        if m.get("warmup_rounds", cfg["warmup"]) < cfg["warmup"] else ""))
        lines.append("")
        foreach = m["methods"].get("tsam_foreach")
        rows = []
        for key, r in m["methods"].items():
            st, ov = r["step_ms"], r["overhead"]
            cells = [r["label"], str(r["calls"]), _steps_cell(r),
                     f"{st['median']:.2f} [{st['q25']:.2f}–{st['q75']:.2f}]", f"{r['fwd_bwd_ms']:.2f}",
                     f"{ov['median']:.2f} [{ov['q25']:.2f}–{ov['q75']:.2f}]",
                     f"{r['overhead_over_floor']:.2f}",
                     f"{r['overhead_ms'] / foreach['overhead_ms']:.2f}" if foreach and key != "erm" and key != "sam"
                     else "–", f"{r['extra_memory_x']:.2f}"]
            if gpu:
                cells.append(f"{r.get('peak_step_alloc_x', float('nan')):.2f}")
            cells += [f"{r['samples_per_s']:.0f}", f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "–",
                      _note_cell(r)]
            rows.append(cells)
        lines.append(harness.markdown_table(head, rows))
        lines.append("")
    lines.append("overhead = step − time inside the closure (CPU: measured inside each step; GPU: calls × the "
                 "forward/backward row's median); floor = docs/design.md §5 bytes ÷ the copy bandwidth measured in "
                 "this run; ÷ foreach = overhead ÷ the plain foreach TSAM's; extra mem = tensors the method holds "
                 "beyond parameters, gradients and base-optimizer state. steps: timed steps of the row; \"of N (time "
                 "budget)\": cut short when the run's time budget (checks, warm-ups, timing) ran out; \"(row "
                 "budget)\": a slow row held to about --row-budget seconds. **unreliable**: "
                 f"{harness.UNRELIABLE_RULE} (step or overhead): do not read its ratios. Baselines timed with "
                 f"{cfg['baseline_noise']} noise; every row matched the reference before timing"
                 + (" (checks skipped: --no-check)." if cfg.get("no_check") else "."))
    lines.append("")
    lines.append("\n\n".join(verdict(record)))
    return "\n".join(lines)


def save(record: dict, out_dir: Path, make_plot: bool, pointer: bool = True) -> List[Path]:
    """The record's JSON, markdown and PNG in ``out_dir``; with ``pointer``, ``latest-<mode>-<device>.txt``
    naming the newest JSON (not in the committed ``bench/results/``, where it would change with every run)."""
    dev = record["device"]["type"]
    stem = f"{record['mode']}-{dev}-{record['config']['size']}"
    return harness.save(record, out_dir, stem, markdown=markdown(record),
                        plot=harness.plot_overheads if make_plot else None,
                        pointer=f"latest-{record['mode']}-{dev}.txt" if pointer else None)


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
                # a flat model is checked at up to 2M parameters (same tensors): the plain reference's
                # generator launches ~300 kernels per 256k elements, minutes at 500M on a GPU
                twin = workload if spec.kind != "flat" or spec.options["numel"] <= CHECK_FLAT_MAX else build(
                    ModelSpec("flat", dict(spec.options, numel=CHECK_FLAT_MAX)), device, seed=args.seed)
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
        import bench_ops
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
