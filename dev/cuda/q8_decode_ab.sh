#!/usr/bin/env bash
# One GPU call for a decode-kernel candidate on q8_0 caches (a patch of dev/cuda/): llama-bench built in the
# background (for a following call), the decode kernel's GPU tests on the patched copy, then dev/cuda/attention.py
# decode-variants on this checkout and on the copy, one line a configuration (us a launch with its combine, GB/s of
# the cache's bytes, max error against the production build of the same tree).
#   PATCH (required); SHAPES (default 32x8x128,32x32x128,32x8x64); CONTEXT (32768); DTYPES ("bf16 f16");
#   CONFIGS (16x2,16x3,16x4,32x2,32x3: keys a warp tile x stages)
# Logs to $OUT (or /tmp/q8_decode_ab): tests.log, variants.log.
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/q8_decode_ab}
[ -n "$PATCH" ] || { echo "error: set PATCH (a patch of dev/cuda/, relative to the root)"; exit 2; }
mkdir -p "$LOG"
source dev/cuda/device_lib.sh
install_wheels
build_llama_bench /tmp/llama_bench_build.log
COPY=/tmp/q8_decode_ab_tree
patched_copy "$COPY" "$PATCH"
export OPENBLAS_NUM_THREADS=1
(cd "$COPY" && PYTHONPATH=/tmp/site:$COPY timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
    -m cuda tests/test_cuda_flash_attn.py tests/test_cuda_kv_q8.py > "$LOG/tests.log" 2>&1)
grep -E "passed|failed|FAILED|Error" "$LOG/tests.log" | tail -8
stamp "tests on the copy"
for tree in "$ROOT" "$COPY"; do
  for dtype in ${DTYPES:-bf16 f16}; do
    (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 200 python3 dev/cuda/attention.py --parts decode-variants \
        --shapes "${SHAPES:-32x8x128,32x32x128,32x8x64}" --decode-context "${CONTEXT:-32768}" --dtype "$dtype" \
        --configs "${CONFIGS:-16x2,16x3,16x4,32x2,32x3}" 2>&1) | tee -a "$LOG/variants.log" | python3 -c "
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        print(line.rstrip()[-200:])
        continue
    print('$([ "$tree" = "$ROOT" ] && echo main || echo patched)', r['shape'], r['dtype'], r['cache'],
          '%dx%d' % (r['keys'], r['stages']), 'splits', r['splits'], r['us'], 'us', r['GB/s'], 'GB/s',
          'err %.1e' % r['max_err'], 'equal' if r['equal'] else '')"
  done
done
stamp variants
