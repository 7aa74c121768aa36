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

GOLDEN = torch.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "engine_golden.pt"))
AVAILABLE = {"reference"} | {name for name, device in fused_backends() if device == "cpu"}


@pytest.mark.parametrize("backend,case", [(b, c) for b in BACKENDS for c in VARIANTS])
def test_variant_follows_the_recorded_trajectory_bit_for_bit(backend, case):
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
