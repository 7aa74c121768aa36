"""Data parallelism (docs/design.md §6): DDP with 2 gloo ranks on CPU, each holding half the batch, matches
single-process TSAM on the full batch, and all ranks hold identical parameters afterwards.

On a GPU (bench/gpu_check.sh) the same test runs on CUDA parameters (Triton backend): over NCCL with one
rank per GPU when there are two GPUs or more; with one GPU, NCCL cannot put two ranks on the same device,
so it runs 2 gloo ranks sharing the GPU (CUDA tensors, the loss all-reduce crossing the host) and 1 NCCL
rank (DDP's NCCL bucket all-reduce writing into TSAM's flat gradient views)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tsam_fast import TSAM, bn_update_once_per_step

from conftest import assert_close
from tables import free_port, run_ranks

STEPS = 10
KW = dict(num_samples=3, tilt=5.0, radius=0.05, rho=0.05, seed=7, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _model(bn=False):
    torch.manual_seed(0)
    if bn:
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _loop_step(opt, model, x, y):
    """The README's closure-free recipe with gradient accumulation: two micro-batches per evaluation, the
    first backward under DDP's ``no_sync`` (no all-reduce), the second synchronising the sum."""
    run = opt.begin_step()
    half = x.shape[0] // 2
    for _ in run:
        total = 0.0
        for i, (xs, ys) in enumerate(((x[:half], y[:half]), (x[half:], y[half:]))):
            sync = i == 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()):
                loss = nn.functional.cross_entropy(model(xs), ys) / 2
                loss.backward()
            total = total + loss.detach()
        run.record(total)
    return run.finish()


def _train(model, x, y, backend, sampler, bn=False, loop=False, extra=None):
    x, y = x.to(next(model.parameters()).device), y.to(next(model.parameters()).device)
    opt = TSAM(model.parameters(), torch.optim.SGD, backend=backend, sampler=sampler, **{**KW, **(extra or {})})
    if bn:
        bn_update_once_per_step(model, opt)

    def closure(backward=True):  # backward=False: a forward-only score (backward_samples)
        loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss

    losses = [_loop_step(opt, model, x, y) if loop else opt.step(closure) for _ in range(STEPS)]
    return ([p.detach().cpu().clone() for p in model.parameters()], torch.stack(losses).cpu(),
            [b.detach().cpu().clone() for b in model.buffers()])


def _worker(rank, world, port, backend, sampler, bucket_view, out, comm="gloo", device="cpu", bn=False, loop=False,
            extra=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    dist.init_process_group(comm, rank=rank, world_size=world)
    try:
        x, y = _data()
        half = x.shape[0] // world
        ids = [torch.device(device).index] if device != "cpu" else None
        model = nn.parallel.DistributedDataParallel(_model(bn).to(device), device_ids=ids,
                                                    gradient_as_bucket_view=bucket_view)
        params, losses, buffers = _train(model, x[rank * half:(rank + 1) * half],
                                         y[rank * half:(rank + 1) * half], backend, sampler, bn, loop, extra)
        torch.save({"params": params, "losses": losses, "buffers": buffers}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ddp(tmp_path, world, backend, sampler, bucket_view, comm="gloo", device="cpu", tol=1e-5, bn=False,
             loop=False, extra=None):
    run_ranks(_worker, world, world, free_port(), backend, sampler, bucket_view, str(tmp_path), comm, device, bn,
              loop, extra)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for other in ranks[1:]:
        for a, b in zip(ranks[0]["params"], other["params"]):
            assert torch.equal(a, b), "ranks diverged"
        assert torch.equal(ranks[0]["losses"], other["losses"])
    if bn:  # per-rank batch statistics: not the full batch's, so no single-process comparison
        return ranks
    x, y = _data()
    torch.set_num_threads(1)
    want, want_losses, _ = _train(_model().to(device), x, y, backend, sampler, extra=extra)
    assert_close(ranks[0]["losses"], want_losses, rtol=tol, atol=tol / 10, what="tilted losses")
    for a, b in zip(ranks[0]["params"], want):
        assert_close(a, b, rtol=tol, atol=tol / 10, what="DDP vs single process")


@pytest.mark.parametrize("backend,sampler,bucket_view,extra", [
    ("auto", "ascent", False, None), ("auto", "ascent", True, None), ("reference", "hmc", False, None),
    ("auto", "ascent", False, dict(shared_ascent=True)), ("auto", "random", False, dict(backward_samples=2)),
    ("auto", "ascent", False, dict(tilt_every=3))])
def test_ddp_matches_single_process(tmp_path, backend, sampler, bucket_view, extra):
    _run_ddp(tmp_path, 2, backend, sampler, bucket_view, extra=extra)


@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_closure_free_loop_with_no_sync_accumulation(tmp_path, bucket_view):
    """begin_step() with two micro-batches per evaluation (the first under no_sync) on 2 ranks equals one
    process stepping on the whole batch with a closure."""
    _run_ddp(tmp_path, 2, "auto", "ascent", bucket_view, loop=True)


def test_ddp_with_batch_norm(tmp_path):
    """Batch norm in the DDP model, no find_unused_parameters: bn_update_once_per_step per rank, DDP's
    buffer broadcast keeps the running statistics identical across ranks, updated once per step."""
    ranks = _run_ddp(tmp_path, 2, "auto", "ascent", False, bn=True)
    for a, b in zip(ranks[0]["buffers"], ranks[1]["buffers"]):
        assert torch.equal(a, b), "running statistics differ between ranks"
    mean, var, tracked = ranks[0]["buffers"]
    # each step's first forward updates every rank's buffers with its own half batch; DDP's broadcast
    # before the second forward makes them rank 0's on every rank; later forwards update throw-away copies
    assert int(tracked) == STEPS
    assert not torch.equal(mean, torch.zeros_like(mean)) and torch.isfinite(var).all()


def _gpu_cases():
    n = torch.cuda.device_count()
    if n >= 2:
        return [("nccl", 2, False), ("nccl", 2, True)]
    return [("gloo", 2, False), ("gloo", 2, True), ("nccl", 1, True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("comm,world,bucket_view", _gpu_cases() if torch.cuda.is_available() else [])
def test_ddp_on_cuda(tmp_path, comm, world, bucket_view):
    """CUDA parameters, Triton backend (auto). GPU reductions in another order (DDP's bucketed all-reduce
    vs one backward over the full batch) leave a few fp32 ulps per step: 1e-4 over 10 steps."""
    _run_ddp(tmp_path, world, "auto", "ascent", bucket_view, comm=comm, device="cuda", tol=1e-4)


def test_explicit_group_without_init_is_an_error():
    model = _model()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, process_group=object())
        x, y = _data()
        opt.step(lambda: (l := nn.functional.cross_entropy(model(x), y)).backward() or l)
