"""Where a prefill's GPU time goes, per op, at SmolLM2-135M's or a real model's shapes (random weights).

The plain prefills (the backend's prompt blocks, as a user's prompt runs) print their wall time and the host's
queueing time: queueing about the whole wall time means the prefill is bound by the host. Then one prefill through
the composed blocks (``Llama``'s own, the backend's ops one by one) with every op bracketed by CUDA events (GPU
time, host launch work excluded) and timed on the host (its wrapper's work and launches, per call); matrix products
are split per weight kind with their FLOP rate. Then cuBLAS alone on the
same GEMM shapes (the ceiling those ops could reach), and whole prefills of --long tokens at several
micro-batch sizes.

    python tools/profile_prefill.py [--shape smollm2|llama3.2-1b|...] [--dtype f16|bf16] [--tokens 32768]
        [--ubatch 8192,32768] [--long 131072] [--long-ubatch 8192,32768]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.bench import _prefill, load_bench_model, new_cache  # noqa: E402
from engine.options import LoadSettings  # noqa: E402

OPS = ("embedding", "linear", "rmsnorm", "add", "add_linear", "linear_group", "swiglu", "store_kv",
       "attention")


class OpTimer:
    """Wraps the backend's ops; records (label, flops, start event, end event, host seconds) per outermost call
    (an op that calls another, e.g. linear_group -> linear, is timed once): the GPU time between the events, and the
    time the host spent in the op's call (its wrapper's work and the launches it queues)."""

    def __init__(self, cp, backend):
        self.cp, self.backend, self.calls, self.depth = cp, backend, [], 0
        self.originals = {}
        for name in OPS:
            if hasattr(backend, name):
                self.originals[name] = getattr(backend, name)
                setattr(backend, name, self._wrap(name, self.originals[name]))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            label, flops = name, 0.0
            if name in ("linear", "add_linear"):
                x, w = (args[0], args[1]) if name == "linear" else (args[1], args[2])
                label = f"{name} {w.name.split('.')[-1]} {w.rows}x{w.cols}"
                flops = 2.0 * x.shape[0] * w.rows * w.cols
            elif name == "linear_group":
                x, ws = args[0], args[1]
                label = "linear_group " + "+".join(w.name.split('.')[-1] for w in ws)
                flops = sum(2.0 * x.shape[0] * w.rows * w.cols for w in ws)
            start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
            start.record()
            self.depth += 1
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                host = time.perf_counter() - t0
                self.depth -= 1
            end.record()
            self.calls.append((label, flops, start, end, host))
            return out
        return timed

    def restore(self):
        for name, fn in self.originals.items():
            setattr(self.backend, name, fn)

    def table(self, wall_ms: float) -> None:
        self.cp.cuda.Device().synchronize()
        ms, host_ms, flops, count = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(int)
        for label, f, start, end, host in self.calls:
            ms[label] += self.cp.cuda.get_elapsed_time(start, end)
            host_ms[label] += host * 1e3
            flops[label] += f
            count[label] += 1
        total = sum(ms.values())
        print(f"  {'op':44s} {'calls':>5s} {'ms':>8s} {'share':>6s} {'TFLOP/s':>8s} {'host us/call':>12s}")
        for label in sorted(ms, key=ms.get, reverse=True):
            rate = f"{flops[label] / ms[label] / 1e9:8.1f}" if flops[label] else ""
            print(f"  {label:44s} {count[label]:5d} {ms[label]:8.2f} {ms[label] / total:6.1%} {rate:>8s} "
                  f"{host_ms[label] / count[label] * 1e3:12.1f}")
        non_attention = total - sum(v for k, v in ms.items() if k == "attention")
        mm = sum(flops.values())
        print(f"  host time in the ops' calls {sum(host_ms.values()):.2f} ms")
        print(f"  sum of ops {total:.1f} ms (wall {wall_ms:.1f} ms); without attention {non_attention:.1f} ms = "
              f"{mm / non_attention / 1e9:.1f} TFLOP/s on the matmuls")


def profile(model, backend, cp, n: int, ubatch: int, untimed_runs: int = 3) -> None:
    """The per-op table of one prefill, after `untimed_runs` plain ones (the first warms up), each of which prints
    its wall time and the part of it the host spent queueing the work (it returns before the GPU is done): when
    queueing takes about the whole wall time, the prefill is bound by the host's launches, not the GPU."""
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, n)
    for run in range(untimed_runs):
        wall, queued = plain_prefill(model, cp, ids, ubatch)
        print(f"prefill {n} tokens, ubatch {ubatch}, run {run}: wall {wall:.2f} ms, host queueing {queued:.2f} ms"
              f" ({n / wall * 1e3:.0f} tokens/s)")
    prompt_blocks = [stage.prompt_blocks for stage in model.stages]
    for stage in model.stages:  # the table times the backend's ops, which the composed blocks call one by one
        stage.prompt_blocks = model
    timer = OpTimer(cp, backend)
    wall, _ = plain_prefill(model, cp, ids, ubatch)
    timer.restore()
    for stage, blocks in zip(model.stages, prompt_blocks):
        stage.prompt_blocks = blocks
    print(f"prefill {n} tokens, ubatch {ubatch}, the composed blocks op by op:")
    timer.table(wall)


