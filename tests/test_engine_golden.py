"""The step engine's variants follow, bit for bit, the trajectories recorded before the engine became a
package (tests/record_engine_golden.py): parameters after 7 steps, and every step's sample losses, weights
and tilted loss, for each variant (ascent, adaptive with clipping and delta, random with a ball start and a
relative radius, no start, HMC, shared ascent, the sampled and the top-K backward, the periodic tilt) on the
reference and C++ backends."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import fused_backends
from engine_golden_cases import BACKENDS, VARIANTS, run
from tables import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = [(b, c) for b in BACKENDS for c in VARIANTS]

GOLDEN = torch.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "engine_golden.pt"))
AVAILABLE = {"reference"} | {name for name, device in fused_backends() if device == "cpu"}


@pytest.mark.parametrize("backend,case", CASES)
def test_variant_follows_the_recorded_trajectory_bit_for_bit(backend, case, device_scalars):
    """The device path (scalars on 0-dim tensors, as on CUDA) is the recorded arithmetic, op for op."""
    if backend not in AVAILABLE:
        pytest.skip(f"the {backend} backend does not run on the CPU here")
    got, want = run(backend, case), GOLDEN[(backend, case)]
    for k, (g, w) in enumerate(zip(got["steps"], want["steps"])):
        assert g == w, f"{backend} {case}: step {k}'s losses, weights or tilted loss changed"
    for name in want["params"]:
        assert got["params"][name] == want["params"][name], f"{backend} {case}: {name} after {len(want['steps'])} steps"


def test_the_recorded_steps_differ_between_variants():
    """The cases are not the same trajectory under other names (the test above could not fail otherwise)."""
    finals = {case: GOLDEN[("reference", case)]["params"]["b.weight"] for case in VARIANTS}
    assert len({tuple(v) for v in finals.values()}) == len(VARIANTS)


@pytest.mark.parametrize("backend,case", CASES)
def test_host_scalars_follow_the_recorded_trajectory_closely(backend, case):
    """A CPU step's scalars as host floats (tsam_fast.engine.numbers) compute in float64 what the recorded
    steps computed in fp32: the same trajectory to fp32 rounding, 7 steps on."""
    if backend not in AVAILABLE:
        pytest.skip(f"the {backend} backend does not run on the CPU here")
    got, want = run(backend, case), GOLDEN[(backend, case)]
    for k, (g, w) in enumerate(zip(got["steps"], want["steps"])):
        for key in ("losses", "weights", "tilted"):
            torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(w[key]), rtol=2e-5, atol=1e-6,
                                       msg=f"{backend} {case} step {k} {key}")
    for name in want["params"]:
        torch.testing.assert_close(torch.tensor(got["params"][name]), torch.tensor(want["params"][name]),
                                   rtol=2e-5, atol=1e-6, msg=f"{backend} {case} {name}")
    # the host path runs (its float64 scalars round differently somewhere), except where the only scalar math
    # is the tilt's two exponentials (no start: "random-none"), which round alike here
    assert case == "random-none" or any(got["params"][n] != want["params"][n] for n in want["params"]), f"{backend} {case}: bit-identical"


def test_host_numbers_do_what_the_tensor_ops_do():
    """HostNumbers' functions against the torch ops of the same names, NaN and infinities included."""
    import math

    from tsam_fast.engine.numbers import DeviceNumbers, HostNumbers
    values = [0.0, 1e-30, 0.5, 2.0, 3.0, math.inf, -math.inf, math.nan, -1.5]
    for a in values:
        for name, args in (("sqrt", (abs(a),)), ("exp", (min(a, 80.0),)), ("reciprocal", (a,)),
                           ("clamp_min", (a, 1e-3)), ("clamp_max", (a, 1.0)), ("isfinite", (a,))):
            host = getattr(HostNumbers, name)(*args)
            device = getattr(DeviceNumbers, name)(torch.tensor(args[0], dtype=torch.float64), *args[1:])
            assert (math.isnan(host) and torch.isnan(device)) or host == device.item(), (name, args)
        for b in values:
            for name in ("maximum", "minimum"):
                host = getattr(HostNumbers, name)(a, b)
                device = getattr(DeviceNumbers, name)(torch.tensor(a, dtype=torch.float64),
                                                      torch.tensor(b, dtype=torch.float64))
                assert (math.isnan(host) and torch.isnan(device)) or host == device.item(), (name, a, b)


def test_host_path_is_taken_only_where_its_reads_are_free(monkeypatch):
    """Host floats only for a CPU step in one process without a GradScaler, and every read they make goes
    through HostNumbers.value, which refuses any tensor that is not on the CPU (a read there would be a
    device sync inside the step)."""
    import tsam_fast
    from tsam_fast.engine import numbers
    from tsam_fast.engine.numbers import DeviceNumbers, HostNumbers

    with pytest.raises(RuntimeError, match="device sync inside the step"):
        HostNumbers.value(torch.zeros((), device="meta"))

    def kind(**kw):
        p = torch.nn.Parameter(torch.randn(5))
        run = tsam_fast.TSAM([p], torch.optim.SGD, lr=0.1, backend="reference", **kw).begin_step()
        try:
            return run.step.num
        finally:
            run.abandon()
    assert kind() is HostNumbers
    assert kind(grad_scaler=torch.amp.GradScaler("cpu")) is DeviceNumbers
    monkeypatch.setattr(numbers, "HOST_ON_CPU", False)
    assert kind() is DeviceNumbers

    reads = []  # during CPU steps, every .item() is of a CPU tensor and comes from HostNumbers.value
    original = torch.Tensor.item
    monkeypatch.setattr(numbers, "HOST_ON_CPU", True)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self.device.type) or original(self))
    run(BACKENDS[0], "ascent-adaptive-clip")
    assert reads and set(reads) == {"cpu"}
