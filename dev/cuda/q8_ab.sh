#!/usr/bin/env bash
# One GPU call for a decode candidate on q8_0 caches (PATCH, a patch of dev/cuda/) against this checkout, each step
# optional: pytest -m cuda TESTS on the patched copy; dev/cuda/attention.py decode-variants (CONFIGS, keys a warp
# tile x stages) on this checkout and on the copy, one line a configuration (us a launch with its combine, GB/s of
# the cache's bytes, max error against the production build of the same tree); engine bench tg with
# -ctk q8_0 -ctv q8_0 on both, interleaved (SHAPES, DEPTHS, ROUNDS; SHAPES="" for none). llama-bench builds in the
# background for a following call (tools/compare_llama_cpp.py -ctk q8_0 -ctv q8_0).
#   PATCH (required); TESTS; CONFIGS (e.g. 16x2,16x3,32x2), VSHAPES (32x8x128,32x32x128,32x8x64), CONTEXT (32768),
#   DTYPES ("bf16"); SHAPES ("llama3-8b llama2-7b llama3.2-1b"), DEPTHS (8192,32768), ROUNDS (1)
# Logs to $OUT (or /tmp/q8_ab): tests.log, variants.log, bench.log.
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/q8_ab}
[ -n "$PATCH" ] || { echo "error: set PATCH (a patch of dev/cuda/, relative to the root)"; exit 2; }
mkdir -p "$LOG"
source dev/cuda/device_lib.sh
install_wheels
build_llama_bench /tmp/llama_bench_build.log
COPY=/tmp/q8_ab_tree
patched_copy "$COPY" "$PATCH"
export OPENBLAS_NUM_THREADS=1
name_of() { [ "$1" = "$ROOT" ] && echo main || echo patched; }
if [ -n "$TESTS" ]; then
  (cd "$COPY" && PYTHONPATH=/tmp/site:$COPY timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
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
for round in $(seq "${ROUNDS:-1}"); do
  for shape in ${SHAPES-llama3-8b llama2-7b llama3.2-1b}; do
    for tree in "$ROOT" "$COPY"; do
      (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 120 python3 -m engine bench --shape "$shape" --device cuda \
          --dtype bf16 -ctk q8_0 -ctv q8_0 -p 0 -n 64 -d "${DEPTHS:-8192,32768}" -r 1 --no-hf > /tmp/q8_ab.log 2>&1)
      cat /tmp/q8_ab.log >> "$LOG/bench.log"
      echo "$shape $(name_of "$tree") q8_0 round $round: $(grep -oE 'tg64 \| +[0-9]+ \| +[0-9.]+' /tmp/q8_ab.log \
          | awk '{print $3": "$5}' | tr '\n' ' ') $(grep -m1 -iE 'error' /tmp/q8_ab.log)"
    done
  done
done
stamp bench
