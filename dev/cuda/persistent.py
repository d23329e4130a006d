"""Development driver: a Llama-3-8B layer's four one-token GEMVs (q+k+v, o, gate+up, down; Q4_K) over four distinct
layers, as 16 launches of the production kernel body against ONE persistent launch separated by grid barriers
(dev/cuda/persistent.cu), with and without asking L2 for the next phase's rows before each barrier. Needs a GPU
(sm_90 for the bulk prefetch); run from the repository root:

    python dev/cuda/persistent.py [--reps 5] [--bps 1,2,3] [--prefetch 0,65536,all]

Check: every persistent variant's outputs equal the production body's (fp32 there, act_t here: its rounding of the
same sums) for every phase, bit for bit. Timing: dev/cuda/gemv.py's time_launches (a CUDA graph; the persistent
launch is preceded by the zeroing of its barrier counter); us per layer and the fraction of the copy floor.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.bench import synthetic_weight  # noqa: E402

_spec = importlib.util.spec_from_file_location("gemv_tma_driver", Path(__file__).with_name("gemv_tma.py"))
tma = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tma)
driver = tma.driver

THREADS = 256
MAX_PHASES = 16
PHASE = np.dtype({"names": ["w", "row_bytes", "x", "y", "rows", "cols"],
                  "formats": ["<u8", "<i8", "<u8", "<u8", "<i4", "<i4"], "offsets": [0, 8, 16, 24, 32, 36],
                  "itemsize": 40})


def chain_bytes(phases) -> np.ndarray:
    """persistent.cu's Chain: MAX_PHASES 40-byte phases, then n (int32) at byte 640."""
    table = np.zeros(MAX_PHASES, PHASE)
    for i, (w, row_bytes, x, y, rows, cols) in enumerate(phases):
        table[i] = (w.data.ptr, row_bytes, x.data.ptr, y.data.ptr, rows, cols)
    return np.concatenate([table.view(np.uint8), np.array([len(phases), 0], np.int32).view(np.uint8)])


def resident_blocks(cp, kernel, shared: int) -> int:
    """Blocks of `kernel` one SM holds at once (the driver's occupancy query; 1 if it is unavailable)."""
    try:
        return int(cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, THREADS, shared))
    except AttributeError:
        return 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bps", default="1,2,3")
    ap.add_argument("--prefetch", default="0,65536,all")
    args = ap.parse_args()
    import cupy as cp

    attributes = cp.cuda.Device().attributes
    sms, smem_limit = attributes["MultiProcessorCount"], attributes["MaxSharedMemoryPerBlockOptin"]
    module = tma.build(cp, ("persistent.cu",))
    kernel = module.get_function("persistent_chain_q4_k")
    rng = np.random.default_rng(12)
    gemvs = []
    for shape in tma.LAYER_8B:
        rows, cols, ggml_type = driver.SHAPES[shape]
        tensor = synthetic_weight(f"blk.0.{shape}", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
        gemvs.append(tma.Gemv(cp, module, shape, tensor, sms, smem_limit))
    layers = min(4, min(len(g.datas) for g in gemvs))
    outputs = [[cp.zeros(g.rows, dtype=cp.float16) for g in gemvs] for _ in range(layers)]
    phases = [(g.datas[layer], g.row_bytes, g.x, outputs[layer][j], g.rows, g.cols)
              for layer in range(layers) for j, g in enumerate(gemvs)]
    chain = cp.asarray(chain_bytes(phases))
    counter = cp.zeros(1, dtype=cp.uint32)
    shared = max(g.in_bytes for g in gemvs)
    kernel.max_dynamic_shared_size_bytes = shared
    layer_bytes = sum(g.m.data.nbytes for g in gemvs)
    floor_us = layer_bytes / tma.COPY_BANDWIDTH_H100 * 1e6

    want = []
    for layer in range(layers):
        for g in gemvs:
            g.prod(layer)
            want.append(g.output().astype(np.float16))

    def prod(_):
        for layer in range(layers):
            for g in gemvs:
                g.prod(layer)

    us = driver.time_launches(cp, prod, 1, args.reps, per_graph=4) * 1e6 / layers
    print(f"8B layer: {layer_bytes / 1e6:.1f} MB, floor {floor_us:.1f} us at 3.35 TB/s; {layers} layers a launch; "
          f"{resident_blocks(cp, kernel, shared)} persistent blocks of {THREADS} fit an SM")
    print(f"  {'prod (16 launches)':28} {us:8.2f} us a layer  {floor_us / us:.2f} of the floor")
    fits = resident_blocks(cp, kernel, shared)
    for bps in (int(b) for b in args.bps.split(",")):
        if bps > fits:
            print(f"  bps {bps}: more blocks than an SM holds ({fits}), skipped (the barrier would never open)")
            continue
        for prefetch in args.prefetch.split(","):
            ahead = 1 << 40 if prefetch == "all" else int(prefetch)

            def persistent(_, bps=bps, ahead=ahead):
                counter.fill(0)
                kernel((sms * bps,), (THREADS,), (chain, counter, np.int64(ahead)), shared_mem=shared)

            for out in outputs:
                for y in out:
                    y.fill(np.nan)
            persistent(0)
            cp.cuda.Device().synchronize()
            got = [cp.asnumpy(y) for out in outputs for y in out]
            same = all(np.array_equal(g, w) for g, w in zip(got, want))
            us = driver.time_launches(cp, persistent, 1, args.reps, per_graph=4) * 1e6 / layers
            label = f"persistent/{bps} a SM/ahead {prefetch}"
            print(f"  {label:28} {us:8.2f} us a layer  {floor_us / us:.2f} of the floor  "
                  f"{'== prod' if same else 'DIFFERS'}")


if __name__ == "__main__":
    main()
