"""TSAM on a sharded model: the optimizer's overhead per step under FSDP2 against DDP, on real ranks.

    python bench/fsdp.py                      # 2 gloo ranks on the CPU, the 5.3M-parameter / 77-tensor GPT
    python bench/fsdp.py --steps 20 --dim 512 # bigger, longer

Each rank trains on its half of the batch; rows (interleaved step by step, same model, same seed):

  ddp             DistributedDataParallel + TSAM (every rank holds all d parameters)
  fsdp            fully_shard per block and at the root + TSAM (each op one dispatch over the local shards)

overhead = step time - time inside the closure calls (measured inside each step, per rank; the slower
rank's median is reported); floor = the byte budget of docs/design.md §5 over the parameters a rank holds
(d for DDP, its local shards for FSDP2) at the copy bandwidth each rank measured while the others did
the same. With CUDA and as many GPUs as ranks: NCCL, one rank per GPU, closures timed with a sync.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from models import ModelSpec, build  # noqa: E402
from presets import GPT_LM  # noqa: E402

from tsam_fast import TSAM  # noqa: E402

ROWS = ("ddp", "fsdp")
OPTIONS = dict(num_samples=3, tilt=1.0, rho=0.05, radius=0.05, lr=1e-3, momentum=0.9, seed=0)


def _prepare(row, workload, device):
    from torch.distributed.fsdp import fully_shard
    model = workload.make_model()
    if row == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = TSAM(wrapped.parameters(), torch.optim.SGD, **OPTIONS)
        return wrapped, opt
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = TSAM(model.parameters(), torch.optim.SGD, **OPTIONS)
    return model, opt


def _local_numel(opt) -> int:
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)


def _rank(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        opts = {**GPT_LM, **{k: v for k, v in vars(args).items() if k in GPT_LM and v is not None}}
        workload = build(ModelSpec("gpt", opts), device)
        per = workload.inputs.shape[0] // world
        x = workload.inputs[rank * per:(rank + 1) * per]
        y = workload.targets[rank * per:(rank + 1) * per]
        dist.barrier()
        gbps = harness.copy_bandwidth(device)
        runs = {row: _prepare(row, workload, device) for row in args.rows}
        inside = {row: 0.0 for row in args.rows}

        def closure_of(row):
            model = runs[row][0]

            def closure():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out_ = model(x)
                loss = F.cross_entropy(out_.reshape(-1, out_.shape[-1]), y.reshape(-1))
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                inside[row] += (time.perf_counter() - t0) * 1e3
                return loss
            return closure

        closures = {row: closure_of(row) for row in args.rows}
        step, over = {row: [] for row in args.rows}, {row: [] for row in args.rows}
        for i in range(args.warmup + args.steps):
            order = args.rows[i % len(args.rows):] + args.rows[:i % len(args.rows)]  # rotate the order
            for row in order:
                dist.barrier()
                inside[row] = 0.0
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                runs[row][1].step(closures[row])
                if cuda:
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) * 1e3
                if i >= args.warmup:
                    step[row].append(ms)
                    over[row].append(ms - inside[row])
        result = {row: dict(step=step[row], overhead=over[row], local_numel=_local_numel(runs[row][1]),
                            extra_bytes=runs[row][1].extra_memory_bytes(),
                            evaluations=runs[row][1].evaluations_per_step) for row in args.rows}
        torch.save(dict(gbps=gbps, rows=result, params=sum(p.numel() for p in workload.make_model().parameters()),
                        tensors=len(list(workload.make_model().parameters())), options=opts),
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda with as many GPUs as ranks, else cpu (gloo)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row (default 8)")
    ap.add_argument("--warmup", type=int, default=2)
    for key in ("dim", "layers", "heads", "vocab", "seq_len", "batch"):
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None,
                        help=f"GPT {key} (default {GPT_LM[key]})")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    harness.add_output_options(ap, "the JSON and markdown")
    args = ap.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.world else "cpu"
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    record = harness.machine_record(device)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_rank, args=(args.world, _free_port(), args, tmp), nprocs=args.world,
                                 join=False, start_method="spawn")
        while not ctx.join(timeout=5):
            pass
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(args.world)]

    rows = []
    for row in args.rows:
        per_rank = [r["rows"][row] for r in ranks]
        slow = max(range(args.world), key=lambda k: statistics.median(per_rank[k]["overhead"]))
        mine = per_rank[slow]
        gbps = ranks[slow]["gbps"]
        floor = harness.floor_ms(mine["local_numel"], OPTIONS["num_samples"], gbps)
        over = harness.summarize(mine["overhead"])
        rows.append(dict(key=row, step_ms=harness.summarize(mine["step"]), overhead=over, overhead_ms=over["median"],
                         floor_ms=floor, overhead_over_floor=over["median"] / floor, local_numel=mine["local_numel"],
                         extra_bytes=[p["extra_bytes"] for p in per_rank], gbps=gbps, slow_rank=slow,
                         evaluations=mine["evaluations"]))
    ddp = next((r for r in rows if r["key"] == "ddp"), None)
    record.update(mode="fsdp", world=args.world, comm="nccl" if args.device == "cuda" else "gloo",
                  model=dict(kind="gpt", params=ranks[0]["params"], tensors=ranks[0]["tensors"], **ranks[0]["options"]),
                  options=OPTIONS, rows=rows)
    head = ["row", "params / rank", "step ms (median [IQR])", "overhead ms (median [IQR])", "overhead ÷ floor",
            "÷ DDP's overhead", "extra MB / rank"]
    table = [[r["key"], harness.fmt_count(r["local_numel"]),
              f"{r['step_ms']['median']:.1f} [{r['step_ms']['q25']:.1f}, {r['step_ms']['q75']:.1f}]",
              f"{r['overhead_ms']:.2f} [{r['overhead']['q25']:.2f}, {r['overhead']['q75']:.2f}]",
              f"{r['overhead_over_floor']:.2f}",
              f"{r['overhead_ms'] / ddp['overhead_ms']:.2f}" if ddp else "-",
              f"{max(r['extra_bytes']) / 2**20:.1f}"] for r in rows]
    m = record["model"]
    text = (f"TSAM (s={OPTIONS['num_samples']}, ascent, SGD momentum) on a {harness.fmt_count(m['params'])}-parameter "
            f"GPT ({m['tensors']} tensors), {args.world} {record['comm']} ranks, {args.steps} timed steps per row on "
            f"{record['device'].get('name', args.device)}\n\n" + harness.markdown_table(head, table) +
            "\n\noverhead = step − time inside the closure calls (slower rank's median); floor = docs/design.md §5 "
            "over the parameters a rank holds, at the copy bandwidth each rank measured while the others did too.")
    print(text)
    for path in harness.save(record, harness.output_dir(args), f"fsdp-{args.device}", markdown=text):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
