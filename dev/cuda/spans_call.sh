#!/usr/bin/env bash
# One GPU call: tools/profile_decode.py (kernel times and spans a decode step) at the preset shapes and depths, while
# llama-bench builds in the background for a later call on the same machine (dev/cuda/table_call.sh). With .m1/part
# carried (the first half of the default model file), it is kept in /tmp/model for the call that carries .m2/part.
#   SHAPES (default "llama3-8b llama2-7b llama3.2-1b smollm2"), DEPTHS (512,8192,32768), STEPS (30)
# Logs to $OUT (or /tmp/spans_call): one file a shape.
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/spans_call}
mkdir -p "$LOG" /tmp/model
[ -f .m1/part ] && cp .m1/part /tmp/model/part1
source dev/cuda/device_lib.sh
install_wheels
build_llama_bench /tmp/llama_bench_build.log
export PYTHONPATH=/tmp/site:$PWD OPENBLAS_NUM_THREADS=1
for s in ${SHAPES:-llama3-8b llama2-7b llama3.2-1b smollm2}; do
  timeout ${SHAPE_TIMEOUT:-150} python3 tools/profile_decode.py --shape $s --depth ${DEPTHS:-512,8192,32768} \
      --steps ${STEPS:-30} --top 16 > "$LOG/spans_$s.log" 2>&1
  echo "== $s"; grep -E "depth|^ *[0-9.]+ +[0-9.]+ +[0-9.]+  " "$LOG/spans_$s.log" | cut -c1-120
done
