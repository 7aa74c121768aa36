#!/usr/bin/env bash
# The Triton backend's GPU check, in one command (issue 4): build, GPU tests, GPU benchmarks.
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else bench/results/gpu_check-<UTC date>)
#
# Stages, each under its own time cap and all within a 460 s budget (under 8 minutes on one H100):
#   1. build:      pip install --no-deps --no-build-isolation -e .
#   2. tests:      tests/test_triton_backend.py (1e8-element parity, buffers over 2**31 elements, a step
#                  under torch.cuda.set_sync_debug_mode("error"), trajectories vs reference and cpp) and
#                  the triton cases of tests/test_ops.py, compiled for the GPU (TRITON_INTERPRET unset)
#   3. gpu_bench:  bench/gpu_bench.py: optimizer overhead per TSAM step (s = 3, ascent, fp32, 50M-500M)
#                  vs the copy-bandwidth floor, plain PyTorch over flat buffers, an authors'-style loop
#                  (GPU_CHECK_SWEEP=1 adds the block-size sweep: about a minute more, mostly compiling)
#   4. throughput: bench/throughput.py --size small (GPU preset, 60 s of timing: end-to-end incl. the GPT-style model)
# Writes OUT_DIR/gpu_check.log (everything printed), OUT_DIR/gpu_check.json (stage results, device,
# versions), OUT_DIR/tests.xml, OUT_DIR/gpu_bench.json and throughput's files. Exit status: 0 when
# every stage passed, 1 otherwise (later stages still run when an earlier one fails, except the build).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-bench/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
STAGES="$OUT_DIR/.stages"
: > "$STAGES"
exec > >(tee -a "$LOG") 2>&1
unset TRITON_INTERPRET  # the GPU run compiles the kernels; the interpreter would take hours at 1e8

BUDGET=${GPU_CHECK_BUDGET_S:-460}
START=$SECONDS

stage() {  # stage NAME CAP_SECONDS COMMAND...: run under min(CAP, time left); record status and time
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        echo "== $name: skipped, ${left}s left of the ${BUDGET}s budget"
        echo "$name skipped 0 $limit" >> "$STAGES"
        return 1
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    rc=$?
    local status=passed
    ((rc == 124 || rc == 137)) && status=timed_out
    ((rc != 0 && rc != 124 && rc != 137)) && status=failed
    echo "== $name: $status (exit $rc) in $((SECONDS - t0))s"
    echo "$name $status $((SECONDS - t0)) $limit" >> "$STAGES"
    return $rc
}

echo "gpu_check: $(date -u +%FT%TZ) in $(pwd), output in $OUT_DIR"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check"
    echo "no_gpu failed 0 0" >> "$STAGES"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>/dev/null || true

FAILED=0
if grep -q no_gpu "$STAGES"; then
    FAILED=1
elif ! stage build 150 "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .; then
    FAILED=1
else
    stage tests 240 "$PY" -m pytest -q -ra -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" \
        tests/test_triton_backend.py tests/test_ops.py -k triton || FAILED=1
    # shellcheck disable=SC2046
    stage gpu_bench 120 "$PY" bench/gpu_bench.py --sizes 50e6,200e6,500e6 --steps 20 \
        $([[ ${GPU_CHECK_SWEEP:-0} == 1 ]] && echo --sweep) --out "$OUT_DIR/gpu_bench.json" || FAILED=1
    if [[ -f bench/throughput.py ]]; then
        stage throughput 120 "$PY" bench/throughput.py --size small --time-budget 60 --out-dir "$OUT_DIR" || FAILED=1
    else
        echo "== throughput: bench/throughput.py not present; skipped"
    fi
fi

"$PY" - "$OUT_DIR" "$STAGES" "$FAILED" "$((SECONDS - START))" <<'PYEOF'
import datetime, json, platform, sys
from pathlib import Path
out, stages_file, failed, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stages = {}
for line in stages_file.read_text().split("\n"):
    if line.strip():
        name, status, secs, limit = line.split()
        stages[name] = dict(status=status, seconds=int(secs), limit_s=int(limit))
record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              passed=not failed, elapsed_s=elapsed, stages=stages, python=platform.python_version())
try:
    import torch
    record["torch"] = torch.__version__
    record["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import triton
    record["triton"] = triton.__version__
except Exception as exc:  # the record says what could not be read
    record["version_error"] = repr(exc)
bench = out / "gpu_bench.json"
if bench.exists():
    record["gpu_bench"] = json.loads(bench.read_text())
(out / "gpu_check.json").write_text(json.dumps(record, indent=2))
print(f"gpu_check: {'PASSED' if not failed else 'FAILED'} in {elapsed}s; wrote {out / 'gpu_check.json'}")
PYEOF
rm -f "$STAGES"
exit "$FAILED"
