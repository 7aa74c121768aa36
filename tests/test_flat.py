"""The layout: parameters keep their storage (frozen, tied, zero-size, odd-layout and strided ones), the
flat gradient buffer, gradients across closure calls, tensors replaced between steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsam_fast import TSAM, rng

from conftest import assert_close
from naive import NaiveTSAM


class Odd(nn.Module):
    """Every awkward parameter at once: frozen, tied, zero-size, transposed, channels_last, unused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.t = nn.Parameter(torch.randn(4, 4).t())  # non-contiguous (transposed) parameter
        self.strided = nn.Parameter(torch.randn(4, 8)[:, ::2])  # not dense: worked on through a copy of ours
        self.empty = nn.Parameter(torch.randn(0, 3))
        self.unused = nn.Parameter(torch.randn(7))
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, img, tok):
        h = self.conv(img).mean(dim=(2, 3))
        h = self.frozen(h) @ self.t @ self.strided + self.empty.sum()
        return self.head(h + self.emb(tok))


def odd_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)


def odd_closure(model, img, tok, zero_grad=None):
    def closure():
        if zero_grad == "model":
            model.zero_grad(set_to_none=True)
        elif zero_grad is not None:
            zero_grad()
        loss = nn.functional.cross_entropy(model(img, tok), tok)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("zero_grad", [None, "model", "opt"])
def test_awkward_parameters_match_naive(zero_grad):
    img, tok = odd_data()
    results = []
    for impl in ("tsam", "naive"):
        torch.manual_seed(0)
        model = Odd()
        frozen0 = [p.detach().clone() for p in model.frozen.parameters()]
        unused0 = model.unused.detach().clone()
        kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, radius=0.05, tilt=2.0)
        if impl == "tsam":
            opt = TSAM(model.parameters(), torch.optim.SGD, backend="reference", **kw)
            zg = (lambda: opt.zero_grad(set_to_none=True)) if zero_grad == "opt" else zero_grad
        else:
            opt = NaiveTSAM(model.parameters(), torch.optim.SGD, **kw)
            zg = "model" if zero_grad else None
        for _ in range(3):
            opt.step(odd_closure(model, img, tok, zg))
        results.append([p.detach().clone() for p in model.parameters()])
        # frozen parameters never move; a parameter without gradients keeps grad=None and is skipped
        # by the base optimizer (no weight decay, no momentum), exactly as torch does
        for p, q in zip(model.frozen.parameters(), frozen0):
            assert torch.equal(p, q) and p.grad is None
        assert torch.equal(model.unused, unused0) and model.unused.grad is None
        if impl == "tsam":
            assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
            assert model.t.stride() == (1, 4)
            assert model.strided.stride() == (8, 2)
            assert model.head.weight is model.emb.weight
            assert model.unused not in opt.state
    for a, b in zip(*results):
        assert_close(a, b, rtol=1e-5, atol=1e-6, what="awkward parameters")


def test_parameters_keep_their_storage_and_grads_view_the_buffer():
    torch.manual_seed(0)
    model = Odd()
    storages = {name: (p.data_ptr(), p.untyped_storage().data_ptr(), p.stride()) for name, p in model.named_parameters()}
    img, tok = odd_data()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    for _ in range(2):
        opt.step(odd_closure(model, img, tok))
        assert {n: (p.data_ptr(), p.untyped_storage().data_ptr(), p.stride())
                for n, p in model.named_parameters()} == storages, "a parameter was re-pointed"
    (bucket,) = opt._layout.buckets
    gbase = bucket.grad.untyped_storage().data_ptr()
    for p in bucket.params:
        if p.grad is not None:
            assert p.grad.untyped_storage().data_ptr() == gbase
    # one run per parameter (the ops' list), merged runs for the noise norms
    assert len(bucket.runs) == len(bucket.params) == len(bucket.theta)
    assert [r[2] for r in bucket.runs] == [p.numel() for p in bucket.params]
    assert sum(r[2] for r in bucket.noise_runs) == bucket.numel and len(bucket.noise_runs) < len(bucket.runs)
    assert len(bucket.staged) == 1 and bucket.staged[0][0] is model.strided


