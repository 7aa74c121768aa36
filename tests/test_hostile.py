"""Hostile use: one table of misuses, each of which must fail with an error naming the cause and the fix
and leave everything as it was (parameters bit-exact, gradients, ``state_dict()``, ``step_count``), and
one table of awkward-but-legal uses that must simply work.

Not repeated here (already covered elsewhere):

* a closure raising, or returning NaN/inf, at *every* closure-call position of every sampler:
  ``test_errors.py::test_failing_closure_undoes_the_step`` (reference backend; the rows below add the
  default backend and the full state comparison);
* constructor arguments out of range (``tilt=nan``, ``rho=nan``, ``num_samples=0``, ``radius=-1``, ...):
  ``test_errors.py::BAD_ARGS``; the rows below cover what those miss (base-optimizer options, values
  set in ``param_groups`` after construction, schedules);
* frozen/tied/unused parameters, repacking: ``test_flat.py``.

The rows use ``backend="auto"`` (the C++ backend where it is built), unlike most of the suite.
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import pytest
import torch
from torch import nn

from tsam_fast import TSAM, BackendUnavailable, NonFiniteLossError

from conftest import assert_close
from naive import NaiveTSAM
from tables import TOYS, assert_unchanged, faulty_closure, one_thread, snapshot  # noqa: F401  (one_thread: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TOYS["tiny-mlp"]  # 4-8-3 tanh MLP, loss mean(out^2)
X = TINY.batch()[0]
_mlp = TINY.model


def _clean(model, x=X):
    return TINY.closure(model, (x, None))


def _trained(base=torch.optim.SGD, warm=True, **kw):
    """A small MLP and its TSAM (2 samples: 4 closure calls for ``ascent``), after one step so that the
    base optimizer has state (momentum buffers / Adam moments) that a failure must not touch."""
    model = _mlp()
    base_kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3) if base is torch.optim.SGD else dict(lr=1e-2)
    opt = TSAM(model.parameters(), base, **{**dict(num_samples=2, radius=0.1), **base_kw, **kw})
    if warm:
        opt.step(_clean(model))
    return model, opt


# -- the hostile table ---------------------------------------------------------------------------


@dataclass
class Case:
    """What a row built: the failing call, and what must be unchanged after it."""
    act: Callable[[], object]
    model: Optional[nn.Module] = None
    opt: Optional[TSAM] = None
    others: List[torch.Tensor] = field(default_factory=list)  # further tensors whose values must not move
    in_step: bool = True  # the failing call is a step: it may clear the gradients (it leaves none behind)
    recover: Optional[Callable[[], object]] = None  # a clean closure: after the failure the optimizer still trains
    cleanup: Optional[Callable[[], object]] = None  # undoes what the row set up (e.g. a process group)


# Rows. Each builder sets the scene (the misuse itself included where it is not the failing call) and
# returns the Case whose ``act`` is the call that must fail.

def row_load_state_dict_assign():
    model, opt = _trained()
    old = list(model.parameters())
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # new Parameters
    return Case(lambda: opt.step(_clean(model)), model, opt, others=old)


def row_load_state_dict_assign_before_first_step():
    model, opt = _trained(warm=False)
    old = list(model.parameters())
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    return Case(lambda: opt.step(_clean(model)), model, opt, others=old)


def row_moved_to_meta():
    """``model.to(other device)`` after a step. Without a GPU the other device is ``meta``: ``Module._apply``
    then replaces the Parameter objects (as for cpu -> cuda when the tensor types are incompatible)."""
    model, opt = _trained()
    old = list(model.parameters())
    model.to("meta")
    return Case(lambda: opt.step(_clean(model, X.to("meta"))), model, opt, others=old)


def row_same_param_two_groups():
    model = _mlp()
    w = model[0].weight
    return Case(lambda: TSAM([{"params": [w]}, {"params": [w, model[0].bias]}], torch.optim.SGD, lr=0.1), model,
                in_step=False)


def _closure_row(fault, position, **kw):
    def build():
        model, opt = _trained(**kw)
        return Case(lambda: opt.step(faulty_closure(model, X, position, fault)), model, opt, recover=_clean(model))
    return build


def _returns_row(make_loss):
    def build():
        model, opt = _trained()

        def closure():
            loss = model(X).square()
            return make_loss(loss)
        return Case(lambda: opt.step(closure), model, opt, recover=_clean(model))
    return build


def row_sparse_gradients():
    torch.manual_seed(0)
    model = nn.Embedding(10, 3, sparse=True)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, num_samples=2)
    tok = torch.tensor([1, 2, 2])
    return Case(lambda: opt.step(lambda: (l := model(tok).square().sum()).backward() or l), model, opt)


def row_complex_parameter():
    model = _mlp()
    c = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    return Case(lambda: TSAM(list(model.parameters()) + [c], torch.optim.SGD, lr=0.1, num_samples=2), model,
                others=[c], in_step=False)


def row_complex_parameter_added_later():
    model = _mlp()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, num_samples=2)
    c = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    return Case(lambda: opt.add_param_group({"params": [c]}), model, opt, others=[c], in_step=False)


def row_add_group_backend_cannot_run():
    """An explicit backend that cannot run the new group's device: nothing of the group is added."""
    model = _mlp()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="cpp")
    meta = nn.Parameter(torch.randn(3, device="meta"))
    return Case(lambda: opt.add_param_group({"params": [meta]}), model, opt, in_step=False)


