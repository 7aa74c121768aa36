"""FSDP2 (``fully_shard``) with 2 gloo ranks on the CPU (docs/design.md §6): each rank holds half the batch
and a shard of every parameter, and the result equals one unsharded process on the whole batch.

The model has a parameter whose first dimension does not divide by the world size (15 rows: 8 and 7), one
whose rows are fewer than the ranks' share (1 row: rank 1's shard is empty) and a frozen parameter. One
spawn of 2 ranks trains every case of ``CASES`` (sampler, start, groups, clipping, adaptive, tilt schedule, relative radius,
the closure-free loop, HSDP, bf16 mixed precision); the parent process trains
the same cases unsharded and compares. Checkpoints go through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from tsam_fast import TSAM

from conftest import assert_close
from tables import free_port, run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2
STEPS = 4
BASE = dict(num_samples=3, tilt=5.0, radius=0.05, rho=0.05, seed=7, lr=0.1, momentum=0.9, weight_decay=1e-3)


class Net(nn.Module):
    """15 rows (uneven over 2 ranks), 3 rows, a 1-row scale (rank 1 holds none of it), a frozen bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 15)
        self.out = nn.Linear(15, 3)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(1, 3))
        self.out.bias.requires_grad_(False)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x))) * self.scale


def _groups(model):
    """Two param groups: the input layer with its own rho, tilt and radius; the rest."""
    return [dict(params=list(model.inp.parameters()), rho=0.1, tilt=1.0, radius=0.02),
            dict(params=[model.out.weight, model.out.bias, model.scale])]


def _schedule(step):
    return 1.0 + step


# name -> TSAM options, and how the case is run: "groups" (two param groups), "loop" (the closure-free
# API), "mesh" (HSDP's (replicate, shard) sizes), "bf16" (MixedPrecisionPolicy), "rtol" (vs fp32 unsharded)
CASES: Dict[str, Dict[str, Any]] = {
    "ascent": dict(),
    "hmc": dict(sampler="hmc"),
    "random-ball": dict(sampler="random", start="ball"),
    "hmc-sphere": dict(sampler="hmc", start="sphere", hmc_steps=2),
    "groups-clip-adaptive": dict(max_grad_norm=0.5, adaptive=True, run=dict(groups=True)),
    "tilt-schedule-delta": dict(tilt=_schedule, delta=0.5, start="none"),
    "reference-backend": dict(backend="reference", sampler="random"),
    "closure-free-loop": dict(sampler="hmc", run=dict(loop=True)),
    "hsdp-2x1": dict(run=dict(mesh=(2, 1))),
    "relative-radius": dict(radius_mode="relative", radius=0.02, start="sphere", sampler="random"),
    "shared-ascent": dict(shared_ascent=True, radius_mode="relative", radius=0.02),
    "tilt-sampled-backward": dict(shared_ascent=True, backward_samples=2),
    "periodic-tilt": dict(tilt_every=2, sampler="random"),
    "eval-forward-between-steps": dict(run=dict(eval_forward=True)),
    "bf16-compute": dict(run=dict(bf16=True, rtol=3e-2)),
}


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _optimizer(model, name, **extra):
    opts = dict(CASES[name])
    run = opts.pop("run", {})
    params = _groups(model) if run.get("groups") else model.parameters()
    return TSAM(params, torch.optim.SGD, **{**BASE, **opts, **extra})


def _train(model, opt, x, y, name, steps=STEPS):
    def loss_fn():
        # FSDP2 must all-gather the moved shards: no module may still hold unsharded copies from an earlier
        # forward without backward (the root keeps them until its backward)
        assert not hasattr(model, "reshard") or isinstance(model.scale, DTensor), "stale unsharded root"
        return nn.functional.cross_entropy(model(x), y)

    def closure(backward=True):  # backward=False: a forward-only score (backward_samples)
        loss = loss_fn()
        if backward:
            loss.backward()
        return loss

    losses = []
    for _ in range(steps):
        if CASES[name].get("run", {}).get("eval_forward"):  # FSDP2 leaves the root unsharded after it
            with torch.no_grad():
                model(x)
        if CASES[name].get("run", {}).get("loop"):
            run = opt.begin_step()
            for _ev in run:
                loss = loss_fn()
                loss.backward()
                run.record(loss)
            losses.append(run.finish())
        else:
            losses.append(opt.step(closure))
    return torch.stack(losses)


