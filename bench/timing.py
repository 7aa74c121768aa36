"""One model of the throughput benchmark, timed: every row (and the bare forward/backward) stepping its own
copy of the model, interleaved step by step in a rotating order, within a share of the run's time budget.

``bench_model`` returns the model's record: per row the step time, the overhead (step - time inside the
closure), overhead / floor, extra memory and throughput, and whether the budgets cut it short or its
spread is too wide to read (``harness.unreliable``).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

import harness
from baselines import PhiloxNoise, TorchNoise, TSAMConfig
from harness import Progress, Timer, floor_bytes, model_tag, summarize
from methods import Method, make_closure, run_step
from models import Workload, param_count


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
    fwd_closure = make_closure(workload, fwd_model)

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
        runners.append(Runner(m.key, opt.calls_per_step, opt, _TimedClosure(make_closure(workload, model), cpu),
                              m.loop))

    def one_step(r: Runner, sink: Optional[List[float]]):
        r.closure.ms = 0.0
        if sink is None:
            run_step(r.opt, r.closure, r.loop)
            return
        timer.time(lambda: run_step(r.opt, r.closure, r.loop), sink)
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