def row_add_group_as_a_set():
    model = _mlp()
    opt = TSAM(model[:1].parameters(), torch.optim.SGD, lr=0.1)
    return Case(lambda: opt.add_param_group({"params": set(model[2].parameters())}), model, opt, in_step=False)


def row_add_group_not_tensors():
    model = _mlp()
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    return Case(lambda: opt.add_param_group({"params": [1.5]}), model, opt, in_step=False)


def _one_rank_group():
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist


def _fsdp2_row(**kw):
    """fully_shard on a 1-rank CPU group (its parameters are DTensors), with an option FSDP2 rules out."""
    def build():
        from torch.distributed.fsdp import fully_shard
        dist = _one_rank_group()
        model = fully_shard(_mlp())
        return Case(lambda: TSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kw), model, in_step=False,
                    cleanup=dist.destroy_process_group)
    return build


def row_tensor_parallel_parameter():
    """A DTensor sharded along its second dimension (tensor parallelism), not fully_shard's Shard(0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist = _one_rank_group()
    model = _mlp()
    mesh = init_device_mesh("cpu", (1,))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(1)]))
    return Case(lambda: TSAM(model.parameters(), torch.optim.SGD, lr=0.1), model, in_step=False,
                cleanup=dist.destroy_process_group)


def row_fsdp1_flattened_parameters():
    """FSDP1 (which needs a GPU) marks the parameters it flattens with ``_fsdp_flattened``."""
    model = _mlp()
    model[0].weight._fsdp_flattened = True
    return Case(lambda: TSAM(model.parameters(), torch.optim.SGD, lr=0.1), model, in_step=False)


def row_only_empty_group():
    model = _mlp()
    opt = TSAM([{"params": []}], torch.optim.SGD, lr=0.1)
    return Case(lambda: opt.step(_clean(model)), model, opt)


def _ctor_row(**kw):
    def build():
        model = _mlp()
        return Case(lambda: TSAM(model.parameters(), torch.optim.SGD, **{"lr": 0.1, **kw}), model, in_step=False)
    return build


def _group_value_row(key, value):
    """A hyperparameter written into ``param_groups`` after construction, as a scheduler would."""
    def build():
        model, opt = _trained()
        opt.param_groups[0][key] = value
        # the row's own write is not the failure under test: compare against the state as written
        return Case(lambda: opt.step(_clean(model)), model, opt)
    return build


def row_tilt_schedule_nan():
    model, opt = _trained(tilt=lambda step: float("nan") if step >= 1 else 1.0)
    return Case(lambda: opt.step(_clean(model)), model, opt, recover=None)


def row_add_group_rho_nan():
    model, opt = _trained()
    extra = nn.Parameter(torch.randn(3))
    return Case(lambda: opt.add_param_group({"params": [extra], "rho": float("nan")}), model, opt, others=[extra],
                in_step=False)


def _load_row(make_source):
    """Load a state_dict built by ``make_source()`` into a trained Adam TSAM over the MLP."""
    def build():
        model, opt = _trained(base=torch.optim.Adam)
        sd = make_source()
        return Case(lambda: opt.load_state_dict(sd), model, opt, in_step=False)
    return build


def _adam_state_of(module_fn, groups_fn=None):
    def make():
        torch.manual_seed(1)
        m = module_fn()
        params = groups_fn(m) if groups_fn else m.parameters()
        o = TSAM(params, torch.optim.Adam, lr=1e-2, num_samples=2)
        o.step(lambda: (l := m(X).square().mean()).backward() or l)
        buf = io.BytesIO()
        torch.save(o.state_dict(), buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)
    return make


class _MLPPlus(nn.Module):
    """The MLP's four parameter shapes, in the same order, then two more."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.c(self.b(torch.tanh(self.a(x))))


