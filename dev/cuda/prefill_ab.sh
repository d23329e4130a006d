#!/usr/bin/env bash
# One GPU call that A/Bs host-side candidates (patches of dev/cuda/) against this checkout: dev/cuda/prefill_host.py's
# plain prefills of a short prompt (wall and host queueing time) and its cProfile, this checkout and the patched copy
# interleaved ROUNDS times at each shape; then the GPU tests on the copy; then, with TABLE=1, the table beside
# llama-bench (dev/cuda/table_call.sh: pp512 / pp8192, tg128 at three depths) on this checkout and on the copy, for
# ratios measured in one call (decode candidates show there: engine bench runs the decode loop users run).
#   PATCH         the patch, relative to the root; "a.patch+b.patch" applies both in turn (required)
#   SHAPES        prefill_host --shape values (default "llama3.2-1b smollm2"); TOKENS (512); ROUNDS (2)
#   TESTS         pytest files run -m cuda on the copy (default the prompt-block, kept-graph, model and
#                 flash-attention tests)
#   TABLE=1       then the tables (llama-bench is built in the background from the start, ~5 min)
#   TABLE_SHAPES  (default llama3.2-1b)
# Logs to $OUT (or /tmp/prefill_ab); the wheels in .whl/ are installed to /tmp/site first (the device has no gguf).
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/prefill_ab}
[ -n "$PATCH" ] || { echo "error: set PATCH (a patch of dev/cuda/, relative to the root)"; exit 2; }
SHAPES=${SHAPES:-llama3.2-1b smollm2}
TESTS=${TESTS:-tests/test_cuda_prefill_blocks.py tests/test_cuda_kept_graphs.py tests/test_cuda_model.py tests/test_cuda_flash_attn.py}
mkdir -p "$LOG"
source dev/cuda/device_lib.sh
install_wheels
export OPENBLAS_NUM_THREADS=1
[ -n "$TABLE" ] && build_llama_bench "$LOG/llama_bench_build.log"
COPY=/tmp/prefill_ab_tree
patched_copy "$COPY" "$PATCH"
stamp "applied $PATCH in $COPY"
for round in $(seq "${ROUNDS:-2}"); do
  for shape in $SHAPES; do
    for tree in "$ROOT" "$COPY"; do
      name=$([ "$tree" = "$ROOT" ] && echo main || echo patched)
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 150 python3 dev/cuda/prefill_host.py --shape "$shape" \
          --tokens "${TOKENS:-512}" > "$LOG/host_${name}_${shape}_$round.log" 2>&1)
      echo "$name $shape round $round: $(grep -o 'wall [0-9.]* ms' "$LOG/host_${name}_${shape}_$round.log" \
          | tail -4 | tr '\n' ' ')"
    done
  done
done
(cd "$COPY" && PYTHONPATH=/tmp/site:$COPY timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
    -m cuda $TESTS 2>&1 | tail -3) | tee "$LOG/tests.log"
stamp "tests"
if [ -n "$TABLE" ]; then
  for tree in "$ROOT" "$COPY"; do
    echo "$tree" > /tmp/ab_best
    mkdir -p "$LOG/table_$(basename "$tree")"
    OUT=$LOG/table_$(basename "$tree") SHAPES=${TABLE_SHAPES:-llama3.2-1b} bash dev/cuda/table_call.sh 2>&1 | tail -8
  done
fi
