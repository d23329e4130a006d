#!/usr/bin/env bash
# The side-by-side table beside llama-bench (tools/compare_llama_cpp.py, -p 512,8192, tg128 at 512 / 8192 / 32768) in
# one GPU call, on the tree ab_call.sh took on (/tmp/ab_best: "TREE [NAME=VALUE]", a define set as the tree's default
# in a copy) or on this checkout; then, with the time left, the whole cuda suite on that tree.
#   SHAPES   presets (default "llama3-8b llama2-7b llama3.2-1b"; set empty for none), each a GGUF made here once
#   BENCH    a copy of ../shared/bench (default .bench: build_llama_bench.sh, llama.cpp-src.tar.xz, synth_gguf.py)
#   SUITE=1  run the whole cuda suite after the table (timeout SUITE_TIMEOUT, default 300 s)
# llama-bench is built once a machine (~5 min, in the background from the first call that asks: ab_call.sh's
# BUILD=1 starts it early); the table waits for it. Logs and compare_<shape>.json to $OUT (or /tmp/table_call).
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/table_call}
BENCH=${BENCH:-$ROOT/.bench}
SHAPES=${SHAPES-llama3-8b llama2-7b llama3.2-1b}  # empty: no table (SUITE only)
mkdir -p "$LOG" /tmp/gguf
source dev/cuda/device_lib.sh
install_wheels
LB=$LLAMA_BENCH
[ -z "$SHAPES" ] || build_llama_bench "$LOG/llama_bench_build.log"
for s in $SHAPES; do
  [ -f /tmp/gguf/$s.gguf ] || PYTHONPATH=/tmp/site python3 "$BENCH/synth_gguf.py" "$BENCH/tokenizer-smollm2.gguf" \
      /tmp/gguf/$s.gguf --preset $s > "$LOG/synth_$s.log" 2>&1
done
stamp "GGUFs ready"
read -r TREE DEFINE < <(cat /tmp/ab_best 2>/dev/null || echo "$ROOT")
TREE=${TREE:-$ROOT}
if [ -n "$DEFINE" ]; then  # a define variant: a copy with the define as its default
  rm -rf /tmp/table_tree && cp -r "$TREE" /tmp/table_tree && TREE=/tmp/table_tree
  grep -l "^#define ${DEFINE%%=*} " $TREE/kernels/* | xargs -r sed -i "s/^#define ${DEFINE%%=*} .*/#define ${DEFINE%%=*} ${DEFINE#*=}/"
fi
stamp "tree $TREE ${DEFINE:+with $DEFINE}"
(cd "$TREE" && git diff --no-index --stat "$ROOT/kernels" kernels 2>/dev/null | tail -3)
export PYTHONPATH=/tmp/site:$TREE OPENBLAS_NUM_THREADS=1
if [ -n "$SHAPES" ]; then
  for _ in $(seq 330); do [ -x $LB ] && break; sleep 1; done
  [ -x $LB ] || { echo "error: llama-bench not built (see $LOG/llama_bench_build.log)"; exit 1; }
  stamp "llama-bench ready"
fi
for s in $SHAPES; do
  (cd "$TREE" && timeout ${PER_SHAPE:-240} python3 tools/compare_llama_cpp.py --llama-bench $LB -m /tmp/gguf/$s.gguf \
      -p 512,8192 --json "$LOG/compare_$s.json" 2>&1 | tee "$LOG/compare_$s.log")
  stamp "table $s"
done
if [ -n "$SUITE" ]; then
  (cd "$TREE" && timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 \
      | tee "$LOG/cuda_suite.log" | tail -15)
  stamp "cuda suite"
fi
