#!/usr/bin/env bash
# A q8_0-cache decode candidate (PATCH) in engine bench: tg with -ctk q8_0 -ctv q8_0 on this checkout and on the
# patched copy, interleaved (SHAPES, DEPTHS, ROUNDS), one summary line a run; first, when set, pytest -m cuda TESTS
# on the copy and the copy's decode-variants (CONFIGS). llama-bench builds in the background for a following call.
# Logs to $OUT (or /tmp/q8_bench_ab): tests.log, variants.log, bench.log.
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/q8_bench_ab}
[ -n "$PATCH" ] || { echo "error: set PATCH"; exit 2; }
mkdir -p "$LOG"
source dev/cuda/device_lib.sh
install_wheels
build_llama_bench /tmp/llama_bench_build.log
COPY=/tmp/q8_decode_ab_tree
patched_copy "$COPY" "$PATCH"
export OPENBLAS_NUM_THREADS=1
if [ -n "$TESTS" ]; then
  (cd "$COPY" && PYTHONPATH=/tmp/site:$COPY timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
      -m cuda $TESTS > "$LOG/tests.log" 2>&1)
  grep -E "passed|failed|FAILED|Error" "$LOG/tests.log" | tail -8
  stamp "tests on the copy"
fi
if [ -n "$CONFIGS" ]; then
  (cd "$COPY" && PYTHONPATH=/tmp/site:$COPY timeout 200 python3 dev/cuda/attention.py --parts decode-variants \
      --shapes "${VSHAPES:-32x8x128,32x32x128,32x8x64}" --decode-context 32768 --dtype bf16 --configs "$CONFIGS" 2>&1) \
      | tee -a "$LOG/variants.log" | python3 -c "
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        print(line.rstrip()[-200:])
        continue
    print('patched', r['shape'], r['cache'], '%dx%d' % (r['keys'], r['stages']), 'splits', r['splits'], r['us'], 'us',
          r['GB/s'], 'GB/s', 'err %.1e' % r['max_err'])"
  stamp variants
fi
for round in $(seq "${ROUNDS:-1}"); do
  for shape in ${SHAPES:-llama3-8b llama2-7b llama3.2-1b}; do
    for tree in "$ROOT" "$COPY"; do
      name=$([ "$tree" = "$ROOT" ] && echo main || echo patched)
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 120 python3 -m engine bench --shape "$shape" --device cuda \
          --dtype bf16 -ctk q8_0 -ctv q8_0 -p 0 -n 64 -d "${DEPTHS:-8192,32768}" -r 1 --no-hf > /tmp/q8b.log 2>&1)
      cat /tmp/q8b.log >> "$LOG/bench.log"
      echo "$shape $name q8_0 round $round: $(grep -oE 'tg64 \| +[0-9]+ \| +[0-9.]+' /tmp/q8b.log \
          | awk '{print $3": "$5}' | tr '\n' ' ') $(grep -m1 -iE 'error' /tmp/q8b.log)"
    done
  done
done
stamp bench
