#!/usr/bin/env bash
# One GPU call for the GEMV work: GEMV check + table (dev/cuda/gemv.py), engine bench tg128 at depths
# 512/8192/32768 on synthetic GGUFs of the 1B/7B/8B shapes (+ SmolLM2 shapes, --synthetic), for this
# checkout and (BASELINE=DIR) another one, then the cuda tests. Logs to $OUT (or /tmp/gemv_run).
#   BENCH=.bench (synth_gguf.py, tokenizer-smollm2.gguf; .whl/gguf-*.whl beside this checkout)
#   STAGES="dev gtests bench base mtests" (default all), SHAPES (default "llama3.2-1b llama2-7b llama3-8b"),
#   BENCH_DTYPE (default bf16: synth_gguf.py's weights have mean 0.029, the residual aligns with it and SwiGLU
#   outputs pass fp16's range within a few layers -> non-finite logits -> illegal address, issue 13 item 5)
set -o pipefail
LOG=${OUT:-/tmp/gemv_run}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=${BENCH:-$ROOT/.bench}
STAGES=${STAGES:-dev gtests bench base mtests}
SHAPES=${SHAPES:-llama3.2-1b llama2-7b llama3-8b}
DEPTHS=${DEPTHS:-512,8192,32768}
BENCH_DTYPE=${BENCH_DTYPE:-bf16}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
mkdir -p /tmp/gguf
for s in $SHAPES; do
  [ -f /tmp/gguf/$s.gguf ] || $PY "$BENCH/synth_gguf.py" "$BENCH/tokenizer-smollm2.gguf" /tmp/gguf/$s.gguf --preset $s \
      >/tmp/synth_$s.log 2>&1 &
done

if [[ $STAGES == *dev* ]]; then
  stamp "dev/cuda/gemv.py"
  timeout ${DEV_TIMEOUT:-120} $PY dev/cuda/gemv.py ${BASELINE:+--baseline $BASELINE} ${DEV_SHAPES:+--shapes $DEV_SHAPES} \
      2>&1 | tee "$LOG/gemv_dev.log" | tail -40
fi
if [[ $STAGES == *gtests* ]]; then
  stamp "pytest (gemv)"
  timeout ${GTEST_TIMEOUT:-150} $PY -m pytest -q -rs -s -p no:cacheprovider --durations=5 tests/test_cuda_gemv.py \
      tests/test_cuda_host_logic.py ${GTEST_ARGS} 2>&1 | tee "$LOG/pytest_gemv.log" \
      | grep -E "passed|failed|FAILED|Error|error|vs CPU|vs float|diverged|tokens cpu" | tail -40
fi
wait
# tokens/s tables; "after" with the blocks per SM that dev/cuda/gemv.py found best (BPS overrides)
BPS=${BPS:-$(grep -oP 'best blocks_per_sm: \K[0-9]+' "$LOG/gemv_dev.log" 2>/dev/null)}
BENCH_PY="import sys; import engine.backends.cuda.gemv as g; g.BLOCKS_PER_SM = int(sys.argv[1]) or g.BLOCKS_PER_SM; \
sys.argv = ['engine bench'] + sys.argv[2:]; from engine.bench import main; main()"
bench() {  # bench DIR TAG
  local run=(-m engine bench)
  [ "$2" = after ] && run=(-c "$BENCH_PY" "${BPS:-0}") && stamp "blocks per SM: ${BPS:-default}"
  for s in $SHAPES; do
    stamp "bench $2 $s"
    (cd "$1" && timeout ${BENCH_TIMEOUT:-90} $PY "${run[@]}" -m /tmp/gguf/$s.gguf --device cuda --dtype $BENCH_DTYPE -p 512 -d $DEPTHS -r 1 \
        --no-hf >/tmp/bench.log 2>&1; cat /tmp/bench.log >>"$LOG/bench_$2.log"; grep -E "^\||^model|rror" /tmp/bench.log | tail -8)
  done
  stamp "bench $2 smollm2 (synthetic)"
  (cd "$1" && timeout 60 $PY "${run[@]}" --synthetic --device cuda -p 512 -d 512,32768 -r 1 --no-hf \
      >/tmp/bench.log 2>&1; cat /tmp/bench.log >>"$LOG/bench_$2.log"; grep -E "^\||^model|rror" /tmp/bench.log | tail -8)
}
[[ $STAGES == *bench* ]] && bench "$ROOT" after
[[ $STAGES == *base* && -n $BASELINE ]] && bench "$BASELINE" before
if [[ $STAGES == *mtests* ]]; then
  stamp "pytest (ops, model)"
  timeout ${MTEST_TIMEOUT:-200} $PY -m pytest -q -rs -s -p no:cacheprovider --durations=5 tests/test_cuda_ops.py \
      tests/test_cuda_model.py ${PYTEST_ARGS} 2>&1 | tee "$LOG/pytest_model.log" \
      | grep -E "passed|failed|FAILED|Error|error|rel err|diverged" | tail -40
fi
stamp done
