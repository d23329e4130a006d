"""Quantization throughput on one layer of an 8B-shape model: the engine's encoders beside llama.cpp's.

    python tools/quant_speed.py [--shape llama3-8b] [--types q8_0,q4_0,q4_k,q5_k,q6_k] [--threads 1,2]
                                [--ggml libggml-base.so] [--quantize q4_k_m [--llama-quantize PATH]]

Per type: the layer's seven matrices (engine/models/presets.py shapes) are filled with N(0, 1/fan-in)
float32 values, one tensor at a time, and streamed through ``TensorJob.data(threads)`` as ``engine
quantize`` does (F32 source -> slabs of rows -> encoder; nothing written to disk), once per thread
count. MB/s counts float32 input bytes per wall-clock second. With --ggml, the same tensors go through
llama.cpp's ``ggml_quantize_chunk`` (the per-tensor call of llama-quantize without an importance
matrix) on one thread, and the bytes are compared.

With --quantize TYPE: a synthetic F32 GGUF of the shape with one layer and the default model's
vocabulary (token_embd and output 49152 x d, the layer's matrices and norms;
engine/convert/synthetic.py) is written to --workdir, then ``engine quantize``'s function rewrites
it as TYPE once per thread count, timed; with --llama-quantize, llama.cpp's binary quantizes the same
file (same thread counts) and the two outputs are compared byte for byte.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.convert.requantize import quantize_gguf  # noqa: E402
from engine.convert.synthetic import write_synthetic_gguf  # noqa: E402
from engine.convert.tensors import TensorJob  # noqa: E402
from engine.default_model import default_model_path  # noqa: E402
from engine.loader import WeightTensor  # noqa: E402
from engine.models.family import family  # noqa: E402
from engine.models.presets import preset  # noqa: E402
from engine.weights.gguf import GGUFFile  # noqa: E402
from engine.weights.quant import GGMLType, tensor_nbytes  # noqa: E402

SYNTHETIC_VOCAB = 49152  # the default model's vocabulary (the donor of the synthetic file's tokenizer)


def layer_shapes(shape: str) -> dict[str, tuple[int, int]]:
    config = preset(shape)
    shapes = family(config.architecture).tensor_shapes(config, with_output=True)
    return {name: s for name, s in shapes.items() if name.startswith("blk.0.") and len(s) == 2}


def load_ggml(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def encoder_table(shape: str, types: list[GGMLType], thread_counts: list[int], lib: ctypes.CDLL | None) -> None:
    shapes = layer_shapes(shape)
    engine_s = {(t, n): 0.0 for t in types for n in thread_counts}
    ggml_s, equal = dict.fromkeys(types, 0.0), dict.fromkeys(types, True)
    total_bytes = 0
    rng = np.random.default_rng(0)
    for name, tensor_shape in shapes.items():
        x = (rng.standard_normal(tensor_shape, dtype=np.float32) / np.float32(np.sqrt(tensor_shape[1])))
        total_bytes += x.nbytes
        source = WeightTensor(name, GGMLType.F32, tensor_shape, x.view(np.uint8).reshape(-1))
        for t in types:
            outputs = []
            for n in thread_counts:
                started = time.perf_counter()
                outputs.append(TensorJob(name, source, t).data(n))
                engine_s[t, n] += time.perf_counter() - started
            equal[t] &= all(np.array_equal(out, outputs[0]) for out in outputs)
            if lib is not None:
                theirs = np.empty(tensor_nbytes(t, tensor_shape), np.uint8)
                started = time.perf_counter()
                lib.ggml_quantize_chunk(int(t), x.ctypes.data, theirs.ctypes.data, 0, tensor_shape[0],
                                        tensor_shape[1], None)
                ggml_s[t] += time.perf_counter() - started
                equal[t] &= bool(np.array_equal(outputs[0], theirs))
        print(f"{name} {tensor_shape} done", file=sys.stderr, flush=True)
    print(f"{shape} layer 0: {len(shapes)} matrices, {total_bytes / 1e6:.0f} MB of float32; "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| type | " + " | ".join(f"engine, {n} thread{'s' * (n > 1)}, MB/s" for n in thread_counts) + " |"
          + (" llama.cpp ggml_quantize_chunk, 1 thread, MB/s |" if lib else "") + " same bytes |")
    print("|---|" + "---:|" * (len(thread_counts) + (lib is not None)) + "---|")
    for t in types:
        cells = [f"{total_bytes / engine_s[t, n] / 1e6:.1f}" for n in thread_counts]
        if lib is not None:
            cells.append(f"{total_bytes / ggml_s[t] / 1e6:.1f}")
        print(f"| {t.name} | " + " | ".join(cells) + f" | {'yes' if equal[t] else 'NO'} |")


def quantize_table(shape: str, file_type: str, thread_counts: list[int], workdir: Path,
                   llama_quantize: Path | None) -> None:
    config = dataclasses.replace(preset(shape), n_layers=1, vocab_size=SYNTHETIC_VOCAB)
    source = workdir / f"{shape}-1-layer-f32.gguf"
    if not source.exists():
        write_synthetic_gguf(source, config, default_model_path(), matrix_type=GGMLType.F32,
                             embedding_type=GGMLType.F32)
    size = source.stat().st_size
    embeddings = "token_embd" if config.tied_embeddings else "token_embd and output"
    print(f"\n`engine quantize` of {source.name} ({size / 1e6:.0f} MB: one {shape} layer, {embeddings} "
          f"{SYNTHETIC_VOCAB} x {config.d_model}, F32) to {file_type}:\n")
    print("| program | threads | seconds | MB/s | load average after | same bytes as the engine |")
    print("|---|---:|---:|---:|---:|---|")
    ours = workdir / f"engine-{file_type}.gguf"
    for n in thread_counts:
        stats = quantize_gguf(source, ours, file_type, force=True, progress=False, threads=n)
        print(f"| engine | {n} | {stats.seconds:.1f} | {size / stats.seconds / 1e6:.1f} | "
              f"{os.getloadavg()[0]:.1f} | |", flush=True)
    if llama_quantize is None:
        return
    theirs = workdir / f"llama-{file_type}.gguf"
    for n in thread_counts:
        started = time.perf_counter()
        subprocess.run([str(llama_quantize), str(source), str(theirs), file_type.upper(), str(n)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        print(f"| llama-quantize | {n} | {seconds:.1f} | {size / seconds / 1e6:.1f} | {os.getloadavg()[0]:.1f} | "
              f"{'yes' if same_tensors(ours, theirs) else 'NO'} |", flush=True)


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of the same name, type and bytes in both files (their metadata may differ)."""
    fa, fb = GGUFFile(a), GGUFFile(b)
    return fa.tensors.keys() == fb.tensors.keys() and all(
        fa.tensors[name].ggml_type == fb.tensors[name].ggml_type and np.array_equal(fa.raw(name), fb.raw(name))
        for name in fa.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--types", default="q8_0,q4_0,q4_k,q5_k,q6_k", help="encoder table types ('' for none)")
    parser.add_argument("--threads", default="1,2", help="thread counts to time, comma-separated")
    parser.add_argument("--ggml", type=Path, help="llama.cpp's libggml-base.so, to time ggml_quantize_chunk too")
    parser.add_argument("--quantize", metavar="FILE_TYPE", help="also time engine quantize of a synthetic layer set")
    parser.add_argument("--llama-quantize", type=Path, help="llama.cpp's llama-quantize, timed on the same file")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "quant_speed")
    args = parser.parse_args()
    thread_counts = [int(n) for n in args.threads.split(",")]
    if args.types:
        types = [GGMLType[name.upper()] for name in args.types.split(",")]
        encoder_table(args.shape, types, thread_counts, load_ggml(args.ggml) if args.ggml else None)
    if args.quantize:
        args.workdir.mkdir(parents=True, exist_ok=True)
        quantize_table(args.shape, args.quantize, thread_counts, args.workdir, args.llama_quantize)


if __name__ == "__main__":
    main()
