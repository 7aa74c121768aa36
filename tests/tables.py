"""The test suite's one database of inputs and shared checks (in the spirit of torch's ``OptimizerInfo``):

* ``CONFIGS``: named TSAM option sets (sampler, sample count, start, clipping, ...) with readable ids, built
  from ``SAMPLERS`` and ``VARIANTS`` by ``config()``; ``Config.evaluations()`` is the number of closure
  calls one step makes, read from ``TSAM.evaluations_per_step`` (never hard-coded in a test), and
  ``positions()`` lists every closure-call position of a step for the failure tests;
* ``TOYS``: the small models the tests train, each with fixed seeds, its data and a clean closure;
* ``snapshot()`` / ``assert_unchanged()``: "nothing changed" after a failed call (parameters, buffers and
  gradients bit for bit, the optimizer's state_dict deep-compared, base-optimizer state, step_count);
* ``faulty_closure()``: a closure that raises, returns a NaN/inf loss or leaves a NaN/inf gradient (or
  no gradient) at one closure-call position and is clean otherwise;
* ``one_thread``: a module fixture for tests of tiny models (one thread is faster, and far faster when
  other work shares the cores).

A test takes a config and adds the scale it needs: ``CONFIGS["hmc"].build(model, lr=0.1, radius=0.05)``
(the config's own options win over the test's base options; ``Config.but`` derives a variant).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from tsam_fast import TSAM

# -- sampler configurations ------------------------------------------------------------------------

# The three samplers with the sample count most tests use: 2 samples have a first and a later one (the
# tilt accumulation's two paths) and keep the closure-call tables short; hmc with 2 leapfrog steps.
SAMPLERS: Dict[str, Dict[str, Any]] = {
    "ascent": dict(sampler="ascent", num_samples=2),
    "random": dict(sampler="random", num_samples=2),
    "hmc": dict(sampler="hmc", num_samples=2, hmc_steps=2),
}

# Options that combine with a sampler (``adaptive``: ascent only). Scale options (tilt, radius, rho, lr)
# are the test's business, except where a variant is defined by one.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "adaptive": dict(adaptive=True),
    "clip": dict(max_grad_norm=0.5),
    "delta": dict(delta=0.5),
    "sphere": dict(start="sphere"),
    "ball": dict(start="ball"),
    "none": dict(start="none"),
    "s1": dict(num_samples=1),
    "shared": dict(shared_ascent=True),  # one ascent gradient at theta0 for all samples (s + 1 evaluations)
}

# The second param group of a two-group config: the model's biases (and other parameters of < 2 dims),
# with their own rho and tilt and no weight decay.
SECOND_GROUP = dict(rho=0.02, tilt=0.5, weight_decay=0.0)


@dataclass(frozen=True)
class Config:
    """A named TSAM option set. ``group``: None for one param group, else the overrides of a second group
    that holds the parameters of fewer than 2 dimensions (biases); the weights stay in group 0."""

    id: str
    options: Mapping[str, Any]
    group: Optional[Mapping[str, Any]] = None

    def __repr__(self) -> str:
        return f"Config({self.id})"

    def but(self, id: Optional[str] = None, group: Any = ..., **options) -> "Config":
        """A variant: these options replace or extend the config's (``id`` defaults to the same id)."""
        return replace(self, id=id or self.id, options={**self.options, **options},
                       group=self.group if group is ... else group)

    def kwargs(self, **base) -> Dict[str, Any]:
        """TSAM keyword arguments: the test's ``base`` options, then the config's (which win)."""
        return {**base, **self.options}

    def params(self, model_or_params):
        """The parameters of a module (or an iterable of them), split into two groups if the config says so."""
        params = list(model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params)
        if self.group is None:
            return params
        return [{"params": [p for p in params if p.dim() >= 2]},
                {"params": [p for p in params if p.dim() < 2], **self.group}]

    def build(self, model_or_params, base_optimizer=torch.optim.SGD, **base) -> TSAM:
        return TSAM(self.params(model_or_params), base_optimizer, **self.kwargs(**base))

    def evaluations(self) -> int:
        """Closure calls per step, as the optimizer reports it (``TSAM.evaluations_per_step``)."""
        return evaluations(self.options)

    def param(self, *marks):
        return pytest.param(self, id=self.id, marks=marks)


def config(sampler: str, *variants: str, id: Optional[str] = None, **options) -> Config:
    """``config("hmc", "sphere")`` is the hmc sampler with the sphere start, id ``"hmc-sphere"``."""
    if "adaptive" in variants and sampler != "ascent":
        raise ValueError(f"adaptive needs the ascent sampler, not {sampler!r}")
    merged = dict(SAMPLERS[sampler])
    for v in variants:
        merged.update(VARIANTS[v])
    merged.update(options)
    return Config(id or "-".join((sampler,) + variants), merged)


