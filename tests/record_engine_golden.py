"""Records tests/data/engine_golden.pt: one trajectory per variant (tests/engine_golden_cases.py), from the
commit before the step engine became a package. Run from the repository root with that commit checked out,
``python tests/record_engine_golden.py``; tests/test_engine_golden.py then asks for every bit of it."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_golden_cases import BACKENDS, VARIANTS, run  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "engine_golden.pt")


def main() -> None:
    torch.set_num_threads(1)
    data = {(backend, case): run(backend, case) for backend in BACKENDS for case in VARIANTS}
    torch.save(data, OUT)
    print(f"wrote {OUT}: {len(data)} trajectories")


if __name__ == "__main__":
    main()
