"""Fixed per-step cost: what a TSAM step costs beyond its forward/backward passes on a tiny model, where
the element-wise work is negligible and the host work (Python, op dispatch, small scalar ops) is all
that is left.

    python bench/fixed_cost.py                 # 8-8-2 MLP, s = 3, ascent, SGD + momentum, 1 thread
    python bench/fixed_cost.py --steps 3000 --json out.json

Per step: step time minus the time spent inside the closure (measured inside the closure itself, so
nothing of the model is counted), for tsam_fast with each available backend (closure API and the
closure-free loop) and for the plain-PyTorch foreach TSAM of ``bench/baselines.py`` (torch.randn noise, as
the throughput benchmark times it), interleaved step
by step in one run. Median and IQR over the timed steps. Runs with ``check_finite=False`` (no host
read), as the throughput benchmark does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tsam_fast  # noqa: E402
from baselines import ForeachTSAM, TorchNoise, TSAMConfig  # noqa: E402


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


class _Method:
    """A model, its optimizer, and one timed step that accumulates the closure's own time."""

    def __init__(self, name, make, loop=False):
        self.name, self.loop = name, loop
        self.model = _model()
        self.opt = make(list(self.model.parameters()))
        self.inside = 0.0
        self.samples = []

    def _loss(self):
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(self.model(X), Y)
        loss.backward()
        self.inside += time.perf_counter() - t
        return loss

    def step(self, record: bool) -> None:
        self.inside = 0.0
        t = time.perf_counter()
        if self.loop:
            run = self.opt.begin_step()
            for _ in run:
                run.record(self._loss())
            run.finish()
        else:
            self.opt.step(self._loss)
        total = time.perf_counter() - t
        if record:
            self.samples.append(total - self.inside)


X = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))


def methods(num_samples: int):
    base = dict(lr=0.01, momentum=0.9)
    cfg = TSAMConfig(base_kwargs=base, num_samples=num_samples)
    out = [_Method("TSAM foreach (plain PyTorch)", lambda ps: ForeachTSAM(ps, cfg, TorchNoise(cfg.seed)))]
    for name, status in tsam_fast.backend_info().items():
        if not status.available or "cpu" not in status.devices and "any" not in status.devices:
            continue
        if name == "triton":  # on the CPU only in the interpreter: not a speed
            continue
        make = (lambda ps, _n=name: tsam_fast.TSAM(ps, torch.optim.SGD, num_samples=num_samples, backend=_n,
                                                   check_finite=False, **base))
        out.append(_Method(f"tsam_fast {name}, step(closure)", make))
        out.append(_Method(f"tsam_fast {name}, begin_step() loop", make, loop=True))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="timed steps per method (default 1500)")
    p.add_argument("--warmup", type=int, default=100, help="untimed steps per method (default 100)")
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a tiny model)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ms = methods(args.num_samples)
    for i in range(args.warmup + args.steps):
        for m in ms:  # interleaved: drift in machine load hits every method alike
            m.step(record=i >= args.warmup)
    rows = []
    for m in ms:
        q = statistics.quantiles([1e3 * s for s in m.samples], n=4)
        rows.append(dict(method=m.name, median_ms=q[1], q1_ms=q[0], q3_ms=q[2]))
    ref = rows[0]["median_ms"]
    print(f"Fixed per-step cost (step time minus closure time), 8-8-2 MLP, batch 16, s = {args.num_samples}, "
          f"ascent, SGD + momentum, {args.threads} thread(s), torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| method | median ms [IQR] | ÷ foreach |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['median_ms']:.3f} [{r['q1_ms']:.3f}–{r['q3_ms']:.3f}] | "
              f"{r['median_ms'] / ref:.2f} |")
    result = dict(rows=rows, steps=args.steps, num_samples=args.num_samples, threads=args.threads,
                  torch=torch.__version__, load=os.getloadavg()[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
