"""Records tests/data/engine_golden.pt: one trajectory per variant (tests/engine_golden_cases.py), from the
commit before the step engine became a package. Run from the repository root with that commit checked out,
``python tests/record_engine_golden.py``; tests/test_engine_golden.py then asks for every bit of it.

``python tests/record_engine_golden.py --case NAME`` re-records that case alone, on both backends, with the
step's scalars on 0-dim tensors (the device path the test checks bit for bit), and leaves every other case's
bits as they are: for a case whose math changed on purpose (say why in tests/engine_golden_cases.py)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_golden_cases import BACKENDS, VARIANTS, run  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "engine_golden.pt")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=tuple(VARIANTS), default=None, help="re-record this case only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.case is None:
        data = {(backend, case): run(backend, case) for backend in BACKENDS for case in VARIANTS}
    else:
        from tsam_fast.engine import numbers
        numbers.HOST_ON_CPU = False
        data = torch.load(OUT)
        data.update({(backend, args.case): run(backend, args.case) for backend in BACKENDS})
    torch.save(data, OUT)
    print(f"wrote {OUT}: {len(data)} trajectories" + (f" ({args.case} re-recorded)" if args.case else ""))


if __name__ == "__main__":
    main()
