"""Quantize one F32 GGUF with ``engine quantize`` and with llama.cpp's ``llama-quantize``; compare per tensor.

For each file type, every tensor's type and bytes are compared (llama-quantize writes the tensors in
layer order, so they are matched by name). Without an input file a synthetic F32 model is written
first: random weights with 256-multiple widths and a 640-wide FFN (rows that are not whole
super-blocks), --layers layers, untied output head, the vocabulary of --tokenizer.

    python tools/check_llama_quantize.py --llama-quantize /tmp/lcpu/lc/build/bin/llama-quantize \\
        --tokenizer ../shared/bench/tokenizer-smollm2.gguf [--model f32.gguf] [--types q4_k_m,q6_k]

Prints one line per file type: tensors with the same type as llama-quantize's, with the same bytes.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ModelConfig, RopeConfig  # noqa: E402
from engine.convert.requantize import quantize_gguf  # noqa: E402
from engine.convert.synthetic import write_synthetic_gguf  # noqa: E402
from engine.weights.gguf import GGUFFile  # noqa: E402
from engine.weights.quant import GGMLType  # noqa: E402

DEFAULT_TYPES = "q4_k_m,q4_k_s,q5_k_m,q5_k_s,q6_k,q8_0,q5_0,q5_1,q4_0,q4_1"


def synthetic_f32(dest: Path, tokenizer: Path, n_layers: int) -> None:
    config = ModelConfig(n_layers=n_layers, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=640,
                         vocab_size=49152, norm_eps=1e-5, context_length=2048,
                         rope=RopeConfig(theta=10000.0, dim=64, original_context=2048), tied_embeddings=False,
                         name="kquant check", architecture="llama")
    write_synthetic_gguf(dest, config, tokenizer, matrix_type=GGMLType.F32, embedding_type=GGMLType.F32)


def compare(ours: Path, theirs: Path) -> tuple[int, int, int, list[str]]:
    a, b = GGUFFile(ours), GGUFFile(theirs)
    assert a.tensors.keys() == b.tensors.keys()
    same_type = same_bytes = 0
    differences = []
    for name, info in a.tensors.items():
        other = b.tensors[name]
        if info.ggml_type == other.ggml_type:
            same_type += 1
            if np.array_equal(a.raw(name), b.raw(name)):
                same_bytes += 1
            else:
                differences.append(f"{name}: bytes differ")
        else:
            differences.append(f"{name}: {GGMLType(info.ggml_type).name} vs llama.cpp {GGMLType(other.ggml_type).name}")
    return len(a.tensors), same_type, same_bytes, differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-quantize", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="GGUF whose vocabulary the synthetic model takes")
    parser.add_argument("--model", type=Path, help="an F32 GGUF to quantize instead of a synthetic one")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--types", default=DEFAULT_TYPES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "f32.gguf"
            synthetic_f32(model, args.tokenizer, args.layers)
        for name in args.types.split(","):
            ours, theirs = tmp / f"engine-{name}.gguf", tmp / f"llama-{name}.gguf"
            quantize_gguf(model, ours, name, progress=False)
            subprocess.run([str(args.llama_quantize), str(model), str(theirs), name.upper(), "1"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            n, same_type, same_bytes, differences = compare(ours, theirs)
            print(f"{name:7s} {n} tensors: {same_type} same type, {same_bytes} same bytes"
                  + "".join(f"\n    {line}" for line in differences[:10]))
            ours.unlink()
            theirs.unlink()


if __name__ == "__main__":
    main()
