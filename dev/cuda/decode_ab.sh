#!/usr/bin/env bash
# One GPU call that A/Bs a decode candidate (a patch of dev/cuda/) against this checkout, each step optional: the GPU
# tests on a patched copy; dev/cuda/attention.py decode-variants on this checkout and on the copy (one line a kernel
# configuration: us a launch with its combine, GB/s of the cache's bytes, max error against the same tree's
# production build); engine bench tg (random weights of the preset shapes) on both, interleaved ROUNDS times, one
# summary line a run (tokens/s at each depth); the table beside llama-bench on the copy. Ratios hold within the call.
#   PATCH    the patch, relative to the root; "a.patch+b.patch" applies both in turn (required)
#   TESTS    pytest files run -m cuda on the copy (default the flash-attention, q8_0 cache and model tests; "" none)
#   CONFIGS  decode-variants' configurations, keys a warp tile x stages (e.g. 16x2,32x2; unset: none), VSHAPES
#            (default 32x8x128,32x32x128,32x8x64), CONTEXT (32768), DTYPES ("bf16")
#   SHAPES   engine bench presets (default "llama3.2-1b llama3-8b llama2-7b"; "" none); DEPTHS (512,8192,32768);
#            ROUNDS (2); CACHE=q8_0 for q8_0 K and V caches (default the activation dtype's)
#   TABLE=1  then the table beside llama-bench on the copy (dev/cuda/table_call.sh; llama-bench builds in the
#            background from the start, ~5 min), TABLE_SHAPES (default "llama3-8b llama3.2-1b llama2-7b")
# Logs to $OUT (or /tmp/decode_ab): tests.log, variants.log, bench.log, table/.
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
name_of() { [ "$1" = "$ROOT" ] && echo main || echo patched; }
TESTS=${TESTS-tests/test_cuda_flash_attn.py tests/test_cuda_kv_q8.py tests/test_cuda_model.py}
if [ -n "$TESTS" ]; then
  (cd "$COPY" && PYTHONPATH=/tmp/site:$COPY timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider \
      -m cuda $TESTS > "$LOG/tests.log" 2>&1)
  grep -E "passed|failed|FAILED|Error" "$LOG/tests.log" | tail -8
  stamp "tests on the copy"
fi
if [ -n "$CONFIGS" ]; then
  for tree in "$ROOT" "$COPY"; do
    for dtype in ${DTYPES:-bf16}; do
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 200 python3 dev/cuda/attention.py --parts decode-variants \
          --shapes "${VSHAPES:-32x8x128,32x32x128,32x8x64}" --decode-context "${CONTEXT:-32768}" --dtype "$dtype" \
          --configs "$CONFIGS" 2>&1) | tee -a "$LOG/variants.log" | python3 -c "
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        print(line.rstrip()[-200:])
        continue
    print('$(name_of "$tree")', r['shape'], r['dtype'], r['cache'], '%dx%d' % (r['keys'], r['stages']), 'splits',
          r['splits'], r['us'], 'us', r['GB/s'], 'GB/s', 'err %.1e' % r['max_err'])"
    done
  done
  stamp variants
fi
CACHE_ARGS=${CACHE:+-ctk $CACHE -ctv $CACHE}
for round in $(seq "${ROUNDS:-2}"); do
  for shape in ${SHAPES-llama3.2-1b llama3-8b llama2-7b}; do
    for tree in "$ROOT" "$COPY"; do
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout "${BENCH_TIMEOUT:-90}" python3 -m engine bench \
          --shape "$shape" --device cuda --dtype bf16 $CACHE_ARGS -p 0 -n 128 -d "${DEPTHS:-512,8192,32768}" -r 2 \
          --no-hf > /tmp/decode_ab.log 2>&1)
      cat /tmp/decode_ab.log >> "$LOG/bench.log"
      echo "$shape $(name_of "$tree") ${CACHE:-16-bit} round $round: $(grep -oE 'tg128 \| +[0-9]+ \| +[0-9.]+' \
          /tmp/decode_ab.log | awk '{print $3": "$5}' | tr '\n' ' ') $(grep -m1 -E '^error' /tmp/decode_ab.log)"
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