def _table(*configs: Config) -> Dict[str, Config]:
    out = {}
    for c in configs:
        assert c.id not in out, f"duplicate config id {c.id}"
        out[c.id] = c
    return out


CONFIGS: Dict[str, Config] = _table(
    config("ascent"),
    config("ascent", "adaptive"),
    config("ascent", "clip"),
    config("ascent", "sphere"),
    config("ascent", "ball"),
    config("ascent", "none"),
    config("ascent", "none", "s1", id="sam"),  # exactly SAM (Foret et al.)
    config("ascent", "shared", "adaptive"),
    config("random"),
    config("random", "delta"),
    config("hmc"),
    config("hmc", "sphere"),
    replace(config("ascent"), id="two-groups", group=SECOND_GROUP),
)


def configs(*ids: str) -> List[Any]:
    """pytest params of the named configs (all of them without ids), each with its id."""
    return [CONFIGS[i].param() for i in (ids or CONFIGS)]


_EVALUATIONS: Dict[Tuple, int] = {}


def evaluations(options: Mapping[str, Any]) -> int:
    """``TSAM.evaluations_per_step`` of these options (a throwaway optimizer on a 1-element parameter)."""
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    if key not in _EVALUATIONS:
        p = nn.Parameter(torch.zeros(1))
        _EVALUATIONS[key] = TSAM([p], torch.optim.SGD, lr=0.1, backend="reference", **options).evaluations_per_step
    return _EVALUATIONS[key]


def positions(*configs_: Config) -> List[Any]:
    """pytest params ``(config, k)`` for every closure-call position k of one step of each config."""
    return [pytest.param(c, k, id=f"{c.id}-{k}") for c in configs_ for k in range(c.evaluations())]


# -- toy models --------------------------------------------------------------------------------------

def square_mean(out: torch.Tensor, y=None) -> torch.Tensor:
    return out.square().mean()


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), y)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y)


class FrozenNet(nn.Module):
    """Two layers to train with a frozen one between them (so buckets have several runs); the first bias
    may be cast to bf16 (a mixed-dtype model), the forward casts it back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(13, 17)
        self.frozen = nn.Linear(17, 17)
        self.b = nn.Linear(17, 6)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.a.weight, self.a.bias.to(self.a.weight.dtype)))
        return self.b(torch.tanh(self.frozen(h)))


def _bf16_first_bias(net: FrozenNet) -> FrozenNet:
    net.a.bias.data = net.a.bias.data.to(torch.bfloat16)
    return net


def _classes(g, n, d, k):
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _rule_classes(g):
    """128 points in 20 dimensions, 3 classes by a fixed rule (learnable: the loss falls quickly)."""
    x = torch.randn(128, 20, generator=g)
    return x, (x[:, :5].sum(1) > 0).long() + (x[:, 5] > 1).long()


@dataclass(frozen=True)
class Toy:
    """A small model (built under ``torch.manual_seed(seed)``), its data (drawn from a generator seeded
    with ``data_seed``: the same values on every device) and its loss ``loss(model(x), y)``."""

    id: str
    make: Callable[[], nn.Module]
    data: Callable[[torch.Generator], Tuple[torch.Tensor, Optional[torch.Tensor]]]
    loss: Callable[..., torch.Tensor]
    seed: int = 0
    data_seed: int = 1
    doc: str = ""

    def __repr__(self) -> str:
        return f"Toy({self.id})"

    def model(self, device=None, dtype=None, seed: Optional[int] = None) -> nn.Module:
        torch.manual_seed(self.seed if seed is None else seed)
        return self.make().to(device=device, dtype=dtype)

    def batch(self, device=None, dtype=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(x, y)``; ``dtype`` casts the floating-point tensors only."""
        x, y = self.data(torch.Generator().manual_seed(self.data_seed))
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
        return cast(x), cast(y)

    def closure(self, model: nn.Module, batch=None, log: Optional[list] = None):
        """The clean closure: loss, backward, return the loss. ``log`` collects the parameters' values at
        each call (the points the optimizer evaluates)."""
        x, y = self.batch() if batch is None else batch

        def closure():
            if log is not None:
                log.append([p.detach().clone() for p in model.parameters()])
            loss = self.loss(model(x), y)
            loss.backward()
            return loss
        return closure

    def param(self, *marks):
        return pytest.param(self, id=self.id, marks=marks)


