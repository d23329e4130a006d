"""Golden llama.cpp quantizer output for the engine's encoders (engine/convert/kquants.py, quantize.py).

Writes tests/golden/kquants.npz, read by tests/test_kquants.py:
  input      (8, 512) float32 rows: a gaussian row, 1e-6 and 1e3 scales, a negative-only row, a row of
             constants and zero sub-blocks, heavy tails, a row with an all-zero super-block, mixed
             sub-block magnitudes (seeded, reproducible)
  <TYPE>     (8, bytes per row) uint8: llama.cpp's bytes for those rows (Q4_K, Q5_K, Q6_K, Q5_0, Q5_1)
  source     a string naming the library the bytes came from

The bytes come from ``ggml_quantize_chunk(type, rows, ..., imatrix=NULL)`` of libggml-base, called
through ctypes: the function llama-quantize calls for every tensor when no importance matrix is
given (it dispatches to ``quantize_row_*_ref``). The checked-in file was made with the x86-64 CPU
build of ../shared/bench/llama.cpp-src.tar.xz (ggml 0.25.3, GCC 12.2, ggml-base built without
-march flags, hence without FMA contraction):

    cmake --build /tmp/lcpu/lc/build --target llama-quantize -j2   (or ../shared/bench/build_llama_bench.sh)
    python tools/golden_kquants.py --ggml /tmp/lcpu/lc/build/bin/libggml-base.so
"""
from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import numpy as np

from engine.weights.quant import GGMLType, tensor_nbytes

TYPES = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q5_0, GGMLType.Q5_1)
N_COLS = 512


def golden_input() -> np.ndarray:
    """(8, 512) float32 rows covering the quantizers' branches."""
    rng = np.random.default_rng(2026)
    rows = [
        rng.normal(size=N_COLS),
        rng.normal(size=N_COLS) * 1e-6,
        rng.normal(size=N_COLS) * 1e3,
        -np.abs(rng.normal(size=N_COLS)) - 2.0,
        np.repeat(rng.normal(size=N_COLS // 32), 32) * (np.arange(N_COLS) % 64 >= 16),  # constants, zero runs
        rng.standard_t(2, size=N_COLS),
        np.concatenate([np.zeros(256), rng.normal(size=256) * 0.02]),
        rng.normal(size=N_COLS) * np.exp(rng.uniform(-6, 3, size=N_COLS // 16)).repeat(16),
    ]
    return np.stack(rows).astype(np.float32)


def ggml_quantize(lib: ctypes.CDLL, t: GGMLType, x: np.ndarray) -> np.ndarray:
    out = np.zeros(tensor_nbytes(t, x.shape), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert written == out.size, (t.name, written, out.size)
    return out.reshape(x.shape[0], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ggml", type=Path, required=True, help="path of llama.cpp's libggml-base.so")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/golden/kquants.npz")
    args = parser.parse_args()
    lib = ctypes.CDLL(str(args.ggml))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(golden_input())
    arrays = {t.name: ggml_quantize(lib, t, x) for t in TYPES}
    np.savez_compressed(args.out, input=x, source=np.array(f"ggml_quantize_chunk of {args.ggml.name}"), **arrays)
    print(f"wrote {args.out}: {', '.join(arrays)} for {x.shape[0]} rows of {x.shape[1]}")


if __name__ == "__main__":
    main()
