#!/usr/bin/env bash
# One GPU call: Nsight Compute's hardware counters for one decode step's layer (qkv, the decode attention, its combine,
# o, gate+up, down: the first KERNELS launches of the step) at the preset shapes and depths, one line a kernel
# (dev/cuda/ncu_report.py: time, DRAM rate and % of peak, SM-active %, occupancy, L2 hits, issue use, top stalls).
# Each kernel is replayed alone with cold caches (ncu's kernel replay), so times are in isolation, without the
# dependent launches' overlap: the counters say why a kernel reads below the copy rate, tools/profile_decode.py what
# it adds to the step. Needs the Firecracker runtime (device KINDS.md: gVisor has no counters).
#   SHAPES (default "llama3-8b llama2-7b"), DEPTHS (512,8192), DTYPE (bf16)
#   KERNELS  the name regex (default the layer's six kernels), COUNT launches profiled (6: one layer)
#   SASS=1   also PC sampling by instruction (SourceCounters) and the source page as CSV (sass_<shape>_<depth>.csv)
# Logs to $OUT (or /tmp/ncu_call): raw_<shape>_<depth>.csv, summary.md, ncu.log.
set -o pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOG=${OUT:-/tmp/ncu_call}
mkdir -p "$LOG" /tmp/ncu
source dev/cuda/device_lib.sh
install_wheels
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "error: ncu not found"; exit 1; }
"$NCU" --version | tail -1 | tee "$LOG/ncu.log"
export PYTHONPATH=/tmp/site:$ROOT OPENBLAS_NUM_THREADS=1
KERNELS=${KERNELS:-^(qkv|dca_decode|dca_combine|gemv_add|gateup)}
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
--section WarpStateStats --section SchedulerStats ${SASS:+--section SourceCounters}"
METRICS="--metrics dram__bytes_read.sum,sm__cycles_active.avg,sm__cycles_elapsed.avg,lts__t_sector_hit_rate.pct"
IFS=, read -ra depths <<< "${DEPTHS:-512,8192}"
: > "$LOG/summary.md"
for shape in ${SHAPES:-llama3-8b llama2-7b}; do
  for depth in "${depths[@]}"; do
    rep=/tmp/ncu/${shape}_$depth
    profile() {  # $@: extra ncu options
      timeout "${RUN_TIMEOUT:-200}" "$NCU" --profile-from-start off --clock-control none --graph-profiling node \
          -k "regex:$KERNELS" --launch-count "${COUNT:-6}" $SECTIONS "$@" -f -o "$rep" \
          python3 dev/cuda/ncu_step.py --shape "$shape" --depth "$depth" --dtype "${DTYPE:-bf16}" >> "$LOG/ncu.log" 2>&1
    }
    rm -f "$rep.ncu-rep"
    profile $METRICS || [ -f "$rep.ncu-rep" ] || { echo "(again without the extra metrics)" >> "$LOG/ncu.log"; profile; }
    [ -f "$rep.ncu-rep" ] || { echo "error: no report for $shape $depth (see ncu.log)"; tail -5 "$LOG/ncu.log"; continue; }
    "$NCU" -i "$rep.ncu-rep" --csv --page raw --print-units base > "$LOG/raw_${shape}_$depth.csv" 2>> "$LOG/ncu.log"
    if [ -n "$SASS" ]; then
      "$NCU" -i "$rep.ncu-rep" --csv --page source --print-source sass > "$LOG/sass_${shape}_$depth.csv" \
          2>> "$LOG/ncu.log" || echo "(no source page: see ncu.log)"
    fi
    { echo "## $shape, depth $depth, ${DTYPE:-bf16}"; echo
      python3 dev/cuda/ncu_report.py "$LOG/raw_${shape}_$depth.csv"; echo; } | tee -a "$LOG/summary.md"
    stamp "$shape $depth"
  done
done
