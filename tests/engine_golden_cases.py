"""The cases of tests/test_engine_golden.py: one trajectory per variant of the step, recorded bit for bit
from the commit before the step engine became a package (tests/record_engine_golden.py, at
commit 7061d99, the last of the single-file engine). A refactoring of the engine must not change a single bit of any of them.

Each case runs 7 steps (enough for the periodic tilt's full, between and next full steps) on the golden
model of tests/golden_cases.py, with its two param groups (tilts and rho differ) where the variant allows,
and records the parameters and every step's sample losses, tilt weights and tilted loss.

Re-recorded since, on purpose, and only that case (``python tests/record_engine_golden.py --case NAME``):

- ``tilt-every`` (2026-12-04, branch periodic-tilt): a step between full ones hands the base optimizer
  beta g + ||g|| v/||g0|| (beta = G.g0/||g0||^2, the tilted gradient's own part along g0) where it handed
  g + ||g|| v/||g0||, which dropped the tilt's stretch along g0: about 9% shorter steps, behind TSAM on a
  short schedule (docs/results/2026-12-04-periodic-tilt.md).
  Its full steps, and every other case, are the bits recorded at 7061d99.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch.nn import functional as F

from golden_cases import _values, batch, groups, make_model
from tsam_fast import TSAM

STEPS = 7
BACKENDS = ("reference", "cpp")

# name -> (TSAM options, whether the two param groups (different tilts) apply)
VARIANTS: Dict[str, tuple] = {
    "ascent": (dict(sampler="ascent", num_samples=3, radius=0.05, noise_scale=0.01), True),
    "ascent-adaptive-clip": (dict(sampler="ascent", adaptive=True, max_grad_norm=0.5, num_samples=2, radius=0.05,
                                  noise_scale=0.01, delta=0.3), True),
    "random-ball-relative": (dict(sampler="random", start="ball", radius_mode="relative", num_samples=3,
                                  radius=0.01), True),
    "random-none": (dict(sampler="random", start="none", num_samples=2), True),
    "hmc": (dict(sampler="hmc", num_samples=2, hmc_steps=3, hmc_step_size=0.02, hmc_sigma=0.5, start="sphere",
                 radius=0.03), True),
    "shared-ascent": (dict(sampler="ascent", shared_ascent=True, num_samples=3, radius=0.05), True),
    "backward-samples": (dict(sampler="random", backward_samples=2, num_samples=4, radius=0.05, tilt=3.0), False),
    "backward-top-shared": (dict(sampler="ascent", shared_ascent=True, backward_samples=2, backward_select="top",
                                 num_samples=3, radius=0.05, tilt=3.0, max_grad_norm=1.0), False),
    "tilt-every": (dict(sampler="ascent", tilt_every=3, num_samples=2, radius=0.05), True),
}


def run(backend: str, case: str) -> dict:
    options, two_groups = VARIANTS[case]
    model = make_model()
    params = groups(model) if two_groups else model.parameters()
    opt = TSAM(params, torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4, rho=0.05, seed=7,
               backend=backend, **options)
    x, y = batch()

    def closure(backward=True):
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss
    steps = []
    for _ in range(STEPS):
        tilted = opt.step(closure)
        steps.append(dict(tilted=tilted.item(), losses=opt.last_losses.tolist(), weights=opt.last_weights.tolist()))
    return dict(params=_values(model), steps=steps)
