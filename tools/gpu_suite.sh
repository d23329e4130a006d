#!/usr/bin/env bash
# The GPU suite in one command: kernel compile times, every `cuda` test, a prefill profile
# (GPU time per op) and `engine bench` on SmolLM2-135M shapes; ends with a short summary.
#   tools/gpu_suite.sh [LOG_DIR]        (LOG_DIR defaults to $OUT, else /tmp/gpu_suite)
# Extra env: SKIP_PREFILL_SPLIT=1, SKIP_DECODE_PROFILE=1, BENCH_ARGS (default "-p 512,8192,32768 -d 512,32768 -r 3"), PYTEST_ARGS (e.g. -k attention).
# COMPARE=DIR (a copy of ../shared/bench: synth_gguf.py, tokenizer-smollm2.gguf, llama.cpp-src.tar.xz): also
# builds llama-bench in the background from the start (~5 min) and ends with tools/compare_llama_cpp.py on the
# random-weight GGUFs of COMPARE_SHAPES (default "llama3.2-1b llama3-8b llama2-7b"), 60-150 s a shape.
# Stages have time limits (pytest 450 s, prefill split 120 s, bench 150 s) so one call fits 10 minutes (with
# COMPARE, skip the prefill split and decode profile and give pytest less, e.g. TEST_TIMEOUT=300).
set -o pipefail
LOG=${1:-${OUT:-/tmp/gpu_suite}}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
SHAPES=${COMPARE_SHAPES:-llama3.2-1b llama3-8b llama2-7b}
if [ -n "$COMPARE" ]; then
  COMPARE=$(cd "$COMPARE" && pwd)
  setsid bash "$COMPARE/build_llama_bench.sh" "$COMPARE/llama.cpp-src.tar.xz" /tmp/llama-bench-build \
      > /tmp/llama-bench.path 2>&1 < /dev/null &
  ( for s in $SHAPES; do $PY "$COMPARE/synth_gguf.py" "$COMPARE/tokenizer-smollm2.gguf" /tmp/$s.gguf.part --preset $s \
      && mv /tmp/$s.gguf.part /tmp/$s.gguf; done ) > "$LOG/synth.log" 2>&1 &
fi

# First-run compile time of the default model's shapes: a prefill and two decode steps with empty kernel caches,
# minus the same run once the kernels are cached
CUPY_CACHE_DIR=$(mktemp -d) ENGINE_CACHE_DIR=$(mktemp -d) timeout 180 $PY - <<'PYEOF' 2>&1 | tee "$LOG/compile.log"
import time, cupy, numpy as np
from engine.bench import load_bench_model, new_cache
from engine.options import LoadSettings
from engine.sampling import SamplingParams
props = cupy.cuda.runtime.getDeviceProperties(0)
print(f"device: {props['name'].decode()} sm_{props['major']}{props['minor']}, CuPy {cupy.__version__}, "
      f"NVRTC {cupy.cuda.nvrtc.getVersion()}")
llm, label = load_bench_model(LoadSettings(device="cuda", context=2048, dca="off"), synthetic=True)
model, backend = llm.model, llm.backend
def run():
    t0 = time.perf_counter()
    cache = new_cache(model, 1024)
    model.forward(np.arange(600) % 1000, cache, logits_for="none")
    dec = backend.decoder(model, cache, SamplingParams(temperature=0.0), [1])
    tok = dec.first(np.zeros(model.config.vocab_size, np.float32))
    for _ in range(3):
        tok = dec.step(tok)
    cupy.cuda.Device().synchronize()
    return time.perf_counter() - t0
cold, warm = run(), run()
print(f"compile: first run {cold:.2f} s, cached {warm:.2f} s: kernels compiled in {cold - warm:.2f} s")
PYEOF

# a test that hangs (a kernel that never ends) stops the run with every thread's stack, not the whole call
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout ${PER_TEST_TIMEOUT:-150} --timeout-method=thread")
timeout ${TEST_TIMEOUT:-450} $PY -m pytest $PER_TEST -q -s -rs -p no:cacheprovider --durations=8 -m cuda tests/ \
    $PYTEST_ARGS 2>&1 | tee "$LOG/pytest_cuda.log"
TEST_RC=$?

# GPU time per op of a 32k-token prefill (attention vs the rest, FLOP rate of the matrix products)
[ -n "$SKIP_PREFILL_SPLIT" ] || timeout 120 $PY tools/profile_prefill.py --tokens 32768 --ubatch 32768 --long 0 \
    2>&1 | tee "$LOG/prefill_split.log"

