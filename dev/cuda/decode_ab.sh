#!/usr/bin/env bash
# One GPU call that A/Bs a decode candidate (a patch of dev/cuda/) against this checkout: the GPU tests on a patched
# copy, then engine bench tg128 (random weights of the preset shapes) on this checkout and on the copy, interleaved
# ROUNDS times, one summary line a run (tokens/s at each depth). Ratios hold within the call only.
#   PATCH    the patch, relative to the root (required)
#   SHAPES   presets (default "llama3.2-1b llama3-8b llama2-7b"); DEPTHS (512,8192,32768); ROUNDS (2)
#   TESTS    pytest files run -m cuda on the copy (default the flash-attention, q8_0 cache and model tests)
#   TABLE=1  then the table beside llama-bench on the copy (dev/cuda/table_call.sh; llama-bench builds in the
#            background from the start, ~5 min), TABLE_SHAPES (default "llama3-8b llama3.2-1b llama2-7b")
# Logs to $OUT (or /tmp/decode_ab): tests.log, bench.log, table/.
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/decode_ab}
[ -n "$PATCH" ] || { echo "error: set PATCH (a patch of dev/cuda/, relative to the root)"; exit 2; }
mkdir -p "$LOG"
source dev/cuda/device_lib.sh
install_wheels
[ -n "$TABLE" ] && build_llama_bench /tmp/llama_bench_build.log
COPY=/tmp/decode_ab_tree
patched_copy "$COPY" "$PATCH"
export OPENBLAS_NUM_THREADS=1
TESTS=${TESTS:-tests/test_cuda_flash_attn.py tests/test_cuda_kv_q8.py tests/test_cuda_model.py}
(cd "$COPY" && PYTHONPATH=/tmp/site:$COPY timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider \
    -m cuda $TESTS > "$LOG/tests.log" 2>&1)
grep -E "passed|failed|FAILED|Error" "$LOG/tests.log" | tail -8
stamp "tests on the copy"
for round in $(seq "${ROUNDS:-2}"); do
  for shape in ${SHAPES:-llama3.2-1b llama3-8b llama2-7b}; do
    for tree in "$ROOT" "$COPY"; do
      name=$([ "$tree" = "$ROOT" ] && echo main || echo patched)
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout "${BENCH_TIMEOUT:-90}" python3 -m engine bench \
          --shape "$shape" --device cuda --dtype bf16 -p 0 -n 128 -d "${DEPTHS:-512,8192,32768}" -r 2 --no-hf \
          > /tmp/decode_ab.log 2>&1)
      cat /tmp/decode_ab.log >> "$LOG/bench.log"
      echo "$shape $name round $round: $(grep -oE 'tg128 \| +[0-9]+ \| +[0-9.]+' /tmp/decode_ab.log \
          | awk '{print $3": "$5}' | tr '\n' ' ')"
    done
  done
done
stamp bench
if [ -n "$TABLE" ]; then
  echo "$COPY" > /tmp/ab_best
  mkdir -p "$LOG/table"
  OUT=$LOG/table SHAPES=${TABLE_SHAPES:-llama3-8b llama3.2-1b llama2-7b} bash dev/cuda/table_call.sh 2>&1 \
      | grep -E "^\||error" | grep -v -- "---"
  rm -f "$LOG"/table/synth_*.log  # at most ~8 files come back from a call
  stamp "table on the copy"
fi
