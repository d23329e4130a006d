"""Quantization throughput on one layer of an 8B-shape model: the engine's encoders beside llama.cpp's.

    python tools/quant_speed.py [--shape llama3-8b] [--types q8_0,q4_0,q4_k,q5_k,q6_k] [--ggml libggml-base.so]

The layer's seven matrices (engine/models/presets.py shapes) are filled with N(0, 1/fan-in) float32
values, one tensor at a time, and streamed through ``TensorJob.chunks`` as ``engine quantize`` does
(F32 source -> slabs of rows -> encoder; nothing written to disk). MB/s counts float32 input bytes.
With --ggml, the same tensors go through llama.cpp's ``ggml_quantize_chunk`` (the per-tensor call of
llama-quantize without an importance matrix) on one thread, and the bytes are compared.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.convert.tensors import TensorJob  # noqa: E402
from engine.loader import WeightTensor  # noqa: E402
from engine.models.family import family  # noqa: E402
from engine.models.presets import preset  # noqa: E402
from engine.weights.quant import GGMLType, tensor_nbytes  # noqa: E402


def layer_shapes(shape: str) -> dict[str, tuple[int, int]]:
    config = preset(shape)
    shapes = family(config.architecture).tensor_shapes(config, with_output=True)
    return {name: s for name, s in shapes.items() if name.startswith("blk.0.") and len(s) == 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--types", default="q8_0,q4_0,q4_k,q5_k,q6_k")
    parser.add_argument("--ggml", type=Path, help="llama.cpp's libggml-base.so, to time ggml_quantize_chunk too")
    args = parser.parse_args()
    lib = None
    if args.ggml:
        lib = ctypes.CDLL(str(args.ggml))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    shapes = layer_shapes(args.shape)
    types = [GGMLType[name.upper()] for name in args.types.split(",")]
    engine_s, ggml_s, equal = dict.fromkeys(types, 0.0), dict.fromkeys(types, 0.0), dict.fromkeys(types, True)
    total_bytes = 0
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1])))
        total_bytes += x.nbytes
        source = WeightTensor(name, GGMLType.F32, shape, x.view(np.uint8).reshape(-1))
        for t in types:
            started = time.perf_counter()
            ours = TensorJob(name, source, t).data()
            engine_s[t] += time.perf_counter() - started
            if lib is not None:
                theirs = np.empty(tensor_nbytes(t, shape), np.uint8)
                started = time.perf_counter()
                lib.ggml_quantize_chunk(int(t), x.ctypes.data, theirs.ctypes.data, 0, shape[0], shape[1], None)
                ggml_s[t] += time.perf_counter() - started
                equal[t] &= bool(np.array_equal(ours, theirs))
        print(f"{name} {shape} done", file=sys.stderr, flush=True)
    print(f"{args.shape} layer 0: {len(shapes)} matrices, {total_bytes / 1e6:.0f} MB of float32\n")
    print("| type | engine (numpy, 1 process) MB/s | " + ("llama.cpp ggml_quantize_chunk (1 thread) MB/s | same bytes |"
                                                        if lib else ""))
    print("|---|---:|" + ("---:|---|" if lib else ""))
    for t in types:
        line = f"| {t.name} | {total_bytes / engine_s[t] / 1e6:.1f} |"
        if lib is not None:
            line += f" {total_bytes / ggml_s[t] / 1e6:.1f} | {'yes' if equal[t] else 'NO'} |"
        print(line)


if __name__ == "__main__":
    main()
