"""Where one decode step's GPU time goes, per kernel, at a real model's shapes (random weights).

Prefills --depth tokens, builds the graph decoder (the fused decode step that `engine generate` runs), then
records --steps graph replays with torch's profiler (CUPTI sees every kernel of the process, CuPy's too)
and prints the kernels by total time per step, beside the step's wall time and the bytes of weights and
KV cache one step reads (the floor at the device's copy rate). Kernels overlap (programmatic dependent launches
start a kernel before the one it waits for ends), so a kernel's time is not what it adds to the step; the "span"
column is: the kernels ordered by their ends, each one's end minus the end before it (the time the step's last
finished kernel moved on while it was the one ending). Spans sum to the step's GPU time (plus the gaps between
steps, counted to each step's first kernel).

    python tools/profile_decode.py --shape llama3-8b|smollm2 [--dtype bf16] [--depth 512,32768] [--steps 50]
                                   [--define N=V] [--blocks-per-sm N] [--no-pdl] [--no-cluster]
Needs a GPU, CuPy and torch.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.bench import load_bench_model, new_cache  # noqa: E402
from engine.options import LoadSettings  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def step_bytes(llm, depth: int) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) one decode step reads: every matrix but the embedding, every cached key
    and value at `depth` in the activation dtype."""
    weights = sum(w.raw.nbytes for name, w in llm.loaded.weights.items() if name != "token_embd")
    c = llm.model.config
    kv = 2 * c.n_layers * depth * c.n_kv_heads * c.head_dim * 2
    return weights, kv


def ready_decoder(model, backend, cache, prompt: np.ndarray):
    """prompt prefilled into cache (4096 tokens a forward), then a greedy graph decoder past its eager step, its
    capture and a first replay -> (the decoder, the token its last step gave)."""
    for i in range(0, len(prompt), 4096):
        model.forward(prompt[i:i + 4096], cache, logits_for="none")
    dec = backend.decoder(model, cache, SamplingParams(temperature=0.0), list(prompt))
    tok = dec.first(np.zeros(model.config.vocab_size, np.float32))
    for _ in range(3):
        tok = dec.step(tok)  # eager, capture, replay
    return dec, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b",
                    help="a preset of engine bench --shape, or smollm2 (the default model's shapes)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--depth", default="512,32768")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                    help="build the kernels with -DNAME=VALUE (a measurement variant, e.g. PREFETCH_TASKS=1)")
    ap.add_argument("--blocks-per-sm", type=int, default=None, metavar="N",
                    help="the GEMVs' grid at N blocks an SM, their kernels bounded for it (-DGEMV_MIN_BLOCKS=N; "
                         "default gemv.BLOCKS_PER_SM)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch the GEMVs and the decode attention + combine plainly, not as programmatic dependent "
                         "launches (engine/backends/cuda/pdl.py; Hopper)")
    ap.add_argument("--no-cluster", action="store_true",
                    help="hand the prenorm epilogue's 32-row groups off through atomic counts, not in thread block "
                         "clusters (engine/backends/cuda/gemv.py prenorm_cluster; Hopper)")
    args = ap.parse_args()
    from engine.backends.cuda import gemv, kernels, pdl

    pdl.ENABLED = not args.no_pdl
    gemv.CLUSTER_HANDOFF = not args.no_cluster

    if args.blocks_per_sm:
        gemv.BLOCKS_PER_SM = args.blocks_per_sm
        args.define.append(f"GEMV_MIN_BLOCKS={args.blocks_per_sm}")
    kernels.NVRTC_OPTIONS += tuple(f"-D{d}" for d in args.define)
    import cupy
    import torch
    from torch.profiler import ProfilerActivity, profile

    depths = [int(d) for d in args.depth.split(",")]
    llm, label = load_bench_model(LoadSettings(device="cuda", dtype=args.dtype, context=max(depths) + 256),
                                  synthetic=True, shape=None if args.shape == "smollm2" else args.shape)
    model, backend = llm.model, llm.backend
    rng = np.random.default_rng(0)
    for depth in depths:
        cache = new_cache(model, depth + args.steps + 64)
        dec, tok = ready_decoder(model, backend, cache, rng.integers(0, model.config.vocab_size, depth))
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tok = dec.step(tok)
        cupy.cuda.Device().synchronize()
        wall = (time.perf_counter() - t0) / args.steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                tok = dec.step(tok)
            cupy.cuda.Device().synchronize()
            torch.cuda.synchronize()
        per_kernel = defaultdict(lambda: [0.0, 0, 0.0])  # name -> [us a step, launches, span us a step]
        events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                        key=lambda e: e.time_range.end)
        for before, event in zip([None] + events[:-1], events):
            entry = per_kernel[event.name]
            entry[0] += event.device_time_total / args.steps
            entry[1] += 1
            if before is not None:
                entry[2] += (event.time_range.end - before.time_range.end) / args.steps
        gpu = sum(t for t, _, _ in per_kernel.values())
        spans = sum(s for _, _, s in per_kernel.values())
        weights, kv = step_bytes(llm, depth)
        variant = " ".join(args.define + ["no-pdl"] * args.no_pdl + ["no-cluster"] * args.no_cluster)
        print(f"\n{label} {args.dtype} {variant}, depth {depth}: step {wall * 1e6:.0f} us ({1 / wall:.1f} tok/s), "
              f"kernels {gpu:.0f} us; reads {weights / 1e9:.2f} GB weights + {kv / 1e9:.2f} GB KV "
              f"(at 3.3 TB/s: {(weights + kv) / 3.3e12 * 1e6:.0f} us); spans {spans:.0f} us")
        print(f"{'us/step':>9} {'span':>9} {'calls/step':>10}  kernel")
        for name, (t, calls, span) in sorted(per_kernel.items(), key=lambda kv_: -kv_[1][0])[:args.top]:
            print(f"{t:9.1f} {span:9.1f} {calls / args.steps:10.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
