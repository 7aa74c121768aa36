"""Steady-state memory of a TSAM step on the CPU: resident set size after warm-up steps, TSAM against the
plain base optimizer on the same model, one fresh process per row (rows interleaved over rounds).

    python bench/memory.py                       # 50M parameters in 200 tensors, SGD + momentum, s = 3
    python bench/memory.py --numel 10000000 --rounds 1

The model is ``flat`` (bench/models.py: the loss is ``sum_i <p_i, c_i>``, one pass). Each row reports the
RSS after ``--steps`` steps (after ``malloc_trim``; the untrimmed RSS is kept as ``raw_rss``) and its
growth over the last half of them (a leak, or allocator growth, shows there). TSAM's own memory is
theta0 and the tilt accumulator, 2 x P for fp32 parameters (docs/design.md §5): the target is RSS(tsam) <= RSS(plain) + 2 P + 5%. Results go to --out-dir (default: outside the
tree, ``$TSAM_FAST_RESULTS`` or ~/.cache/tsam_fast/results).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import ModelSpec, build  # noqa: E402

ROWS = ("plain", "tsam")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trimmed_rss_bytes() -> int:
    """RSS after glibc hands its free heap pages back (``malloc_trim``): what is live, without the
    allocator's whims (whether a freed block of one row went back to the OS or not swings the plain
    row's RSS by ~2 P between otherwise identical runs). Plain RSS where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def _row(args) -> dict:
    """One row in this process: build, warm up, step, measure."""
    torch.set_num_threads(args.threads)
    from tsam_fast import TSAM
    work = build(ModelSpec("flat", dict(numel=args.numel, tensors=args.tensors)), torch.device("cpu"))
    model = work.make_model()
    kw = dict(lr=1e-3, momentum=0.9)
    if args.row == "plain":
        opt = torch.optim.SGD(model.parameters(), **kw)

        def step():
            opt.zero_grad()
            work.loss(model).backward()
            opt.step()
    else:
        opt = TSAM(model.parameters(), torch.optim.SGD, num_samples=3, rho=0.05, radius=0.05, seed=0,
                   backend=args.backend, **kw)

        def step():
            opt.step(lambda: (loss := work.loss(model)).backward() or loss)
    samples = []
    for _ in range(args.steps):
        step()
        samples.append(rss_bytes())
    half = samples[len(samples) // 2:]
    extra = opt.extra_memory_bytes() if args.row == "tsam" else 0
    return dict(row=args.row, rss=trimmed_rss_bytes(), raw_rss=samples[-1], growth=half[-1] - half[0],
                extra_memory_bytes=extra,
                param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out-dir", default=os.environ.get("TSAM_FAST_RESULTS",
                                                        str(Path.home() / ".cache" / "tsam_fast" / "results")))
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: run one row here
    args = ap.parse_args(argv)
    if args.row:
        print(json.dumps(_row(args)))
        return
    results = {row: [] for row in ROWS}
    for r in range(args.rounds):
        for row in ROWS:
            cmd = [sys.executable, __file__, "--row", row] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                               if k not in ("row", "rounds", "out_dir")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[row].append(json.loads(out))
            print(f"round {r + 1}/{args.rounds} {row}: RSS {results[row][-1]['rss'] / 2**20:.0f} MiB", flush=True)
    p = results["tsam"][0]["param_bytes"]
    plain = statistics.median(x["rss"] for x in results["plain"])
    tsam = statistics.median(x["rss"] for x in results["tsam"])
    growth = max(x["growth"] for x in results["tsam"])
    verdict = dict(param_mib=p / 2**20, plain_rss_mib=plain / 2**20, tsam_rss_mib=tsam / 2**20,
                   extra_rss_over_params=(tsam - plain) / p, extra_memory_bytes_over_params=
                   results["tsam"][0]["extra_memory_bytes"] / p, tsam_growth_mib=growth / 2**20,
                   target_met=tsam <= plain + 2 * p * 1.05)
    print(f"P = {p / 2**20:.0f} MiB; RSS plain {plain / 2**20:.0f} MiB, tsam {tsam / 2**20:.0f} MiB: "
          f"tsam - plain = {(tsam - plain) / p:.2f} P (target <= 2 P + 5%: "
          f"{'met' if verdict['target_met'] else 'MISSED'}); growth over the last steps {growth / 2**20:.1f} MiB")
    os.makedirs(args.out_dir, exist_ok=True)
    from datetime import datetime, timezone
    path = Path(args.out_dir) / f"memory-cpu-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(dict(verdict=verdict, rows=results, args=vars(args)), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