def test_noise_does_not_depend_on_bucketing():
    """A parameter's noise is fixed by its global index, whatever the dtype/group buckets are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2))
    model[1].to(torch.bfloat16)
    theta0 = [p.detach().float().clone() for p in model.parameters()]
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters()) +
                                                        list(model[2].parameters())}]
    opt = TSAM(groups, torch.optim.SGD, lr=0.0, sampler="random", num_samples=1, noise_scale=1e-3,
               radius=1e3, seed=11, backend="reference")
    assert len(opt._layout.buckets if opt._layout else []) == 0
    x = torch.randn(2, 3)
    seen = []

    def closure():
        seen.append([p.detach().float().clone() for p in model.parameters()])
        out = model[2](model[1](model[0](x).bfloat16()).float())
        loss = out.square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(opt._layout.buckets) == 3  # (group 0, fp32), (group 1, bf16), (group 1, fp32)
    assert opt._layout.buckets[2].runs[0][1] == sum(p.numel() for p in list(model.parameters())[:4])
    seed = rng.stream_seed(11, 0, 0, rng.STREAM_START)
    offset = 0
    for p, before, at in zip(model.parameters(), theta0, seen[0]):
        xi = rng.normal(seed, offset, p.numel()).reshape(p.shape)
        tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-6
        expected = (before + 1e-3 * xi).to(p.dtype).float()
        assert_close(at, expected, rtol=tol, atol=1e-7, what="noise by global index")
        offset += p.numel()


def _sum_closure(model, x):
    return lambda: (l := model(x).sum()).backward() or l  # noqa: E731


@pytest.mark.parametrize("change", ["double", "assign-data", "vector_to_parameters"])
def test_replaced_tensors_are_trained_as_torch_optim_trains_them(change):
    """A parameter object whose tensor was replaced after steps (``model.double()``, ``p.data = ...``,
    ``vector_to_parameters``) is trained in its new tensor, as plain SGD trains it: the layout is rebuilt
    over the tensors as they are (docs/design.md §5)."""
    x = torch.randn(3, 4)
    results = []
    for impl in ("tsam", "sgd"):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        if impl == "tsam":
            opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.0, num_samples=1, start="none",
                       backend="reference")
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(inputs):
            if impl == "sgd":
                opt.zero_grad()
            return opt.step(_sum_closure(model, inputs))
        step(x)
        if change == "double":
            model.double()
            inputs = x.double()
        elif change == "assign-data":
            model.weight.data = model.weight.data.clone() * 2
            inputs = x
        else:
            vec = torch.nn.utils.parameters_to_vector(model.parameters())
            torch.nn.utils.vector_to_parameters(vec * 0.5, model.parameters())
            inputs = x
        ptrs = [p.data_ptr() for p in model.parameters()]
        step(inputs)
        step(inputs)
        assert [p.data_ptr() for p in model.parameters()] == ptrs  # trained where the model has them now
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        assert_close(a, b, rtol=1e-6, atol=1e-7, what=f"after {change}")


def test_freezing_and_adding_groups_repack():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    extra = nn.Parameter(torch.randn(3))
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    x = torch.randn(5, 4)

    def closure():
        loss = model(x).square().mean() + extra.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    model[0].requires_grad_(False)
    w0 = model[0].weight.detach().clone()
    opt.step(closure)
    assert torch.equal(model[0].weight, w0) and model[0].weight.grad is None
    assert opt._layout.trainable_numel == sum(p.numel() for p in model[1].parameters())
    opt.add_param_group({"params": [extra], "lr": 0.5, "rho": 0.0})
    e0 = extra.detach().clone()
    opt.step(closure)
    assert not torch.equal(extra, e0)
    assert opt._layout.trainable_numel == sum(p.numel() for p in model[1].parameters()) + 3
    model[0].requires_grad_(True)
    opt.step(closure)
    assert not torch.equal(model[0].weight, w0)


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = TSAM(emb.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    w0 = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(lambda: (l := emb(torch.tensor([1, 2])).sum()).backward() or l)
    assert torch.equal(emb.weight, w0)


@pytest.mark.parametrize("native", [True, False], ids=["cpp-hooks", "python-hooks"])
def test_gradient_marks_with_either_hook(monkeypatch, native):
    """Which parameters received a gradient is marked by the C++ extension's hooks when it is loaded (no
    Python call per parameter in the backward), else by Python hooks; either way a parameter unused in every
    evaluation ends the step with ``grad=None`` (as torch.optim leaves it), a sparse gradient is refused by
    name, and a call with no gradient at all is an error."""
    import tsam_fast
    from tsam_fast import flat
    tsam_fast.backend_info()  # probes the C++ backend: loads the extension where it can run
    if native and flat._native_marker() is None:
        pytest.skip("the C++ extension is not loaded here")
    monkeypatch.setattr(flat, "NATIVE_MARKS", native)
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    opt = TSAM(list(used.parameters()) + list(unused.parameters()), torch.optim.SGD, lr=0.1, backend="reference")
    x = torch.randn(8, 4)
    opt.step(lambda: (loss := used(x).square().mean()).backward() or loss)
    assert (opt._layout._native is not None) == native
    assert all(p.grad is not None for p in used.parameters()) and all(p.grad is None for p in unused.parameters())
    with pytest.raises(RuntimeError, match="no parameter received a gradient"):
        opt.step(lambda: torch.zeros((), requires_grad=True).sum())

    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = TSAM(emb.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"group 0 parameter 0 received a torch.sparse_coo gradient.*sparse=False"):
        opt.step(lambda: (loss := emb(torch.tensor([1, 2])).sum()).backward() or loss)
    assert torch.equal(emb.weight.detach(), before)
