# Shared steps of the device-call scripts in dev/cuda/ (sourced, from the repository root; $ROOT set to it).
#   install_wheels             the carried wheels (.whl/: gguf, starlette, uvicorn; the device has none) into /tmp/site
#   build_llama_bench LOG      llama-bench built in the background (~5 min) from $BENCH (default .bench/, a copy of
#                              ../shared/bench) unless built or building; or unpacked from .lb/ (below) in seconds
#   export_llama_bench DIR     the built llama-bench and its libraries packed into DIR as lb.tar.xz.partNN (15 MiB
#                              each: a call returns files of up to 16 MiB). Copy them here into .lb/ (ignored) and
#                              carry .lb on the session's later calls: a machine started cold then skips the build
#   patched_copy DIR PATCHES   this checkout's engine, kernels, tools, tests, dev and pyproject.toml copied to DIR with
#                              the patches ("a.patch+b.patch", relative to the root) applied in turn; exits if one fails
#   stamp TEXT                 "== [seconds since T0] TEXT"
LLAMA_BENCH=/tmp/lb/lc/build/bin/llama-bench
T0=${T0:-$(date +%s)}

stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

install_wheels() {
  [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >/dev/null 2>&1
}

build_llama_bench() {
  local bench=${BENCH:-$ROOT/.bench}
  if [ ! -x $LLAMA_BENCH ] && compgen -G "$ROOT/.lb/lb.tar.xz.part*" >/dev/null; then
    cat "$ROOT"/.lb/lb.tar.xz.part* | tar -C / -xJf - && "$LLAMA_BENCH" --help >/dev/null 2>&1 \
        || { echo "(the carried llama-bench does not run here: building it)" >> "$1"; rm -rf /tmp/lb/lc/build; }
  fi
  [ -x $LLAMA_BENCH ] || pgrep -f build_llama_bench >/dev/null || (nice -n 19 setsid bash \
      "$bench/build_llama_bench.sh" "$bench/llama.cpp-src.tar.xz" /tmp/lb > "$1" 2>&1 < /dev/null &)
}

export_llama_bench() {
  [ -x $LLAMA_BENCH ] || { echo "error: no llama-bench built to export"; return 1; }
  mkdir -p "$1" && (cd / && find tmp/lb/lc/build -name llama-bench -type f -o -name '*.so*' | tar -cJf - -T -) \
      | split -b 15M -d - "$1/lb.tar.xz.part"
}

patched_copy() {
  rm -rf "$1" && mkdir -p "$1" && cp -r engine kernels tools tests dev pyproject.toml "$1/"
  local patch
  for patch in ${2//+/ }; do
    (cd "$1" && git apply "$ROOT/$patch") || { echo "error: $patch does not apply"; exit 1; }
  done
}
