#!/usr/bin/env bash
# The test command of the README: set up (idempotent), then run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -P: the checkout's root is not put on sys.path, so its kernels/ folder (installed as tsam_fast._kernels)
# cannot shadow the PyPI package `kernels`, which recent transformers imports when it is installed.
exec "${PYTHON:-python3}" -P -m pytest tests -q "$@"
