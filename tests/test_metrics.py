"""tsam_fast.metrics.sharpness: the definition (against a naive re-computation and a quadratic with a
closed form), determinism per seed, and that the model comes back exactly as it was (parameters bit for
bit, buffers, train/eval flags), also when the loss function raises mid-way."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tsam_fast import TSAM
from tsam_fast.metrics import Sharpness, sharpness

from tables import assert_unchanged, snapshot  # parameters and buffers bit for bit, by name, same objects

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def mlp(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).to(device=device, dtype=dtype)


def batches(sizes=(8, 5), dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 6, generator=g).to(device=device, dtype=dtype),
             torch.randint(0, 3, (b,), generator=g).to(device)) for b in sizes]


class Quadratic(nn.Module):
    """L(w) = a * ||w - c||^2 with w = c: at the minimum, so L(w + delta) - L(w) = a * ||delta||^2."""

    def __init__(self, a, c):
        super().__init__()
        self.a = a
        self.c = c.clone()
        self.w = nn.Parameter(c.clone())

    def forward(self, x):
        return self.a * (self.w - self.c).square().sum()


def quadratic_loss(out, y):
    return out


# -- the definition ----------------------------------------------------------------------------------

@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
def test_matches_naive_computation(relative):
    """Independent re-statement: deep copies perturbed with the same CPU generator stream, the loss
    summed over the concatenated data (not averaged per batch)."""
    model, data = mlp(), batches((8, 5, 1))
    eps, n, seed = 0.1, 6, 7
    got = sharpness(model, F.cross_entropy, data, eps=eps, n=n, seed=seed, relative=relative)

    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    base = F.cross_entropy(model(x), y, reduction="sum").item() / len(y)
    g = torch.Generator().manual_seed(seed)
    rises = []
    for _ in range(n):
        noisy = copy.deepcopy(model)
        with torch.no_grad():
            for p in noisy.parameters():
                xi = torch.randn(p.shape, generator=g)
                p.add_(eps * (p.abs() if relative else 1.0) * xi)
        rises.append(F.cross_entropy(noisy(x), y, reduction="sum").item() / len(y) - base)
    mean = sum(rises) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rises) / (n - 1))
    assert isinstance(got, Sharpness) and got.n == n and got.eps == eps and got.relative is relative
    assert got.base_loss == pytest.approx(base, rel=1e-6)
    assert got.increases == pytest.approx(rises, rel=1e-4, abs=1e-6)
    assert got.mean == pytest.approx(mean, rel=1e-4, abs=1e-6)
    assert got.max == pytest.approx(max(rises), rel=1e-4, abs=1e-6)
    assert got.std == pytest.approx(std, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
def test_sharper_quadratic_gives_larger_value(relative):
    """a = 10 vs a = 0.1 around the same minimum: the same seed gives the same delta_i, so the rises
    are exactly a * ||delta_i||^2 and their ratio is 100; the mean matches E = a eps^2 sum(c^2 or 1)."""
    c = torch.randn(50, generator=torch.Generator().manual_seed(3))
    data = [(torch.zeros(1), torch.zeros(1))]
    eps, n = 0.1, 200
    sharp = sharpness(Quadratic(10.0, c), quadratic_loss, data, eps=eps, n=n, seed=0, relative=relative)
    flat = sharpness(Quadratic(0.1, c), quadratic_loss, data, eps=eps, n=n, seed=0, relative=relative)
    assert sharp.base_loss == 0.0 and flat.base_loss == 0.0
    assert min(flat.increases) > 0 and sharp.mean > flat.mean and sharp.max > flat.max
    assert sharp.mean / flat.mean == pytest.approx(100.0, rel=1e-5)
    expected = 10.0 * eps ** 2 * (c.square().sum().item() if relative else c.numel())
    assert sharp.mean == pytest.approx(expected, rel=0.15)  # 200 draws of a chi-square-like sum


def test_tends_to_zero_with_eps():
    model, data = mlp(torch.float64), batches(dtype=torch.float64)
    small = sharpness(model, F.cross_entropy, data, eps=1e-7, n=4)
    assert abs(small.mean) < 1e-6 and abs(small.max) < 1e-6
    # at a generic point the rise is first order in eps: 1e-7 -> 1e-5 scales it by about 100
    larger = sharpness(model, F.cross_entropy, data, eps=1e-5, n=4)
    assert larger.increases == pytest.approx([100 * r for r in small.increases], rel=1e-2)


def test_deterministic_per_seed_and_different_across_seeds():
    model, data = mlp(), batches()
    a = sharpness(model, F.cross_entropy, data, eps=0.2, n=5, seed=11)
    b = sharpness(model, F.cross_entropy, data, eps=0.2, n=5, seed=11)
    c = sharpness(model, F.cross_entropy, data, eps=0.2, n=5, seed=12)
    assert a == b
    assert a.increases != c.increases and a.base_loss == c.base_loss


def test_one_shot_iterator_is_read_once():
    model, data = mlp(), batches()
    from_list = sharpness(model, F.cross_entropy, data, n=3)
    from_generator = sharpness(model, F.cross_entropy, (b for b in data), n=3)
    assert from_generator == from_list


def test_dataloader():
    model = mlp()
    x, y = torch.randn(13, 6), torch.randint(0, 3, (13,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    got = sharpness(model, F.cross_entropy, loader, n=3)
    whole = sharpness(model, F.cross_entropy, [(x, y)], n=3)  # one batch: the same size-weighted mean
    assert got.base_loss == pytest.approx(whole.base_loss, rel=1e-6)
    assert got.increases == pytest.approx(whole.increases, abs=1e-6)  # fp32 losses of about 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_dtypes_and_devices(device, dtype):
    model, data = mlp(dtype, device), batches(dtype=dtype, device=device)
    before = snapshot(model)
    got = sharpness(model, F.cross_entropy, data, eps=0.05, n=3)
    assert_unchanged(before)
    assert all(math.isfinite(v) for v in (got.mean, got.max, got.std, got.base_loss))
    if dtype == torch.float64 and device != "cpu":  # same seed, same perturbations on any device
        cpu = sharpness(mlp(dtype), F.cross_entropy, batches(dtype=dtype), eps=0.05, n=3)
        assert got.increases == pytest.approx(cpu.increases, rel=1e-6, abs=1e-9)


# -- the model comes back as it was -------------------------------------------------------------------

def test_parameters_restored_bit_exactly():
    model, data = mlp(), batches()
    before = snapshot(model)
    sharpness(model, F.cross_entropy, data, eps=0.3, n=4)
    assert_unchanged(before)


@pytest.mark.parametrize("fail_at", [0, 1, 3], ids=["base-loss", "first-draw", "later-draw"])
def test_parameters_and_modes_restored_when_loss_fn_raises(fail_at):
    model, data = mlp(), batches((4,))
    model.train()
    model[2].eval()  # mixed flags must come back as they were, not all set to the root's
    before = snapshot(model)
    calls = []

    def failing(out, y):
        calls.append(1)
        if len(calls) > fail_at:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        sharpness(model, failing, data, eps=0.5, n=5)
    assert_unchanged(before)
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_modes_restored_and_eval_inside():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(nn.Linear(6, 3), Probe(), nn.Dropout(0.5))
    model.train()
    model[0].eval()
    sharpness(model, F.cross_entropy, batches(), n=2)
    assert seen and not any(seen)
    assert [m.training for m in model.modules()] == [True, False, True, True]


def test_batchnorm_buffers_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model(torch.randn(16, 6))  # non-trivial running statistics
    before = snapshot(model)
    got = sharpness(model, F.cross_entropy, batches(), eps=0.1, n=3)
    assert_unchanged(before)  # running_mean, running_var, num_batches_tracked included
    assert model.training and model[1].training
    # eval mode: the loss uses the running statistics, not the batch's
    model.eval()
    x, y = batches()[0]
    assert got.base_loss != F.cross_entropy(model.train()(x), y).item()


def test_frozen_and_tied_parameters():
    model = mlp()
    model[0].bias.requires_grad_(False)
    head = nn.Linear(3, 3)
    tied = nn.Sequential(model, head, nn.Linear(3, 3))
    tied[2].weight = head.weight  # tied: perturbed once, restored once
    before = snapshot(tied)
    a = sharpness(tied, F.cross_entropy, batches(), n=3)
    assert_unchanged(before)
    only_head = sharpness(tied, F.cross_entropy, batches(), n=3, params=[head.weight, head.weight])
    assert only_head.base_loss == a.base_loss and only_head.increases != a.increases
    assert_unchanged(before)


def test_tsam_flat_buffers_stay_attached():
    """The parameters are written in place: a TSAM optimizer built on the model keeps training it."""
    model, data = mlp(), batches()
    x, y = data[0]
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    before, w0 = snapshot(model), model[0].weight.detach().clone()
    sharpness(model, F.cross_entropy, data, n=2)
    assert_unchanged(before)
    opt.step(closure)  # would raise if the flat views had been detached
    assert not torch.equal(model[0].weight, w0)


# -- bad input ----------------------------------------------------------------------------------------

X, Y = torch.randn(4, 6), torch.randint(0, 3, (4,))
BAD = [
    (dict(eps=0.0), "eps"),
    (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(eps=float("inf")), "eps"),
    (dict(eps=True), "eps"),
    (dict(eps="0.1"), "eps"),
    (dict(n=0), "n=0"),
    (dict(n=2.5), "n=2.5"),
    (dict(n=True), "n=True"),
    (dict(seed=1.5), "seed"),
    (dict(data=[]), "empty"),
    (dict(data=[(X[:0], Y[:0])]), "empty"),
    (dict(data=X), "not a tensor"),
    (dict(data=(X, Y)), "expected an"),
    (dict(data=[(X, Y, Y)]), "expected an"),
    (dict(data=42), "iterable"),
    (dict(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none")), "scalar"),
    (dict(params=[]), "nothing to perturb"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[f"{k}={v!r}"[:40] for (kw, _) in BAD for k, v in kw.items()])
def test_bad_input_raises(kwargs, message):
    model = mlp()
    before = snapshot(model)
    args = dict(model=model, loss_fn=F.cross_entropy, data=[(X, Y)])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sharpness(args.pop("model"), args.pop("loss_fn"), args.pop("data"), **args)
    assert_unchanged(before)