def _plain_sgd_state():
    m = _mlp()
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9).state_dict()



_NONFINITE = r"(?s)non-finite loss.*restored.*Lower the learning rate"
_NONFINITE_GRAD = r"(?s)non-finite (loss or )?gradient.*restored.*(Lower|check)"
_REPLACED = r"(?s)(assign=True|replaced|no longer).*(construct|build|re-?create)"

HOSTILE = [
    # parameters replaced or moved under the optimizer
    pytest.param(row_load_state_dict_assign, RuntimeError, _REPLACED, id="load_state_dict-assign"),
    pytest.param(row_load_state_dict_assign_before_first_step, RuntimeError, _REPLACED,
                 id="load_state_dict-assign-before-first-step"),
    pytest.param(row_moved_to_meta, RuntimeError, _REPLACED, id="moved-to-other-device"),
    pytest.param(row_same_param_two_groups, ValueError, r"more than one parameter group", id="same-param-two-groups"),
    # the closure's loss
    pytest.param(_closure_row("nan-loss", 1), NonFiniteLossError, _NONFINITE, id="nan-loss"),
    pytest.param(_closure_row("inf-loss", 3), NonFiniteLossError, _NONFINITE, id="inf-loss"),
    pytest.param(_returns_row(lambda l: (l.sum().backward(), l)[1]), ValueError,
                 r"(?s)scalar loss, got shape \(6, 3\).*\.mean\(\)", id="non-scalar-loss"),
    pytest.param(_returns_row(lambda l: (l.mean().backward(), torch.tensor(3))[1]), TypeError,
                 r"torch\.int64 loss; return the floating-point loss tensor", id="integer-loss"),
    pytest.param(_returns_row(lambda l: l.mean().backward()), ValueError,
                 r"returned None: it must return the loss", id="closure-returns-None"),
    pytest.param(_returns_row(lambda l: l.mean()), RuntimeError,
                 r"(?s)no parameter received a gradient.*must call\s+loss\.backward\(\)", id="never-calls-backward"),
    pytest.param(_closure_row("no-backward", 2), RuntimeError,
                 r"(?s)no parameter received a gradient.*must call\s+loss\.backward\(\)", id="skips-backward-once"),
    # finite loss, non-finite gradient (check_finite=True is the default)
    pytest.param(_closure_row("nan-grad", 0), NonFiniteLossError, _NONFINITE_GRAD, id="nan-grad-ascent-call"),
    pytest.param(_closure_row("nan-grad", 1), NonFiniteLossError, _NONFINITE_GRAD, id="nan-grad-sample-call"),
    pytest.param(_closure_row("inf-grad", 3), NonFiniteLossError, _NONFINITE_GRAD, id="inf-grad-sample-call"),
    pytest.param(_closure_row("nan-grad", 1, sampler="random"), NonFiniteLossError, _NONFINITE_GRAD,
                 id="nan-grad-random-sampler"),
    pytest.param(_closure_row("inf-grad", 0, sampler="hmc"), NonFiniteLossError, _NONFINITE_GRAD,
                 id="inf-grad-hmc-leapfrog-call"),
    pytest.param(_closure_row("inf-grad", 0, sampler="hmc", max_grad_norm=10.0), NonFiniteLossError,
                 _NONFINITE_GRAD, id="inf-grad-hmc-leapfrog-call-clipped"),
    pytest.param(_closure_row("nan-grad", 1, sampler="hmc"), NonFiniteLossError, _NONFINITE_GRAD,
                 id="nan-grad-hmc-sample-call"),
    pytest.param(_closure_row("nan-grad", 1, max_grad_norm=10.0), NonFiniteLossError, _NONFINITE_GRAD,
                 id="nan-grad-sample-call-clipped"),
    # unsupported parameters and gradients
    pytest.param(row_sparse_gradients, RuntimeError, r"(?s)sparse gradients.*sparse_coo.*sparse=False",
                 id="sparse-gradients"),
    pytest.param(row_complex_parameter, ValueError, r"(?s)complex parameters.*view_as_real", id="complex-parameter"),
    pytest.param(row_complex_parameter_added_later, ValueError, r"(?s)complex parameters.*view_as_real",
                 id="complex-parameter-added-later"),
    pytest.param(row_add_group_backend_cannot_run, BackendUnavailable, r"cpp", id="add-group-unrunnable-device"),
    pytest.param(row_add_group_as_a_set, TypeError, r"ordered collections.*use a list", id="add-group-set"),
    pytest.param(row_add_group_not_tensors, TypeError, r"only optimize Tensors.*float", id="add-group-not-tensor"),
    pytest.param(row_tensor_parallel_parameter, NotImplementedError,
                 r"(?s)parameter 0 of group 0 is a DTensor with placements \(Shard\(dim=1\),\).*tensor-parallel"
                 r".*fully_shard", id="tensor-parallel-dtensor"),
    pytest.param(row_fsdp1_flattened_parameters, NotImplementedError,
                 r"(?s)parameter 0 of group 0 is a flattened FSDP1.*fully_shard", id="fsdp1-flattened"),
    pytest.param(_fsdp2_row(grad_scaler=torch.amp.GradScaler("cpu")), ValueError,
                 r"(?s)sharded \(FSDP2\): grad_scaler.*not supported.*bfloat16", id="fsdp2-with-grad-scaler"),
    pytest.param(_fsdp2_row(process_group=None), ValueError,
                 r"(?s)sharded \(FSDP2\), but process_group=None.*averaged over its ranks", id="fsdp2-no-group"),
    pytest.param(row_only_empty_group, ValueError, r"(?s)no trainable parameters.*empty", id="only-an-empty-group"),
    # hyperparameters the constructor checks do not reach
    pytest.param(_ctor_row(lr=float("nan")), ValueError, r"(?s)lr=nan.*finite", id="lr-nan"),
    pytest.param(_ctor_row(weight_decay=float("nan")), ValueError, r"(?s)weight_decay=nan.*finite",
                 id="weight_decay-nan"),
    pytest.param(_ctor_row(max_grad_norm=float("nan")), ValueError, r"max_grad_norm=nan: expected a finite number > 0",
                 id="max_grad_norm-nan"),
    pytest.param(_ctor_row(noise_scale=float("inf")), ValueError, r"noise_scale=inf: expected a finite number >= 0",
                 id="noise_scale-inf"),
    pytest.param(_ctor_row(hmc_sigma=float("nan"), sampler="hmc"), ValueError,
                 r"hmc_sigma=nan: expected a finite number >= 0", id="hmc_sigma-nan"),
    pytest.param(row_tilt_schedule_nan, ValueError, r"tilt \(from the schedule\)=nan: expected a finite number >= 0",
                 id="tilt-schedule-nan"),
    pytest.param(row_add_group_rho_nan, ValueError, r"rho=nan: expected a finite number >= 0", id="add-group-rho-nan"),
    pytest.param(_group_value_row("tilt", float("nan")), ValueError, r"tilt=nan.*expected a finite number",
                 id="group-tilt-nan"),
    pytest.param(_group_value_row("tilt", -1.0), ValueError, r"tilt=-1.0.*>= 0", id="group-tilt-negative"),
    pytest.param(_group_value_row("rho", float("nan")), ValueError, r"rho=nan.*expected a finite number",
                 id="group-rho-nan"),
    pytest.param(_group_value_row("radius", -1.0), ValueError, r"radius=-1.0.*>= 0", id="group-radius-negative"),
    # state_dicts that do not fit
    pytest.param(_load_row(_adam_state_of(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))),
                 ValueError, r"(?s)parameter 0 has shape \(8, 4\) but its saved 'exp_avg' has shape \(5, 4\).*"
                 r"same model", id="state_dict-other-shapes"),
    pytest.param(_load_row(_adam_state_of(_MLPPlus)), ValueError,
                 r"doesn't match the size of optimizer's group", id="state_dict-more-parameters"),
    pytest.param(_load_row(_adam_state_of(_mlp, lambda m: [{"params": m[0].parameters()},
                                                            {"params": m[2].parameters()}])),
                 ValueError, r"different number of parameter groups", id="state_dict-other-groups"),
    pytest.param(_load_row(_plain_sgd_state), ValueError,
                 r"not a TSAM state_dict.*opt\.base_optimizer\.load_state_dict", id="state_dict-plain-torch"),
]


