#!/usr/bin/env bash
# The fused DCA attention kernels on the device in one command: register / spill / shared-memory
# report (ptxas -v on the NVRTC PTX), the `cuda` tests of tests/test_cuda_flash_attn.py, then
# tools/bench_attention.py. Logs (and bench.json) under LOG_DIR.
#   tools/flash_check.sh [LOG_DIR]     (LOG_DIR defaults to $OUT, else /tmp/flash_check)
# The device image lacks the gguf package (engine/__init__ imports it): wheels in .whl/ are installed
# to /tmp/site first when present (carry .whl). Extra env: BENCH_ARGS, PYTEST_ARGS.
set -o pipefail
LOG=${1:-${OUT:-/tmp/flash_check}}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

timeout 60 $PY - <<'PYEOF' 2>&1 | tee "$LOG/resources.log"
import shutil, subprocess, tempfile, time
from engine.backends.cuda.kernels import ARCH_FILES, compile_ptx
for name in ("dca_flash_attn", "dca_decode", "dca_flash_attn_sm90"):
    arch = ARCH_FILES.get(name, "sm_90")
    t0 = time.perf_counter()
    ptx = compile_ptx(name, arch)
    print(f"{name}.cu -> PTX in {time.perf_counter() - t0:.1f} s")
    if shutil.which("ptxas"):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            r = subprocess.run(["ptxas", "-v", f"-arch={arch}", f.name, "-o", "/dev/null"], capture_output=True, text=True)
        lines = [l.split("info    : ")[-1].strip() for l in (r.stdout + r.stderr).splitlines()
                 if "Compiling entry" in l or "Used" in l or "spill" in l]
        print("\n".join(lines))
PYEOF

timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -rs -p no:cacheprovider --durations=5 tests/test_cuda_flash_attn.py \
    $PYTEST_ARGS 2>&1 | tee "$LOG/tests.log"
TEST_RC=$?

# separate processes: a kernel fault in one part cannot take the others' numbers with it
for part in prefill decode check,resources; do
    timeout ${BENCH_TIMEOUT:-150} $PY tools/bench_attention.py --parts $part --json "$LOG/bench_${part%%,*}.json" \
        $BENCH_ARGS 2>&1 | tee "$LOG/bench_${part%%,*}.log"
done

echo "================ summary ================"
tail -n 1 "$LOG/tests.log"
grep -E "^FAILED|^ERROR" "$LOG/tests.log" | head -20
exit $TEST_RC