def _shard(model, name):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    run = CASES[name].get("run", {})
    shape = run.get("mesh", (WORLD,))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    kw = dict(mesh=mesh)
    if run.get("bf16"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model.inp, **kw)
    fully_shard(model.out, **kw)
    fully_shard(model, **kw)
    return model


def _init(rank, port, timeout=60):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=timeout))


def _half(rank):
    x, y = _data()
    h = x.shape[0] // WORLD
    return x[rank * h:(rank + 1) * h], y[rank * h:(rank + 1) * h]


def _cases_worker(rank, port, out):
    _init(rank, port)
    try:
        results = {}
        x, y = _half(rank)
        for name in CASES:
            model = _shard(Net(), name)
            opt = _optimizer(model, name)
            losses = _train(model, opt, x, y, name)
            results[name] = dict(
                params=[p.full_tensor().detach().clone() for p in model.parameters()], losses=losses,
                dtypes=[p.dtype for p in model.parameters()], sample_losses=opt.last_losses.clone(),
                memory=opt.extra_memory_bytes())
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(_cases_worker, WORLD, free_port(), str(out), timeout=600)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def unsharded_runs():
    torch.set_num_threads(1)
    x, y = _data()
    results = {}
    for name in CASES:
        model = Net()
        opt = _optimizer(model, name)
        losses = _train(model, opt, x, y, name)
        results[name] = dict(params=[p.detach().clone() for p in model.parameters()], losses=losses,
                             memory=opt.extra_memory_bytes())
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp2_matches_one_unsharded_process(sharded_runs, unsharded_runs, name):
    """Parameters within 1e-5 relative of one process on the whole batch after several steps (bf16 compute:
    within bf16 rounding); every rank derived the same sample losses; parameters stayed fp32."""
    want = unsharded_runs[name]
    rtol = CASES[name].get("run", {}).get("rtol", 1e-5)
    for rank in sharded_runs:
        got = rank[name]
        assert all(d == torch.float32 for d in got["dtypes"]), "the sharded parameters must stay fp32"
        assert torch.equal(got["sample_losses"], sharded_runs[0][name]["sample_losses"]), "ranks disagree"
        assert_close(got["losses"], want["losses"], rtol=rtol, atol=rtol / 10, what=f"{name}: tilted losses")
        for i, (a, b) in enumerate(zip(got["params"], want["params"])):
            assert_close(a, b, rtol=rtol, atol=rtol / 10, what=f"{name}: parameter {i}")


def test_fsdp2_extra_memory_is_the_local_shards(sharded_runs, unsharded_runs):
    """theta0 and the accumulator of the local shard only: the ranks' extra bytes add up to the unsharded
    optimizer's, each rank about half (rank 0 holds the larger halves of the uneven parameters)."""
    for name in ("ascent", "hmc"):
        total = unsharded_runs[name]["memory"]
        mine = [rank[name]["memory"] for rank in sharded_runs]
        assert sum(mine) == total, (mine, total)
        assert max(mine) <= 0.6 * total, (mine, total)


# -- checkpoints through torch.distributed.checkpoint ----------------------------------------------

CKPT_CASE = "hmc-sphere"