@pytest.mark.parametrize("build,exc,match", HOSTILE)
def test_hostile(build, exc, match):
    case = build()
    try:
        snap = snapshot(case.model, case.opt, case.others)
        with pytest.raises(exc, match=match):
            case.act()
        assert_unchanged(snap, in_step=case.in_step)
    finally:
        if case.cleanup is not None:
            case.cleanup()
    if case.recover is not None:  # the optimizer is not left broken: a clean step trains
        count = case.opt.step_count
        loss = case.opt.step(case.recover)
        assert math.isfinite(float(loss)) and case.opt.step_count == count + 1
        assert all(torch.isfinite(p).all() for p in case.model.parameters())


# -- the works table -----------------------------------------------------------------------------


def _train_pair(make_model, closure_of, steps=3, params_of=None, **kw):
    """The same training under TSAM (default backend) and NaiveTSAM; returns both models."""
    models = []
    for impl in ("tsam", "naive"):
        model = make_model()
        params = params_of(model) if params_of else model.parameters()
        cls = TSAM if impl == "tsam" else NaiveTSAM
        opt = cls(params, torch.optim.SGD, **{**dict(lr=0.1, momentum=0.9, weight_decay=1e-3, radius=0.05,
                                                      tilt=2.0), **kw})
        for _ in range(steps):
            opt.step(closure_of(model))
        models.append((model, opt))
    for p, q in zip(models[0][0].parameters(), models[1][0].parameters()):
        assert_close(p, q, rtol=1e-5, atol=1e-6, what="tsam vs naive")
    return models


