#!/usr/bin/env bash
# Every GPU-only path of fusionpipe once, and the GPU ratios of docs/benchmarks.md (P1, P3, P4, P5), in one
# script sized for one H100 in under 8 minutes. Run it whenever a GPU machine is at hand and put its summary
# into docs/benchmarks.md, dated. On a machine without a GPU it runs what a CPU can of the same paths and
# prints SKIP for the rest.
#
#   bash bench/gpu_check.sh                 # from the repository root or anywhere
#   VENV=/opt/venv PYTHON=python3.12 bash bench/gpu_check.sh
#
# Install: the venv (made if missing, seeing the system's packages: a GPU machine's own CUDA torch is used as it is), torch
# only if there is none (the default index's Linux wheel is a CUDA build), then fusionpipe and its
# dependencies. A machine without network access needs them in the system's site-packages already.
# Parts, each under its own time limit; one whose limit would end past TOTAL seconds (470: under 8 minutes
# with the install of a machine that has torch) is skipped and says so:
#   logic   tests/test_gpu_logic.py: the device choice, RNG states, pinning and host syncs, proved without a GPU
#   paths   bench/gpu_check.py: extraction with helpers (fp16, fp32, cuda:1), the compact path, host syncs
#           counted by torch.cuda.set_sync_debug_mode, resume, torchrun and a 2-GPU cluster, and P5
#   P1      bench/extract.py: extract / bare forward with the pipeline, WavLM base (random weights)
#   P3      bench/train.py: (a) epoch from cache vs upstream on the fly, (b) 8 variants in one pass / 8 runs
#   P4      bench/scale.py: extraction on a LocalCluster of 2 workers vs 1 on one GPU
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}  # the Makefile's; made here if missing
TOTAL=${TOTAL:-470}  # seconds: a part starts only if its limit ends before this (8 minutes, with the summary)
LOG=${LOG:-gpu_check-$(date -u +%Y%m%d-%H%M).log}
START=$(date +%s)
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }

# part NAME LIMIT_SECONDS GPU_ONLY COMMAND...: runs COMMAND under timeout, records PASS / FAIL / SKIP
part() {
    local name=$1 limit=$2 gpu_only=$3
    shift 3
    local elapsed=$(( $(date +%s) - START ))
    if [ "$gpu_only" = 1 ] && [ "$GPUS" -eq 0 ]; then
        SUMMARY+=("SKIP $name: no GPU here")
        say "SKIP $name: no GPU here"
        return
    fi
    if [ $(( elapsed + limit )) -gt "$TOTAL" ]; then
        SUMMARY+=("SKIP $name: ${elapsed} s spent, its ${limit} s would end past ${TOTAL} s")
        say "SKIP $name: over the time budget"
        return
    fi
    say "---- $name (limit ${limit} s): $*"
    local t0=$(date +%s) rc
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("PASS $name (${took} s)")
    elif [ "$rc" -eq 124 ]; then
        SUMMARY+=("FAIL $name: over its ${limit} s limit")
    else
        SUMMARY+=("FAIL $name: exit $rc (${took} s)")
    fi
}

say "gpu_check.sh $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# ---- install -------------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV" || { say "FAIL install: no venv"; exit 1; }
fi
PY=$VENV/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch 2>&1 | tee -a "$LOG"
fi
"$PY" -m pip install -q -e ".[dev]" 2>&1 | tee -a "$LOG"
if ! "$PY" -c "import fusionpipe, torch, pytest" 2>>"$LOG"; then
    say "FAIL install: fusionpipe, torch or pytest cannot be imported (see $LOG)"
    exit 1
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
say "torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "cpu")'), $GPUS GPU(s):" \
    "$("$PY" -c 'import torch; print(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none")')"

# ---- the parts ----------------------------------------------------------------------------------------
part logic 60 0 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_logic.py
part paths 200 0 "$PY" bench/gpu_check.py --seconds 200
part P1 80 1 "$PY" bench/extract.py --device cuda --null-seconds 200 --seconds 400
part P3 50 1 "$PY" bench/train.py --device cuda --seconds 200 --size base
part P4 70 1 "$PY" bench/scale.py --device cuda --workers 1,2 --seconds 600

# ---- what goes into docs/benchmarks.md -------------------------------------------------------------------
PATHS=$(grep -E "^(PASS|FAIL|SKIP) +[A-Za-z0-9-]+ " "$LOG" | sed 's/^/  /')  # bench/gpu_check.py's lines
RATIOS=$(grep -E "P5 loader|^\(d\) extract / bare|^\(a\) epoch|^\(b\) 8 variants|^(cluster, [12] |extract, 1 process)" \
         "$LOG" | sed 's/^/  /')
say ""
say "==== summary ($(( $(date +%s) - START )) s; full output in $LOG)"
for line in "${SUMMARY[@]}"; do say "$line"; done
say "paths:"
say "$PATHS"
say "ratios:"
say "${RATIOS:-  none (no GPU)}"
printf '%s\n' "${SUMMARY[@]}" | grep -q "^FAIL " && exit 1
exit 0
