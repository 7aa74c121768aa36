"""Faults on one rank of a distributed run: a table, each row run on 2 real gloo processes (DDP, and FSDP2
and HSDP for a subset), never hanging (``run_ranks`` kills a run that outlives its bound, and the process group has
a short timeout).

Each row injects one fault on rank 0 at one evaluation position of the second step (the first is clean),
and every rank goes on as a training loop would: a rank whose own injected error it catches continues
with its next batch; any other error ends its loop. The row then asserts, for every rank: the outcome (the
error it ended with, or the documented recovery), that its parameters are at the failing step's theta0
and its step counter unchanged, and the time the error took to surface (printed; docs/design.md §6.1).

Faults: ``raise-exit`` (the closure raises, the rank leaves), ``raise-continue`` (the closure raises, the
rank catches it and steps again: TSAM refuses that next step, since its collectives would pair with the
step the other rank is still in; the rank's loop ends, and the other rank's pending collective fails), ``nan-loss`` (a NaN loss at one evaluation, averaged or not), ``nan-grad`` (a NaN
in one rank's gradient shard, FSDP2), ``closure-vs-loop`` (rank 0 steps with ``step(closure)``, rank 1
with the ``begin_step()`` loop: the same step, no error), ``seed`` and ``num_samples`` (options that differ
between the ranks: both fail at the first step's first loss all-reduce).
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tsam_fast import TSAM

from tables import free_port, one_step, run_ranks

WORLD = 2
STEPS = 4  # a clean step, the faulty one, then room for the loop to go on
KW = dict(num_samples=2, tilt=5.0, radius=0.05, rho=0.05, seed=7, lr=0.1, momentum=0.9)
EVALUATIONS = 4  # ascent, s = 2: (ascent, sample) x 2
GROUP_TIMEOUT = 20  # seconds: the bound on a collective a peer never joins


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def _wrap(kind, model):
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # FSDP2 on a 1-D mesh, or HSDP: 2 replicas of a 1-way shard (the norms' collective over the shard
    # group, the tagged loss all-reduce over every rank)
    mesh = init_device_mesh("cpu", (WORLD,)) if kind == "fsdp2" else \
        init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _local(p):
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


class Injected(KeyError):
    """The fault a test injects (a data loader's error, say)."""


def _worker(rank, port, out, kind, fault, position):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    g = torch.Generator().manual_seed(1 + rank)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    model = _wrap(kind, Net())
    options = dict(KW)
    if rank == 1 and fault == "seed":
        options["seed"] = 8
    if rank == 1 and fault == "num_samples":
        options["num_samples"] = 3
    opt = TSAM(model.parameters(), torch.optim.SGD, **options)
    params = [p for group in opt.param_groups for p in group["params"]]
    loop = fault == "closure-vs-loop" and rank == 1
    faulty = rank == 0 and fault not in ("closure-vs-loop", "seed", "num_samples")
    if faulty and fault == "nan-grad":
        model.inp.weight.register_post_accumulate_grad_hook(
            lambda p: _local_grad(p).view(-1)[0].fill_(float("nan")) if state["inject"] else None)
    state = dict(inject=False)
    outcome = dict(error=None, seconds=None, restored=None, steps_before=None, steps_after=None)

    def evaluate(backward=True):
        index = opt.closure_index
        state["inject"] = faulty and state["step"] == 1 and index == position
        if state["inject"] and fault.startswith("raise"):
            raise Injected(f"data loader broke on rank {rank}")
        loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        if state["inject"] and fault == "nan-loss":
            loss = loss * float("nan")
        return loss

    for step in range(STEPS):
        state["step"] = step
        theta0, before = [_local(p) for p in params], opt.step_count
        started = time.monotonic()
        try:
            one_step(opt, evaluate, loop)
        except Injected:
            if fault == "raise-exit":
                outcome.update(error="Injected", seconds=0.0, steps_before=before, steps_after=opt.step_count,
                               restored=all(torch.equal(_local(p), t) for p, t in zip(params, theta0)))
                break  # this rank leaves
            continue  # the training loop's try/except: on to the next batch
        except Exception as exc:  # noqa: BLE001 - the row's verdict is which error, and that nothing was lost
            outcome.update(error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started,
                           steps_before=before, steps_after=opt.step_count,
                           restored=all(torch.equal(_local(p), t) for p, t in zip(params, theta0)))
            break
    outcome["final"] = [_local(p) for p in params]
    outcome["step_count"] = opt.step_count
    torch.save(outcome, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _local_grad(p):
    return p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad


OUT_OF_STEP = "out of step"
REFUSED = "will not start a step"
# (kind, fault, position) -> what each rank ends with: a substring of its error, None for no error
ROWS = {}
for _kind in ("ddp", "fsdp2"):
    _positions = range(EVALUATIONS) if _kind == "ddp" else (0, 3)
    for _p in _positions:
        ROWS[(_kind, "raise-exit", _p)] = ("Injected", "")  # the peer: gloo's error once rank 0 has left
        ROWS[(_kind, "raise-continue", _p)] = (REFUSED, "")  # the peer: gloo's error once rank 0 has left
        ROWS[(_kind, "nan-loss", _p)] = ("NonFiniteLossError", "NonFiniteLossError")
    ROWS[(_kind, "seed", 0)] = (OUT_OF_STEP, OUT_OF_STEP)
    ROWS[(_kind, "num_samples", 0)] = (OUT_OF_STEP, OUT_OF_STEP)
    ROWS[(_kind, "closure-vs-loop", 0)] = (None, None)
ROWS[("fsdp2", "nan-grad", 1)] = ("NonFiniteLossError", "NonFiniteLossError")
for _fault, _p, _want in (("raise-continue", 1, (REFUSED, "")), ("nan-loss", 0, ("NonFiniteLossError",) * 2),
                          ("seed", 0, (OUT_OF_STEP,) * 2), ("closure-vs-loop", 0, (None, None))):
    ROWS[("hsdp", _fault, _p)] = _want


@pytest.mark.parametrize("kind,fault,position", [pytest.param(*key, id="-".join(map(str, key))) for key in ROWS])
def test_fault_on_one_rank(tmp_path, kind, fault, position):
    started = time.monotonic()
    run_ranks(_worker, WORLD, free_port(), str(tmp_path), kind, fault, position, timeout=3 * GROUP_TIMEOUT + 60)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    expected = ROWS[(kind, fault, position)]
    for rank, (got, want) in enumerate(zip(ranks, expected)):
        if want is None:
            assert got["error"] is None, f"rank {rank}: {got['error']}"
            assert got["step_count"] == STEPS
            continue
        assert got["error"] is not None, f"rank {rank} ended its loop without an error: its peer's fault passed silently"
        assert want in got["error"], f"rank {rank}: {got['error']}"
        assert got["restored"], f"rank {rank}'s parameters are not at the failing step's theta0"
        assert got["steps_after"] == got["steps_before"], f"rank {rank}: a failing step advanced the counter"
        assert got["seconds"] < GROUP_TIMEOUT + 10, f"rank {rank} took {got['seconds']:.1f}s to fail"
    if kind in ("ddp", "hsdp"):  # nothing drifted apart: the replicas are equal, whatever happened
        for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
            assert torch.equal(a, b), "the ranks' parameters drifted apart"
    print(f"{kind} {fault}@{position}: " + "; ".join(
        f"rank {r}: {(g['error'] or 'no error').split(':')[0]} after {g['seconds'] or 0:.2f}s" for r, g in enumerate(ranks))
        + f" (row {time.monotonic() - started:.1f}s)")
