"""The program Nsight Compute profiles (dev/cuda/ncu_call.sh): one decode step of a preset shape, nothing else.

Random weights of --shape (engine bench --shape), --depth random tokens prefilled, the graph decoder made ready
(its eager step, capture and first replay: tools/profile_decode.py ready_decoder), then one more step between
cudaProfilerStart and cudaProfilerStop, so that `ncu --profile-from-start off` sees that step's kernels only.

    ncu --profile-from-start off ... python3 dev/cuda/ncu_step.py --shape llama3-8b --depth 512 [--dtype bf16]
Needs a GPU and CuPy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from engine.bench import load_bench_model, new_cache  # noqa: E402
from engine.options import LoadSettings  # noqa: E402
from profile_decode import ready_decoder  # noqa: E402


def ready_step(shape: str, depth: int, dtype: str):
    """Random weights of `shape`, `depth` random tokens prefilled, the graph decoder past its capture and first
    replay -> (the decoder, the token its last step gave, the model's label)."""
    llm, label = load_bench_model(LoadSettings(device="cuda", dtype=dtype, context=depth + 256), synthetic=True,
                                  shape=shape)
    cache = new_cache(llm.model, depth + 64)
    prompt = np.random.default_rng(0).integers(0, llm.model.config.vocab_size, depth)
    dec, tok = ready_decoder(llm.model, llm.backend, cache, prompt)
    return dec, tok, label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", help="a preset of engine bench --shape")
    ap.add_argument("--depth", type=int, default=512, help="tokens in the cache before the profiled step")
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    import cupy

    dec, tok, label = ready_step(args.shape, args.depth, args.dtype)
    cupy.cuda.Device().synchronize()
    cupy.cuda.runtime.profilerStart()
    dec.step(tok)
    cupy.cuda.Device().synchronize()
    cupy.cuda.runtime.profilerStop()
    print(f"{label} {args.dtype}: one decode step after {args.depth} tokens profiled")


if __name__ == "__main__":
    main()
