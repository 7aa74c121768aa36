#!/usr/bin/env bash
# The README's main job: set up (idempotent), then run the throughput benchmark with its default sizes
# (CPU "small": about 2 minutes on 2 cores, held to a 180 s time budget for checks, warm-ups and timing;
# GPU sizes when CUDA is present). Progress on stderr (a line per phase when it is not a terminal), the
# tables and a one-line verdict per backend on stdout; files in $TSAM_FAST_RESULTS, else
# ~/.cache/tsam_fast/results (nothing is written into the checkout; --record writes bench/results/).
# Options pass through:
#   bash scripts/bench.sh --size medium        bash scripts/bench.sh --help
#   bash scripts/bench.sh > bench.log 2>&1     (CI, nohup: the log says what runs, with elapsed seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" bench/throughput.py "$@"
