"""Data parallelism (spec section 6): DDP with 2 gloo ranks on CPU, each holding half the batch, matches
single-process TSAM on the full batch, and all ranks hold identical parameters afterwards."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tsam_fast import TSAM

from conftest import assert_close

STEPS = 10
KW = dict(num_samples=3, tilt=5.0, radius=0.05, rho=0.05, seed=7, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _train(model, x, y, backend, sampler):
    opt = TSAM(model.parameters(), torch.optim.SGD, backend=backend, sampler=sampler, **KW)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure) for _ in range(STEPS)]
    return [p.detach().clone() for p in model.parameters()], torch.stack(losses)


def _worker(rank, world, port, backend, sampler, bucket_view, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        half = x.shape[0] // world
        model = nn.parallel.DistributedDataParallel(_model(), gradient_as_bucket_view=bucket_view)
        params, losses = _train(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half],
                                backend, sampler)
        torch.save({"params": params, "losses": losses}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend,sampler,bucket_view", [
    ("auto", "ascent", False), ("auto", "ascent", True), ("reference", "hmc", False)])
def test_ddp_matches_single_process(tmp_path, backend, sampler, bucket_view):
    mp.start_processes(_worker, args=(2, _free_port(), backend, sampler, bucket_view, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, y = _data()
    torch.set_num_threads(1)
    want, want_losses = _train(_model(), x, y, backend, sampler)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b), "ranks diverged"
    assert torch.equal(ranks[0]["losses"], ranks[1]["losses"])
    assert_close(ranks[0]["losses"], want_losses, rtol=1e-5, atol=1e-6, what="tilted losses")
    for a, b in zip(ranks[0]["params"], want):
        assert_close(a, b, rtol=1e-5, atol=1e-6, what="DDP vs single process")


def test_explicit_group_without_init_is_an_error():
    model = _model()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, process_group=object())
        x, y = _data()
        opt.step(lambda: (l := nn.functional.cross_entropy(model(x), y)).backward() or l)