TOYS: Dict[str, Toy] = {t.id: t for t in (
    Toy("linear", lambda: nn.Linear(4, 3), lambda g: (torch.randn(6, 4, generator=g), None), square_mean,
        data_seed=0, doc="Linear(4, 3) on 6 points, loss mean(out^2): the error tests' smallest model"),
    Toy("tiny-mlp", lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
        lambda g: (torch.randn(6, 4, generator=g), None), square_mean, data_seed=0,
        doc="4-8-3 tanh MLP on 6 points, loss mean(out^2): the hostile table's model"),
    Toy("small-mlp", lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)),
        lambda g: _classes(g, 32, 6, 3), cross_entropy,
        doc="6-16-3 tanh MLP, 32 points, 3 classes: the optimizer tests against the naive TSAM"),
    Toy("mlp", lambda: nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)),
        lambda g: _classes(g, 32, 20, 5), cross_entropy, doc="20-64-64-5 MLP, 32 points, 5 classes"),
    Toy("cnn", lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(8 * 7 * 7, 5)),
        lambda g: (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)), cross_entropy,
        doc="two convolutions and a linear head, 8 images 3x16x16, 5 classes"),
    Toy("frozen-net", FrozenNet, lambda g: (torch.randn(32, 13, generator=g), torch.randn(32, 6, generator=g)), mse,
        seed=7, doc="13-17-17-6 with the middle layer frozen, regression (mse)"),
    Toy("frozen-net-bf16", lambda: _bf16_first_bias(FrozenNet()),
        lambda g: (torch.randn(32, 13, generator=g), torch.randn(32, 6, generator=g)), mse, seed=7,
        doc="frozen-net with its first bias in bf16 (a mixed-dtype model: fp32 and bf16 parameters)"),
    Toy("gelu-mlp", lambda: nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3)),
        _rule_classes, cross_entropy, data_seed=0,
        doc="20-64-64-3 GELU MLP on 128 points of 3 rule-defined classes: trains fast (mixed precision tests)"),
)}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and far faster when other work shares the cores (OpenMP workers
    then wait on each other: ~50x slower steps were measured on a busy 2-core VM). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` after importing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- "nothing changed" -------------------------------------------------------------------------------

def bits(t: torch.Tensor):
    """(dtype, shape, device type, raw bytes): equality of these is bit-exact equality (NaN == NaN)."""
    t = t.detach()
    if t.device.type == "meta":
        return (t.dtype, tuple(t.shape), "meta", None)
    return (t.dtype, tuple(t.shape), t.device.type, t.cpu().contiguous().reshape(-1).view(torch.uint8).clone())


def same_bits(a, b) -> bool:
    return a[:3] == b[:3] and (a[3] is None or torch.equal(a[3], b[3]))


def assert_same(a, b, path="state_dict"):
    """Deep equality of nested state: tensors bit-exact, floats equal (NaN == NaN), same keys and types."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and same_bits(bits(a), bits(b)), f"{path} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path} changed: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), f"{path} changed: {a!r} != {b!r}"
    else:
        assert a == b, f"{path} changed: {a!r} != {b!r}"


@dataclass
class Snapshot:
    model: Optional[nn.Module]
    opt: Optional[TSAM]
    values: List[Tuple[torch.Tensor, Any]]
    grads: List[Tuple[torch.Tensor, Any]]
    named: Optional[List[Tuple[str, torch.Tensor]]] = None
    state_dict: Any = None
    base_state: Optional[List[Tuple[torch.Tensor, Dict[str, Any]]]] = None
    step_count: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def _unique(*pools: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    out, seen = [], set()
    for pool in pools:
        for t in pool:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def _opt_params(opt) -> List[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]] if opt is not None else []


def snapshot(model: Optional[nn.Module] = None, opt: Optional[TSAM] = None,
             others: Sequence[torch.Tensor] = ()) -> Snapshot:
    """Everything a failed call must leave as it was: the values of the model's parameters and buffers, of
    ``others`` and of the optimizer's parameters (bit for bit), the model's tensors by name (same objects),
    the optimizer parameters' gradients, the optimizer's ``state_dict()`` (deep copy), the base
    optimizer's per-parameter state and ``step_count``."""
    tensors = _unique(model.parameters() if model is not None else (), model.buffers() if model is not None else (),
                      others, _opt_params(opt))
    opt_ids = {id(p) for p in _opt_params(opt)}
    snap = Snapshot(model, opt, values=[(t, bits(t)) for t in tensors],
                    grads=[(t, None if t.grad is None else bits(t.grad)) for t in tensors if id(t) in opt_ids])
    if model is not None:
        snap.named = list(model.state_dict(keep_vars=True).items())
    if opt is not None:
        snap.state_dict = copy.deepcopy(opt.state_dict())
        snap.base_state = [(p, {k: bits(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()})
                           for p, s in opt.base_optimizer.state.items()]
        snap.step_count = opt.step_count
    return snap


def assert_unchanged(snap: Snapshot, in_step: bool = True):
    """Nothing in ``snap`` moved. ``in_step``: the failed call was a step, which may clear the gradients
    (it leaves none behind); other gradients must be as they were."""
    for i, (t, before) in enumerate(snap.values):
        assert same_bits(bits(t), before), f"tensor {i} ({tuple(t.shape)}) changed"
    if snap.named is not None:
        now = snap.model.state_dict(keep_vars=True)
        assert list(now) == [k for k, _ in snap.named], f"module entries {list(now)} != {[k for k, _ in snap.named]}"
        for k, t in snap.named:
            assert now[k] is t, f"{k} was replaced by another tensor"
    for i, (t, before) in enumerate(snap.grads):
        if t.grad is None and in_step:
            continue  # a failed step leaves no gradients behind
        assert (t.grad is None) == (before is None), f"gradient {i}: presence changed"
        if before is not None:
            assert same_bits(bits(t.grad), before), f"gradient {i} changed"
    opt = snap.opt
    if opt is not None:
        assert opt.step_count == snap.step_count, "step_count changed"
        assert_same(opt.state_dict(), snap.state_dict)
        state = opt.base_optimizer.state
        assert {id(p) for p in state} == {id(p) for p, _ in snap.base_state}, "base optimizer state: parameters changed"
        for i, (p, before) in enumerate(snap.base_state):
            now = state[p]
            assert set(now) == set(before), f"base optimizer state {i}: keys changed"
            for k, v in before.items():
                if isinstance(now[k], torch.Tensor):
                    assert same_bits(bits(now[k]), v), f"base optimizer state {i}[{k!r}] changed"
                else:
                    assert_same(now[k], v, f"base optimizer state {i}[{k!r}]")
        assert opt.closure_index is None


# -- failing closures --------------------------------------------------------------------------------

FAULTS = ("raise", "nan-loss", "inf-loss", "nan-grad", "inf-grad", "no-backward")


class DataLoaderBroke(KeyError):
    """What a ``raise`` fault raises (a KeyError, like a broken data pipeline)."""


def faulty_closure(model: nn.Module, x: torch.Tensor, position: int, fault: str,
                   loss: Callable[[torch.Tensor], torch.Tensor] = square_mean):
    """A closure computing ``loss(model(x))`` that misbehaves at closure call ``position`` of a step
    (0-based; build one closure per step) and is clean at every other call. Faults:

    * ``raise``: raises ``DataLoaderBroke`` (a KeyError) before the backward;
    * ``nan-loss`` / ``inf-loss``: the loss times NaN / inf (its gradient is non-finite too);
    * ``nan-grad``: a finite loss with a NaN gradient (adds d/dw sqrt(0 * w) = 0 * inf on the model's first
      parameter);
    * ``inf-grad``: the closure scribbles an inf on the first parameter's gradient after backward;
    * ``no-backward``: returns the loss without calling backward.
    """
    if fault not in FAULTS:
        raise ValueError(f"fault={fault!r}: expected one of {FAULTS}")
    first = next(iter(model.parameters()))
    calls = []

    def closure():
        calls.append(None)
        hit = len(calls) - 1 == position
        value = loss(model(x))
        if hit and fault == "raise":
            raise DataLoaderBroke("data loader broke")
        if hit and fault == "nan-loss":
            value = value * float("nan")
        elif hit and fault == "inf-loss":
            value = value * float("inf")
        elif hit and fault == "nan-grad":
            value = value + torch.sqrt(first[(0,) * first.dim()] * 0.0)
        if not (hit and fault == "no-backward"):
            value.backward()
        if hit and fault == "inf-grad":
            first.grad[(0,) * first.dim()] = float("inf")
        return value
    return closure


# -- real ranks ------------------------------------------------------------------------------------


def one_step(opt: TSAM, evaluate: Callable[[], torch.Tensor], loop: bool):
    """One TSAM step whose evaluations call ``evaluate()`` (forward, backward, return the loss), driven by
    ``step(closure)`` or, with ``loop``, by the closure-free ``begin_step()`` loop."""
    if not loop:
        return opt.step(evaluate)
    run = opt.begin_step()
    for _ in run:
        run.record(evaluate())
    return run.finish()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable, world: int, *args, timeout: float = 300.0) -> None:
    """``fn(rank, *args)`` in ``world`` spawned processes. A rank that raises fails the test with its
    traceback and the others are terminated (torch.multiprocessing's join); a run that outlives ``timeout``
    seconds (a rank stuck in a collective) is terminated and fails the test: a test never hangs."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"{world} ranks of {getattr(fn, '__name__', fn)} still running after {timeout:.0f}s: "
                                 "a rank is stuck (killed)")


# -- the examples/ recipes ---------------------------------------------------------------------------

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def recipe(module: str, package: str):
    """An examples/ recipe as a module; the test skips, naming the package, only if it cannot be imported
    (the README's test command installs the `integrations` extra)."""
    pytest.importorskip(package, reason=f"{package} is not installed (pip install -e '.[integrations]', or "
                                        "bash scripts/setup.sh)")
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    return importlib.import_module(module)