class _ZeroSize(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.empty = nn.Parameter(torch.randn(0, 3))
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.lin(x) + self.empty.sum(0))


def works_zero_size_parameter():
    (model, _), _ = _train_pair(_ZeroSize, lambda m: _clean(m))
    assert model.empty.shape == (0, 3)
    only = nn.Parameter(torch.randn(0, 5))  # an optimizer over nothing but a zero-size parameter
    opt = TSAM([only], torch.optim.SGD, lr=0.1, start="sphere")
    assert float(opt.step(lambda: (l := only.sum() + 1.0).backward() or l)) == 1.0


class _OddLayouts(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)
        self.t = nn.Parameter(torch.randn(4, 4).t())  # transposed: dense, non-contiguous
        self.s = nn.Parameter(torch.randn(4, 8)[:, ::2])  # a strided slice: not dense

    def forward(self, img):
        return (self.conv(img).mean(dim=(2, 3)) @ self.t @ self.s).square().mean()


def works_odd_memory_layouts():
    img = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    ref = _OddLayouts()
    assert ref.s.stride() == (8, 2) and not ref.s.is_contiguous()
    (model, opt), _ = _train_pair(_OddLayouts, lambda m: (lambda: (l := m(img)).backward() or l))
    # every parameter keeps its storage and strides (flat.py's promise); a non-dense one is worked on
    # through a contiguous copy of TSAM's and keeps its own layout
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert model.t.stride() == (1, 4) and model.t.grad.stride() == (1, 4)
    assert model.s.stride() == (8, 2) and not model.s.is_contiguous()
    (bucket,) = opt._layout.buckets
    assert [p for p, _ in bucket.staged] == [model.s]