[ -n "$SKIP_DECODE_PROFILE" ] || timeout 90 $PY - <<'PYEOF' 2>&1 | tee "$LOG/decode_profile.log"
# Registers / local memory of the main kernels, and the decode step (graph replay) fused vs op by op.
import time, numpy as np, cupy
from engine.backends.cuda.kernels import function
from engine.bench import load_bench_model, new_cache
from engine.options import LoadSettings
from engine.sampling import SamplingParams
from engine.backends.cuda import flash_attention as fa
f, k, i = fa.decode_build(64)
print(f"{k}: {function(f, k, 'f16', instance=i).num_regs} regs")
from engine.backends.cuda.kernels import per_type
for f, k, i in [("gemv", "qkv_q4_1", per_type("GEMV_KERNELS", "q4_1")), ("gemv", "gateup_q4_1", per_type("GEMV_KERNELS", "q4_1")),
                ("sampling", "sample_token", None)]:
    a = function(f, k, "f16", instance=i).attributes
    print(f"{k}: {a['num_regs']} regs, {a['local_size_bytes']} B local, {a['shared_size_bytes']} B static smem")
llm, label = load_bench_model(LoadSettings(device="cuda", context=33000, dca="on"), synthetic=True)
model, backend = llm.model, llm.backend
for depth in (512, 32768):
    for fused in (True, False):
        cache = new_cache(model, depth + 600)
        prompt = np.random.default_rng(0).integers(0, 49152, depth)
        for i in range(0, depth, 4096):
            model.forward(prompt[i:i + 4096], cache, logits_for="none")
        dec = backend.decoder(model, cache, SamplingParams(temperature=0.0), list(prompt))
        model.decode_blocks = backend.decode_blocks(model) if fused else model
        tok = dec.first(np.zeros(49152, np.float32))
        t0 = time.perf_counter()
        tok = dec.step(tok)  # eager
        t1 = time.perf_counter()
        tok = dec.step(tok)  # capture + first replay
        t2 = time.perf_counter()
        print(f"depth {depth} fused={fused}: eager step {1e3*(t1-t0):.1f} ms, capture+replay {1e3*(t2-t1):.1f} ms")
        cupy.cuda.Device().synchronize(); t0 = time.perf_counter()
        for _ in range(200):
            dec._graph.launch(dec.stream)
        dec.stream.synchronize(); replay = (time.perf_counter() - t0) / 200
        dec._device_position = None  # the raw replays moved the device position: step() re-uploads it
        t0 = time.perf_counter()
        for _ in range(100):
            tok = dec.step(tok)
        step = (time.perf_counter() - t0) / 100
        print(f"depth {depth} fused={fused}: graph replay {replay*1e6:.0f} us, step() {step*1e6:.0f} us "
              f"({1/step:.0f} tok/s)")
PYEOF

timeout 150 $PY -m engine.bench --synthetic --device cuda ${BENCH_ARGS:--p 512,8192,32768 -d 512,32768 -r 3} 2>&1 | tee "$LOG/bench.log"

if [ -n "$COMPARE" ]; then  # engine vs llama.cpp on the same files: wait for the build (at most 5 more minutes)
  for _ in $(seq 300); do [ -x "$(tail -n 1 /tmp/llama-bench.path 2>/dev/null)" ] && break; sleep 1; done
  wait
  models=(); for s in $SHAPES; do [ -f /tmp/$s.gguf ] && models+=(-m /tmp/$s.gguf); done
  timeout ${COMPARE_TIMEOUT:-400} $PY tools/compare_llama_cpp.py --llama-bench "$(tail -n 1 /tmp/llama-bench.path)" \
      "${models[@]}" --json "$LOG/compare.json" 2>&1 | tee "$LOG/compare.log"
fi

echo "================ summary ================"
grep -E "^device|^compile" "$LOG/compile.log"
tail -n 1 "$LOG/pytest_cuda.log"
grep -E "FAILED|ERROR" "$LOG/pytest_cuda.log" | head -20
grep -E "rel err|diverged" "$LOG/pytest_cuda.log" | head -30
[ -n "$SKIP_PREFILL_SPLIT" ] || grep -E "^prefill|without attention" "$LOG/prefill_split.log"
[ -n "$SKIP_DECODE_PROFILE" ] || cat "$LOG/decode_profile.log"
tail -n 8 "$LOG/bench.log"
[ -z "$COMPARE" ] || cat "$LOG/compare.log"
exit $TEST_RC
