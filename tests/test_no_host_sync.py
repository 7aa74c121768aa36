"""With ``check_finite=False`` (and no GradScaler) a step never reads a tensor's value on the host: no
``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()`` ... anywhere in the optimizer's Python, for every
sampler and option. On the CPU such a read is free, so this is the guard CI can run; on a GPU each would
be a device sync (``tests/test_triton_backend.py::test_step_makes_no_host_sync`` checks that side under
``torch.cuda.set_sync_debug_mode("error")`` in ``bench/gpu_check.sh``)."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch import nn

import tsam_fast
from tsam_fast import TSAM

# the device path's reads, checked on the CPU (a CPU step's host floats read its own CPU scalars by design:
# tsam_fast.engine.numbers)
pytestmark = pytest.mark.usefixtures("device_scalars")

from tables import SAMPLERS, TOYS, config

READS = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist")
BACKENDS = [b for b in ("reference", "cpp") if tsam_fast.backend_info()[b].available]
# every sampler with each option (tables.VARIANTS); delta with a tilt below it (t - delta < 0)
OPTION_SETS = [(), ("clip",), ("delta",), ("adaptive", "ball"), ("sphere",), ("none", "s1")]
CASES = [config(s, *o, **(dict(tilt=0.2) if "delta" in o else {})) for s in SAMPLERS for o in OPTION_SETS
         if not ("adaptive" in o and s != "ascent")]


@pytest.fixture
def host_reads(monkeypatch):
    """Arm with ``armed[0] = True``; every host read of a tensor while armed is recorded with its stack."""
    seen, armed = {}, [False]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def trap(self, *args, _original=original, _name=name, **kwargs):
            if armed[0]:
                seen.setdefault(_name, "".join(traceback.format_stack(limit=8)))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, trap)
    return seen, armed


def _reads_in_a_step(host_reads, backend, tilt=3.0, second_tilt=0.0, warm_steps=1, **kw):
    """The host reads of TSAM's own code in the step after ``warm_steps`` untimed ones (the first builds the
    flat buffers); the closure's reads are not counted."""
    seen, armed = host_reads
    toy = TOYS["gelu-mlp"]
    model = toy.model()
    extra = nn.Linear(3, 3).to(torch.bfloat16)  # a second group, another dtype: two buckets
    x, y = toy.batch()
    ones = torch.ones(3, dtype=torch.bfloat16)
    timing = [False]

    def closure(backward=True):
        armed[0] = False  # the closure's own reads are the user's business
        loss = nn.functional.cross_entropy(model(x), y) + extra(ones).float().sum() * 1e-3
        if backward:
            loss.backward()
        armed[0] = timing[0]
        return loss

    opt = TSAM([{"params": model.parameters(), "tilt": tilt}, {"params": extra.parameters(), "tilt": second_tilt}],
               torch.optim.SGD, lr=0.01, momentum=0.9, check_finite=False, backend=backend, **kw)
    for _ in range(warm_steps):
        opt.step(closure)
    armed[0] = timing[0] = True
    try:
        opt.step(closure)
    finally:
        armed[0] = timing[0] = False
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [c.param() for c in CASES])
def test_step_reads_nothing_on_the_host(host_reads, backend, cfg):
    kw = dict(cfg.options)
    seen = _reads_in_a_step(host_reads, backend, tilt=kw.pop("tilt", 3.0), **kw)
    assert not seen, "host reads inside step:\n" + "\n".join(f"{k}:\n{v}" for k, v in seen.items())


# the options beyond the paper (docs/design.md §3, §9); with tilt_every=2 the step after one warm step is a
# step between full ones, after two warm steps a full one that caches the correction
BEYOND = {
    "shared-ascent": dict(shared_ascent=True, adaptive=True),
    "relative-radius": dict(radius_mode="relative", radius=0.05, start="sphere"),
    "periodic-between": dict(tilt_every=2),
    "periodic-full": dict(tilt_every=2, shared_ascent=True, warm_steps=2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BEYOND))
def test_options_beyond_the_paper_read_nothing_on_the_host(host_reads, backend, name):
    seen = _reads_in_a_step(host_reads, backend, **BEYOND[name])
    assert not seen, "host reads inside step:\n" + "\n".join(f"{k}:\n{v}" for k, v in seen.items())


@pytest.mark.parametrize("select", ["sample", "top"])
def test_tilt_sampled_backward_reads_the_weights_once(host_reads, select):
    """backward_samples picks the drawn samples' seeds on the host: one read per step (the s weights, one
    tolist), documented on the option; nothing else."""
    seen, armed = host_reads
    calls = []
    original = torch.Tensor.tolist

    def counting(self, *args, **kwargs):
        if armed[0]:
            calls.append(1)
        return original(self, *args, **kwargs)
    torch.Tensor.tolist = counting
    try:
        found = _reads_in_a_step(host_reads, "reference", second_tilt=3.0, sampler="random", backward_samples=2,
                                 backward_select=select)
    finally:
        torch.Tensor.tolist = original
    assert set(found) == {"tolist"} and len(calls) == 1, (found, calls)


def test_the_trap_catches_a_read(host_reads):
    seen, armed = host_reads
    armed[0] = True
    bool(torch.ones(()) > 0)
    armed[0] = False
    assert "__bool__" in seen
