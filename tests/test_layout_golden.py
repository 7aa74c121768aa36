"""Parameters keep their own storage, and the noise did not move: the perturbations of a seed and 20-step
trajectories equal those recorded from the flat-buffer layout before it (tests/record_layout_golden.py,
commit 4be3f51), on a model with a channels_last convolution, a frozen layer between trainable ones, an
empty and a 1-element parameter, a bf16 parameter and two param groups.

* The noise (the points of one random-sampler step, theta0 + c xi_j) is bit for bit the recorded one, on
  every backend recorded (the Triton kernels interpreted on the CPU).
* Trajectories agree within 1e-6 relative: the ops now run per parameter segment, so fp32 and fp64 sums
  may add in another order.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import assert_close, fused_backends
from golden_cases import CASES, TRAJECTORY_BACKENDS, make_model, noise_points, trajectory
from tables import one_thread  # noqa: F401

# recorded with the scalars on 0-dim tensors: the device path's arithmetic (tsam_fast.engine.numbers)
pytestmark = pytest.mark.usefixtures("one_thread", "device_scalars")

GOLDEN = torch.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "layout_golden.pt"))
AVAILABLE = {"reference"} | {name for name, device in fused_backends() if device == "cpu"}


def _need(backend):
    if backend not in AVAILABLE:
        pytest.skip(f"the {backend} backend does not run on the CPU here")


@pytest.mark.parametrize("backend", sorted(GOLDEN["noise"]))
def test_noise_is_the_recorded_one_bit_for_bit(backend):
    _need(backend)
    got, want = noise_points(backend), GOLDEN["noise"][backend]
    assert len(got) == len(want)
    for j, (g, w) in enumerate(zip(got, want)):
        assert list(g) == list(w)
        for name in w:
            assert g[name] == w[name], f"evaluation {j}, {name}: the perturbation changed"


@pytest.mark.parametrize("backend,case", [(b, c) for b in TRAJECTORY_BACKENDS for c in CASES])
def test_trajectory_within_1e_6_of_the_recorded_one(backend, case):
    _need(backend)
    got, want = trajectory(backend, case), GOLDEN["trajectory"][(backend, case)]
    for name in want:
        assert_close(torch.tensor(got[name], dtype=torch.float64), torch.tensor(want[name], dtype=torch.float64),
                     rtol=1e-6, atol=1e-7, what=f"{backend} {case} {name} after 20 steps")


def test_golden_model_has_the_awkward_parameters():
    """The recorded model exercises what the layout must handle (so the tests above can fail)."""
    model = make_model()
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv.weight.is_contiguous()
    assert model.empty.numel() == 0 and model.scale.numel() == 1
    assert model.low.dtype == torch.bfloat16
    assert not model.frozen.weight.requires_grad
