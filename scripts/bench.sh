#!/usr/bin/env bash
# The README's main job: set up (idempotent), then run the throughput benchmark with its default sizes
# (CPU "small": under 3 minutes on 2 cores; GPU sizes when CUDA is present). Options pass through:
#   bash scripts/bench.sh --size medium        bash scripts/bench.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" bench/throughput.py "$@"
