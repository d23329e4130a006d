#!/usr/bin/env bash
# One GPU call: dev/cuda/block_trace.py (each decode kernel's ramp, wait, body and tail from its blocks' own timers) at
# the preset shapes and depths, on a copy of this checkout with dev/cuda/trace_blocks.patch applied (plus PATCH, a
# candidate's patches, when set). The trace adds a barrier and a few stores at each block's end: spans move a little;
# compare kernels within one trace, not against untraced steps.
#   SHAPES (default "llama3-8b llama2-7b"), DEPTHS (512,8192), DTYPE (bf16), PATCH ("a.patch+b.patch", optional)
# Logs to $OUT (or /tmp/trace_call): trace_<shape>_<depth>.log.
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/trace_call}
mkdir -p "$LOG"
source dev/cuda/device_lib.sh
install_wheels
COPY=/tmp/trace_tree
patched_copy "$COPY" "dev/cuda/trace_blocks.patch${PATCH:++$PATCH}"
export PYTHONPATH=/tmp/site:$COPY OPENBLAS_NUM_THREADS=1
IFS=, read -ra depths <<< "${DEPTHS:-512,8192}"
for shape in ${SHAPES:-llama3-8b llama2-7b}; do
  for depth in "${depths[@]}"; do
    (cd "$COPY" && timeout "${RUN_TIMEOUT:-150}" python3 dev/cuda/block_trace.py --shape "$shape" --depth "$depth" \
        --dtype "${DTYPE:-bf16}") > "$LOG/trace_${shape}_$depth.log" 2>&1
    sed -n '/Medians/,$p' "$LOG/trace_${shape}_$depth.log" | head -12
    grep -E "^error|Error" "$LOG/trace_${shape}_$depth.log" | tail -3
    stamp "$shape $depth"
  done
done
