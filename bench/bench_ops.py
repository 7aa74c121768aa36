"""Each op of the contract alone, per backend: ``python bench/throughput.py --mode ops``, or run this file
(``python bench/bench_ops.py --help``: the ops mode's options alone).

The ops, their inputs and their byte counts come from the contract table (``tsam_fast.backends.contract``):
each op is timed in its first mode (``OpSpec.cases``) on the table's sample inputs, fp32, on the CPU (or
CUDA with ``--device cuda``). Rows: ``ReferenceOps`` (the plain definition), ``FastReferenceOps`` (what
``backend="reference"`` runs; its generator compiled where it can be) and every fused backend available.
Each row's answer is first checked against ``ReferenceOps`` on the same inputs; ops update in place, and
repeated calls keep the buffers' values finite. GB/s is the op's minimum memory traffic (docs/design.md
§5: the mode's ``passes`` over 4-byte elements) per median second. A row whose spread is too wide to read
is marked unreliable (``harness.unreliable``); progress goes to stderr (a line per implementation and op
when it is not a terminal).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from tsam_fast.backends import contract, resolve_backend  # noqa: E402
from tsam_fast.backends.reference import ReferenceOps  # noqa: E402
from tsam_fast.backends.reference_fast import FastReferenceOps  # noqa: E402


def rows_for(device: torch.device):
    """(label, ops) of every implementation that runs on ``device``: the plain reference first."""
    import tsam_fast
    out = [("reference (plain definition)", ReferenceOps()), ("reference (fast fallback)", FastReferenceOps())]
    for name, st in tsam_fast.backend_info().items():
        if name != "reference" and st.available and device.type in st.devices:
            out.append((name, resolve_backend(name, device.type).ops))
    return out


def _call(ops, op: str, args):
    result = getattr(ops, op)(*args)
    spec = contract.SPECS[op]
    written = [args[spec.arg_names.index(name)] for name in spec.mutated]
    flat = [torch.cat([x.reshape(-1) for x in t]) if isinstance(t, list) else t for t in written if t is not None]
    return [result] if spec.returns_tensor else flat


def check(ops, op: str, device, n: int = 100_003) -> float:
    """Largest relative difference from ``ReferenceOps`` on fresh inputs (the reference's norms are fp64)."""
    torch.manual_seed(0)
    args = contract.SPECS[op].args(n, torch.float32, device)
    twin = tuple([t.clone() for t in a] if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor) else a
                 for a in args)
    err = 0.0
    for got, want in zip(_call(ops, op, args), _call(ReferenceOps(), op, twin)):
        err = max(err, ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item())
    return err


def measure(device: torch.device, sizes, steps: int = 5, plain_max: int = 2_000_000,
            progress: Optional[harness.Progress] = None) -> dict:
    """Check, then time, every op of every implementation at every size in ``sizes`` (``steps`` calls)."""
    timer = harness.Timer(device)
    progress = progress or harness.Progress(0, enabled=False)
    out = []
    for label, ops in rows_for(device):
        progress.note(f"ops: {label}: {len(contract.NAMES)} ops × {len(sizes)} sizes")
        for op in contract.NAMES:
            t_op = time.perf_counter()
            err = check(ops, op, device)
            if err > 1e-5:
                raise SystemExit(f"{label} {op}: off by {err:.3g} from ReferenceOps; not timing it")
            for n in sizes:
                if label.startswith("reference (plain") and n > plain_max:
                    continue  # seconds per call: its cost at 1M tells the story
                torch.manual_seed(0)
                args = contract.SPECS[op].args(n, torch.float32, device)
                st = harness.summarize(timer.repeat(lambda: _call(ops, op, args), 1, steps))
                passes = contract.SPECS[op].passes()
                out.append(dict(impl=label, op=op, n=n, passes=passes, check_err=err, ms=st,
                                gbps=passes * 4 * n / (st["median"] * 1e-3) / 1e9 if passes else None,
                                unreliable=[w for w in [harness.unreliable(st, "time")] if w]))
            progress.update(0, f"ops: {label}: {op} checked and timed ({time.perf_counter() - t_op:.1f} s)")
    return dict(rows=out)


def markdown(record: dict) -> str:
    head = ["implementation", "op", "elements", "ms (median [IQR])", "GB/s (min traffic)", "note"]
    rows = [[r["impl"], r["op"], harness.fmt_count(r["n"]), f"{r['ms']['median']:.2f} [{r['ms']['q25']:.2f}–"
             f"{r['ms']['q75']:.2f}]", f"{r['gbps']:.1f}" if r["gbps"] else "–",
             "**unreliable**: " + "; ".join(r["unreliable"]) if r.get("unreliable") else ""] for r in record["rows"]]
    dev = record["device"]
    return (f"ops mode — {dev['name']} ({dev['type']}), torch {record['versions']['torch']}, copy bandwidth "
            f"{record['bandwidth_gbps']:.1f} GB/s; reference generator: {record['backends']['reference']['generator']}"
            "\n\n" + harness.markdown_table(head, rows) + f"\n\n**unreliable**: {harness.UNRELIABLE_RULE}.")


def parse_args(argv=None) -> argparse.Namespace:
    """The options ``throughput.py --mode ops`` hands on, for running this file alone."""
    p = argparse.ArgumentParser(prog="bench/bench_ops.py", formatter_class=harness.HelpFormatter,
                                description="Each op of the contract alone, per implementation: checked against "
                                            "ReferenceOps, then timed (ms and GB/s of minimum traffic).")
    p.add_argument("--device", default="auto", help=harness.DEVICE_HELP)
    p.add_argument("--op-sizes", default="1e6,1e7", help="elements per op call")
    p.add_argument("--steps", type=int, default=5, help="timed calls per op and size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    harness.add_output_options(p, "the JSON and markdown")
    p.add_argument("--no-save", action="store_true", help="print the table only; write no files")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    args.out_dir = harness.output_dir(args)
    return args


def main(args) -> int:
    """Run the ops mode with ``args``: ``parse_args``' or ``throughput.py``'s (its --device, --op-sizes,
    --steps, --threads, --out-dir/--record, --no-save and --no-progress)."""
    device = harness.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(float(x)) for x in args.op_sizes.split(",") if x]
    progress = harness.Progress(0, enabled=not args.no_progress)
    try:
        record = dict(harness.machine_record(device), mode="ops", bandwidth_gbps=harness.copy_bandwidth(device),
                      **measure(device, sizes, steps=args.steps or 5, progress=progress))
    finally:
        progress.close()
    text = markdown(record)
    if not args.no_save:
        for path in harness.save(record, args.out_dir, f"ops-{device.type}", markdown=text):
            print(f"wrote {path}", file=sys.stderr)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