def _save_state(model, opt, path):
    """The README's recipe."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _load_state(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _checkpoint_worker(rank, port, out, mode):
    """mode "save": 2 steps, checkpoint, 2 more; mode "load": a fresh model and optimizer, load, 2 steps."""
    _init(rank, port)
    try:
        x, y = _half(rank)
        model = _shard(Net(), CKPT_CASE)
        opt = _optimizer(model, CKPT_CASE, seed=11 if mode == "load" else BASE["seed"])
        path = os.path.join(out, "ckpt")
        if mode == "save":
            _train(model, opt, x, y, CKPT_CASE, steps=2)
            _save_state(model, opt, path)
        else:
            _load_state(model, opt, path)
            assert opt.step_count == 2 and opt.seed == BASE["seed"]
        _train(model, opt, x, y, CKPT_CASE, steps=2)
        torch.save([p.full_tensor().detach().clone() for p in model.parameters()],
                   os.path.join(out, f"{mode}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_checkpoint_round_trips_on_2_ranks_and_reshards_onto_1(tmp_path):
    """Save on 2 ranks, load on 2 ranks: the same trajectory bit for bit. Load into one unsharded process:
    the step counter and seed come back, so the noise stream (and the trajectory) continues."""
    run_ranks(_checkpoint_worker, WORLD, free_port(), str(tmp_path), "save", timeout=300)
    run_ranks(_checkpoint_worker, WORLD, free_port(), str(tmp_path), "load", timeout=300)
    saved, loaded = torch.load(tmp_path / "save0.pt"), torch.load(tmp_path / "load0.pt")
    for a, b in zip(saved, loaded):
        assert torch.equal(a, b), "the resumed 2-rank run left the saved run's trajectory"

    torch.set_num_threads(1)
    model = Net()
    opt = _optimizer(model, CKPT_CASE, seed=11)
    _load_state(model, opt, str(tmp_path / "ckpt"))
    assert opt.step_count == 2 and opt.seed == BASE["seed"]
    x, y = _data()
    _train(model, opt, x, y, CKPT_CASE, steps=2)
    for i, (a, b) in enumerate(zip(model.parameters(), saved)):
        assert_close(a.detach(), b, rtol=1e-5, atol=1e-6, what=f"resharded onto 1 process: parameter {i}")


def test_checkpoint_state_init_is_no_step():
    """get_optimizer_state_dict on a fresh optimizer makes the base optimizer's state with a zero-gradient,
    lr-0 ``step()``: it must not move anything nor count as a TSAM step; a plain ``step()`` stays an error."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    model = Net()
    opt = _optimizer(model, "ascent")
    before = [p.detach().clone() for p in model.parameters()]
    sd = get_optimizer_state_dict(model, opt)
    assert opt.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(g["tsam_step"] == 0 and g["tsam_seed"] == BASE["seed"] for g in sd["param_groups"])
    assert sd["state"], "the base optimizer's state was not created"
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


# -- a failing closure on one rank -----------------------------------------------------------------


def _failure_worker(rank, port, out, fault):
    """``raise``: rank 0's closure raises at the step's third evaluation. Rank 1 is then blocked in the next
    collective (FSDP's all-gather or reduce-scatter, or TSAM's loss all-reduce), which fails once rank 0
    leaves the group (gloo: connection closed) or at the group's timeout: its step is abandoned too.
    ``nan-shard``: a NaN lands in rank 1's shard of a gradient only (rank 0's shard and the losses stay
    finite): the finiteness verdict is all-reduced, so both ranks raise NonFiniteLossError and restore."""
    _init(rank, port, timeout=30)
    x, y = _half(rank)
    model = _shard(Net(), "ascent")
    opt = _optimizer(model, "ascent")
    _train(model, opt, x, y, "ascent", steps=1)
    params = [p for g in opt.param_groups for p in g["params"]]
    theta0 = [p.to_local().detach().clone() for p in params]
    calls = []
    if fault == "nan-shard" and rank == 1:
        model.inp.weight.register_post_accumulate_grad_hook(
            lambda p: p.grad.to_local()[0, 0].fill_(float("nan")) if len(calls) == 4 else None)

    def closure():
        calls.append(1)
        if fault == "raise" and rank == 0 and len(calls) == 3:
            raise KeyError("data loader broke on rank 0")
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    try:
        opt.step(closure)
        error = None
    except Exception as exc:  # noqa: BLE001 - any error type; what matters is that the step was undone
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if rank == 0 and fault == "raise":
            dist.destroy_process_group()
    restored = all(torch.equal(p.to_local(), t) for p, t in zip(params, theta0))
    torch.save(dict(error=error, restored=restored, step=opt.step_count, grads=[p.grad is None for p in params]),
               os.path.join(out, f"fail{rank}.pt"))
    if rank != 0 or fault != "raise":
        dist.destroy_process_group()


@pytest.mark.parametrize("fault,message", [("raise", "data loader broke"), ("nan-shard", "NonFiniteLossError")])
def test_failure_on_one_rank_restores_every_rank(tmp_path, fault, message):
    run_ranks(_failure_worker, WORLD, free_port(), str(tmp_path), fault, timeout=180)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"fail{rank}.pt")
        assert got["error"] is not None, f"rank {rank} finished a step its peer abandoned"
        assert got["restored"], f"rank {rank}'s shards are not back at theta0"
        assert got["step"] == 1 and all(got["grads"]), f"rank {rank}: state or gradients changed"
    assert message in torch.load(tmp_path / "fail0.pt")["error"]
