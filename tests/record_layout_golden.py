"""Records the golden values of tests/test_layout_golden.py: the noise and 20-step trajectories of the
commit before parameters kept their own storage (4be3f51, flat buffers with re-pointed ``p.data``).

Run from the repository root with that commit checked out: ``python tests/record_layout_golden.py``, then
``TRITON_INTERPRET=1 python tests/record_layout_golden.py`` (adds the Triton kernels' noise, interpreted).
It writes tests/data/layout_golden.pt (parameters as float64 lists, by name). The current code must draw
the same perturbations bit for bit and follow the same trajectories within 1e-6 relative (the order of
fp32 sums may differ).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden_cases import CASES, NOISE_BACKENDS, TRAJECTORY_BACKENDS, noise_points, trajectory  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "layout_golden.pt")


def main() -> None:
    torch.set_num_threads(1)
    data = torch.load(OUT) if os.path.exists(OUT) else {"noise": {}, "trajectory": {}}
    if os.environ.get("TRITON_INTERPRET") == "1":  # the Triton kernels in the interpreter: noise only
        data["noise"]["triton"] = noise_points("triton")
        torch.save(data, OUT)
        print(f"added the triton noise to {OUT}")
        return
    for backend in NOISE_BACKENDS:
        data["noise"][backend] = noise_points(backend)
    for backend in TRAJECTORY_BACKENDS:
        for case in CASES:
            data["trajectory"][(backend, case)] = trajectory(backend, case)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    torch.save(data, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
