#!/usr/bin/env bash
# One GPU call that A/Bs decode-step candidates (patches of dev/cuda/) against this checkout, the way sessions 20-21
# ran them: each patch applied to its own copy of the tree, tools/profile_decode.py rounds interleaved (this checkout,
# then each patch, ROUNDS times) at each shape, then the patches' GPU tests, then any EXTRA commands (dev drivers).
#   PATCHES  patch files relative to the root (default: every dev/cuda/v*.patch); "a.patch+b.patch" is one variant with
#            both applied in turn (named a+b)
#   SHAPES   profile_decode --shape values (default "llama3-8b llama3.2-1b smollm2"); DEPTH (default 512); ROUNDS (2)
#   DEFINES  "NAME=VALUE ..." each profiled on this checkout as one more variant (profile_decode --define)
#   TESTS    pytest files run -m cuda on each patched copy (default the GEMV, PDL and model tests); NOTESTS=1 skips them;
#            TESTS_ON=best runs them only on the tree the summary took on (this checkout if none won), TEST_TIMEOUT
#            (default 300 s) bounds each run: the short form for a call with little device time left
#   EXTRA    a command run last from the root, e.g. "python dev/cuda/gemv_tma.py --shapes 8b-o --layers 8"
#   BUILD=1  also start building llama-bench (.bench, ~5 min, nice'd) in the background for dev/cuda/table_call.sh
#   DRY=1    apply the patches and print the plan without running anything (works without a GPU)
# Ends with a summary (each variant's step at each shape against main's, the mean of its rounds) and names in
# /tmp/ab_best the tree of the variant with the shortest first-shape step if it is at least MIN_GAIN % (default 1)
# below main's, else this checkout: dev/cuda/table_call.sh, run next on the same warm machine, reads it.
# A profile takes ~40 s at 8B and ~15 s at 1B / SmolLM2 (H100, model build included); the three test files ~160 s.
# Logs to $OUT (or /tmp/ab_call); the wheels in .whl/ are installed to /tmp/site first (the device has no gguf).
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/ab_call}
mkdir -p "$LOG"
PATCHES=${PATCHES:-$(ls dev/cuda/v*.patch 2>/dev/null)}
SHAPES=${SHAPES:-llama3-8b llama3.2-1b smollm2}
DEPTH=${DEPTH:-512}
ROUNDS=${ROUNDS:-2}
TESTS=${TESTS:-tests/test_cuda_gemv.py tests/test_cuda_pdl.py tests/test_cuda_model.py}
source dev/cuda/device_lib.sh
install_wheels
export PYTHONPATH=/tmp/site OPENBLAS_NUM_THREADS=1
[ -n "$BUILD" ] && [ -z "$DRY" ] && build_llama_bench "$LOG/llama_bench_build.log"

variant_name() {  # a.patch+b.patch -> a+b
  local IFS=+ parts=() p
  for p in $1; do parts+=("$(basename "$p" .patch)"); done
  echo "${parts[*]}"
}
declare -A TREE=([main]=$ROOT)
NAMES=(main)
for variant in $PATCHES; do
  name=$(variant_name "$variant")
  NAMES+=("$name")
  TREE[$name]=/tmp/ab_$name
  patched_copy "/tmp/ab_$name" "$variant"
  stamp "applied $variant in /tmp/ab_$name"
done

profile() {  # profile TREE SHAPE [--define X]
  (cd "$1" && PYTHONPATH=/tmp/site:$1 timeout 150 python3 tools/profile_decode.py --shape "$2" --depth "$DEPTH" \
      --steps 40 --top 8 "${@:3}" 2>&1 | grep -A9 depth | grep -v calls/step)
}
if [ -n "$DRY" ]; then
  stamp "dry run: variants ${NAMES[*]} ${DEFINES:+and defines $DEFINES}, shapes $SHAPES, depth $DEPTH, $ROUNDS rounds"
  exit 0
fi
for round in $(seq "$ROUNDS"); do
  for shape in $SHAPES; do
    for name in "${NAMES[@]}"; do
      { echo "### $shape"; profile "${TREE[$name]}" "$shape"; } | tee -a "$LOG/profile_$name.log"
      stamp "$name $shape round $round"
    done
    for define in $DEFINES; do
      { echo "### $shape"; profile "$ROOT" "$shape" --define "$define"; } | tee -a "$LOG/profile_$define.log"
      stamp "$define $shape"
    done
  done
done
python3 "$ROOT/dev/cuda/ab_summary.py" "$LOG" --min-gain "${MIN_GAIN:-1}" --best /tmp/ab_best \
    $(for n in "${NAMES[@]}"; do echo "$n=${TREE[$n]}"; done) $(for d in $DEFINES; do echo "$d=$ROOT"; done) \
    | tee "$LOG/summary.md"
TESTED=("${NAMES[@]:1}")
if [ "$TESTS_ON" = best ]; then
  read -r best _ < /tmp/ab_best
  TESTED=(main)
  for name in "${NAMES[@]}"; do [ "${TREE[$name]}" = "$best" ] && TESTED=("$name"); done
fi
if [ -z "$NOTESTS" ]; then
  for name in "${TESTED[@]}"; do
    (cd "${TREE[$name]}" && PYTHONPATH=/tmp/site:${TREE[$name]} timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q \
        -p no:cacheprovider -m cuda $TESTS 2>&1 | tail -3) | tee "$LOG/tests_$name.log"; stamp "tests $name"
  done
fi
if [ -n "$EXTRA" ]; then
  bash -c "$EXTRA" 2>&1 | tee "$LOG/extra.log"; stamp "extra"
fi
