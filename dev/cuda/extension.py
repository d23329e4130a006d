"""Development driver for Self-Extend / StreamingLLM attention on CUDA (engine/backends/cuda/extension.py): the flash
kernel's passes (fused_attention) against the composed tiled path (blockwise_attention over CuPy arrays, what ran
before the passes and still runs for the attention temperature). Needs a GPU; run from the repository root:

    python dev/cuda/extension.py [--shapes 9x3x64,32x8x128] [--lengths 16384,65536] [--reps 3]

Check first: both paths on the same random fp16 cache (keys at the scheme's cached positions), one prompt of the
length (prefill) and the token after it (decode); their outputs must agree (relative error printed, fp16 rounding).
Then timing: the median of --reps calls of each path for one layer, in ms; ratio = composed / fused.
Shapes: query heads x KV heads x head_dim (SmolLM2-135M's 9x3x64, Llama-3-8B's 32x8x128).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import tiled_attention as T  # noqa: E402
from engine.backends.cuda import extension  # noqa: E402
from engine.config import RopeConfig  # noqa: E402
from engine.rope import RotaryTable  # noqa: E402
from engine.self_extend import SelfExtendConfig  # noqa: E402
from engine.streaming import StreamingConfig  # noqa: E402

SCHEMES = {"self-extend 8/1024": SelfExtendConfig(8, 1024), "streaming 4+2044": StreamingConfig(4, 2044)}


def median_ms(cp, call, reps: int) -> float:
    times = []
    for _ in range(reps):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        call()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    import cupy as cp

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="9x3x64,32x8x128")
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print("| scheme | shape | length | call | rel err | composed ms | fused ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n_heads, n_kv, head_dim = map(int, shape.split("x"))
        for length in map(int, args.lengths.split(",")):
            rotary = RotaryTable(RopeConfig(dim=head_dim), length + 1)
            rng = np.random.default_rng(length)
            tables = (cp.asarray(rotary.cos), cp.asarray(rotary.sin))
            backend = SimpleNamespace(cp=cp, dtype="f16", rotary_tables=lambda r: tables)
            q = cp.asarray(rng.standard_normal((length + 1, n_heads, head_dim)).astype(np.float16))
            k = rng.standard_normal((length + 1, n_kv, head_dim)).astype(np.float32)
            v = cp.asarray(rng.standard_normal((1, length + 1, n_kv, head_dim)).astype(np.float16))
            for name, scheme in SCHEMES.items():
                cached = T.rotate_keys(k, np.arange(length + 1), rotary, scheme).astype(np.float16)
                cache = SimpleNamespace(k=cp.asarray(cached[None]), v=v, length=0)
                for call, first, n in (("prefill", 0, length), ("decode", length, 1)):
                    cache.length = first
                    rows = q[first:first + n]
                    fused = lambda: extension.fused_attention(backend, rows, cache, 0, rotary, scheme)  # noqa: E731
                    composed = lambda: extension.composed_attention(backend, rows, cache, 0, rotary, scheme,  # noqa
                                                                    None)
                    got, ref = (cp.asnumpy(f()).astype(np.float64) for f in (fused, composed))
                    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                    t_composed, t_fused = median_ms(cp, composed, args.reps), median_ms(cp, fused, args.reps)
                    print(f"| {name} | {shape} | {length} | {call} | {err:.1e} | {t_composed:.2f} | {t_fused:.2f} | "
                          f"{t_composed / t_fused:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