def plain_prefill(model, cp, ids, ubatch: int) -> tuple[float, float]:
    """One prefill of `ids` into a fresh cache -> (wall ms, ms the host spent queueing it)."""
    cache = new_cache(model, len(ids) + 8)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    _prefill(model, cache, ids, ubatch)
    queued = (time.perf_counter() - t0) * 1e3
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) * 1e3, queued


def gemm_ceiling(cp, config, n: int) -> None:
    """cuBLAS fp16 GEMMs of the model's shapes: (n, k) @ (m, k)^T."""
    print(f"cuBLAS alone, {n} rows (cupy.matmul, fp16 in/out, fp32 accumulation):")
    d, ffn = config.d_model, config.ffn_dim
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    for m, k, what in ((q, d, "q"), (d, q, "o"), (kv, d, "k / v"), (q + 2 * kv, d, "q+k+v"), (ffn, d, "gate / up"),
                       (2 * ffn, d, "gate+up"), (d, ffn, "down")):
        x = cp.random.standard_normal((n, k), dtype=cp.float32).astype(cp.float16)
        w = cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
        cp.matmul(x, w.T)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(20):
            cp.matmul(x, w.T)
        end.record()
        end.synchronize()
        ms = cp.cuda.get_elapsed_time(start, end) / 20
        print(f"  {what:10s} m={m:5d} k={k:5d}: {ms * 1e3:7.1f} us  {2 * n * m * k / ms / 1e9:6.1f} TFLOP/s")


def long_prefill(model, cp, n: int, ubatches) -> None:
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, n)
    for ubatch in ubatches:
        cache = new_cache(model, n + 8)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        _prefill(model, cache, ids, ubatch)
        cp.cuda.Device().synchronize()
        s = time.perf_counter() - t0
        print(f"prefill {n} tokens, ubatch {ubatch}: {s:.2f} s ({n / s:.0f} tokens/s)")
        cache = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2",
                        help="a preset of engine bench --shape, or smollm2 (the default model's shapes)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--ubatch", default="8192,32768")
    parser.add_argument("--long", type=int, default=131072)
    parser.add_argument("--long-ubatch", default="8192,32768")
    args = parser.parse_args()
    import cupy as cp

    settings = LoadSettings(device="cuda", dtype=args.dtype, context=max(args.tokens, args.long) + 256, dca="on")
    llm, label = load_bench_model(settings, synthetic=True, shape=None if args.shape == "smollm2" else args.shape)
    model, backend, dca = llm.model, llm.backend, llm.dca
    print(f"model: {label}; DCA {dca}")
    for ubatch in (int(u) for u in args.ubatch.split(",")):
        profile(model, backend, cp, args.tokens, ubatch)
    gemm_ceiling(cp, model.config, args.tokens)
    if args.long:
        long_prefill(model, cp, args.long, [int(u) for u in args.long_ubatch.split(",")])


if __name__ == "__main__":
    main()