def works_deepcopy_snapshot_and_restore():
    model, opt = _trained()
    snap_model, snap_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt)
    assert snap_opt.step_count == 1 and opt._layout is not None  # the original keeps its layout
    for _ in range(2):
        opt.step(_clean(model))
    after = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(snap_model)  # in place: the parameters keep their storage
    opt.load_state_dict(snap_opt.state_dict())
    for _ in range(2):
        opt.step(_clean(model))
    for p, q in zip(model.parameters(), after):
        assert torch.equal(p, q)


def works_weights_only_resume():
    model, opt = _trained(base=torch.optim.Adam, tilt=3.0, seed=5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(2):
        opt.step(_clean(model))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _mlp()
    model2.load_state_dict(ckpt["model"])
    opt2 = TSAM(model2.parameters(), torch.optim.Adam, lr=1e-2, num_samples=2, radius=0.1, tilt=3.0, seed=0)
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(2):
        opt2.step(_clean(model2))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def _pdata_reassigned(warm):
    """``p.data`` replaced, before the first step or after steps: the new tensor is what gets trained (the
    layout is rebuilt over it), as torch.optim trains it."""
    model, opt = _trained(warm=warm)
    new = torch.zeros(8, 4)
    model[0].weight.data = new
    opt.step(_clean(model))
    assert model[0].weight.data_ptr() == new.data_ptr()
    assert model[0].weight.abs().max() < 0.1 and model[0].weight.abs().max() > 0


def works_pdata_reassigned_before_first_step():
    _pdata_reassigned(warm=False)


def works_pdata_reassigned_after_steps():
    _pdata_reassigned(warm=True)


def works_cast_to_double():
    """``model.double()`` after steps: the step runs in float64 on the same parameter objects."""
    model, opt = _trained()
    model.double()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_clean(model, X.double()))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def works_empty_group_alongside():
    runs = []
    for extra in (False, True):
        model = _mlp()
        groups = [{"params": list(model.parameters())}] + ([{"params": []}] if extra else [])
        opt = TSAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9, num_samples=2, radius=0.1)
        opt.step(_clean(model))
        if extra:
            opt.add_param_group({"params": [], "rho": 0.5})
        opt.step(_clean(model))
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def works_layer_added_after_construction():
    """A layer added to the model but not to the optimizer is not optimized (no error): as with any torch
    optimizer. Its .grad accumulates over every closure call, since neither TSAM nor the closure zeroes it."""
    model, opt = _trained()
    model.append(nn.Linear(3, 3))
    new = [p.detach().clone() for p in model[3].parameters()]
    old = [p.detach().clone() for p in model[:3].parameters()]
    for _ in range(2):
        assert math.isfinite(float(opt.step(_clean(model))))
    for p, q in zip(model[3].parameters(), new):
        assert torch.equal(p, q) and p.grad is not None
    for p, q in zip(model[:3].parameters(), old):
        assert not torch.equal(p, q)
    assert opt.step_count == 3


def works_huge_finite_losses():
    """README: 'weights never overflow, underflow to zero or turn NaN for finite losses'. Finite losses
    ~1e37 with tilt 100: tilt * loss exceeds the fp32 range, the weights must still be softmax(t L)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = TSAM(model.parameters(), torch.optim.SGD, lr=1e-40, tilt=100.0, sampler="random", num_samples=2,
               radius=0.1)
    opt.step(lambda: (l := model(X).square().mean() * 1e37 + 1e37).backward() or l)
    assert torch.isfinite(opt.last_losses).all()
    assert torch.isfinite(opt.last_weights).all(), f"weights {opt.last_weights.tolist()}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


WORKS = [
    works_zero_size_parameter,
    works_odd_memory_layouts,
    works_deepcopy_snapshot_and_restore,
    works_weights_only_resume,
    works_pdata_reassigned_before_first_step,
    works_pdata_reassigned_after_steps,
    works_cast_to_double,
    works_empty_group_alongside,
    works_layer_added_after_construction,
    works_huge_finite_losses,
]


@pytest.mark.parametrize("fn", WORKS, ids=lambda f: getattr(f, "__name__", str(f)).replace("works_", ""))
def test_works(fn):
    fn()
