#!/usr/bin/env bash
# One GPU call that A/Bs a prefill candidate (a patch of dev/cuda/) against this checkout on the host-bound short
# prompt: dev/cuda/prefill_host.py's plain prefills (wall and host queueing time) and its cProfile, this checkout and
# the patched copy interleaved ROUNDS times at each shape; then the patch's GPU tests on the copy; then, with TABLE=1,
# the table beside llama-bench on the copy (dev/cuda/table_call.sh, its shapes from TABLE_SHAPES).
#   PATCH         the patch, relative to the root (default dev/cuda/v36_prompt_blocks.patch)
#   SHAPES        prefill_host --shape values (default "llama3.2-1b smollm2"); TOKENS (512); ROUNDS (2)
#   TESTS         pytest files run -m cuda on the copy (default the prompt-block, model and flash-attention tests)
#   TABLE=1       then the table (llama-bench is built in the background from the start, ~5 min)
#   TABLE_SHAPES  (default llama3.2-1b)
# Logs to $OUT (or /tmp/prefill_ab); the wheels in .whl/ are installed to /tmp/site first (the device has no gguf).
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/prefill_ab}
PATCH=${PATCH:-dev/cuda/v36_prompt_blocks.patch}
SHAPES=${SHAPES:-llama3.2-1b smollm2}
TESTS=${TESTS:-tests/test_cuda_prefill_blocks.py tests/test_cuda_model.py tests/test_cuda_flash_attn.py}
mkdir -p "$LOG"
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >/dev/null 2>&1
export OPENBLAS_NUM_THREADS=1
if [ -n "$TABLE" ] && [ ! -x /tmp/lb/lc/build/bin/llama-bench ]; then
  (nice -n 19 setsid bash .bench/build_llama_bench.sh "$ROOT/.bench/llama.cpp-src.tar.xz" /tmp/lb \
      > "$LOG/llama_bench_build.log" 2>&1 < /dev/null &)
fi
COPY=/tmp/prefill_ab_tree
rm -rf "$COPY" && mkdir -p "$COPY" && cp -r engine kernels tools tests dev pyproject.toml "$COPY/"
(cd "$COPY" && git apply "$ROOT/$PATCH") || { echo "error: $PATCH does not apply"; exit 1; }
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
  echo "$COPY" > /tmp/ab_best
  OUT=$LOG SHAPES=${TABLE_SHAPES:-llama3.2-1b} bash dev/cuda/table_call.sh 2>&1 | tail -9
fi
