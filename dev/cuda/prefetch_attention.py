"""Development driver (dev/cuda/NOTES.md v25): does asking L2 for the output projection's weights while the decode
attention runs make the decode step shorter?

At depth 512 the 8B step's attention + combine (~8 us a layer) read ~4 MB of cache: HBM is mostly idle, and the o
product after them (9.4 MB of Q4_K) runs at ~1.2 TB/s, its time mostly fixed costs and its first rows' round trips.
v8 asked L2 for the next GEMV's weights from inside a GEMV, which competed with that GEMV's own reads (slower); here a
side kernel (l2_prefetch.cu, one block) is forked onto a second stream after qkv and asks for o's weights (and, with
--gate-mb, the first MB of gate / up's) while attention runs; the streams join after the head.

Variants, each on a fresh cache and a fresh decoder graph (kept graphs are per cache), in interleaved rounds:
"none", "o", "o+gate<N>" (N = --gate-mb). Per variant: the step's wall time over graph replays (as
tools/profile_decode.py measures it) and the greedy tokens it generates, which must equal "none"'s (a prefetch
changes no value).

    python dev/cuda/prefetch_attention.py [--shape llama3-8b] [--dtype bf16] [--depth 512,8192] [--steps 60]
        [--rounds 2] [--gate-mb 16]
Needs a Hopper GPU (cp.async.bulk).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.bench import load_bench_model, new_cache  # noqa: E402
from engine.options import LoadSettings  # noqa: E402

_spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "tools" / "profile_decode.py")
profile_decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_decode)


class SidePrefetch:
    """Wraps the backend's attention and the fused head: before layer i's attention, a side stream (after the work
    queued so far: qkv) runs l2_prefetch over `regions(i)` ((device uint8 array, bytes) pairs); after the head the
    current stream waits for the side stream (a captured graph's fork joined before its end)."""

    def __init__(self, cp, kernel, backend, blocks, regions):
        self.cp, self.kernel, self.regions, self.side = cp, kernel, regions, cp.cuda.Stream(non_blocking=True)
        self.attention, self.head = backend.attention, blocks.head
        backend.attention, blocks.head = self._attention, self._head
        self.backend, self.blocks = backend, blocks

    def _attention(self, q, cache, layer, *args, **kwargs):
        if q.shape[0] == 1:  # a decode step (prefill runs the backend's own)
            current = self.cp.cuda.get_current_stream()
            self.side.wait_event(current.record())
            with self.side:
                for array, nbytes in self.regions(layer):
                    self.kernel((1,), (128,), (array, np.int64(nbytes)))
        return self.attention(q, cache, layer, *args, **kwargs)

    def _head(self, rows):
        logits = self.head(rows)
        self.cp.cuda.get_current_stream().wait_event(self.side.record())
        return logits

    def remove(self) -> None:
        self.backend.attention, self.blocks.head = self.attention, self.head


def regions_of(model, variant: str, gate_mb: int):
    """layer -> [(device bytes, nbytes)] a variant prefetches: nothing, o's weights, o's and gate / up's first MB."""
    layers = model.weights.layers

    def regions(i: int):
        if variant == "none":
            return []
        out = [(layers[i].attn_output.data, layers[i].attn_output.data.nbytes)]
        if variant.startswith("o+gate"):
            gate = layers[i].ffn_gate.whole or layers[i].ffn_gate
            out.append((gate.data, min(gate.data.nbytes, gate_mb << 20)))
        return out
    return regions


def run(cp, kernel, llm, variant: str, depth: int, steps: int, gate_mb: int) -> tuple[float, list[int]]:
    """(seconds a step over graph replays, the greedy tokens of the timed steps) with `variant`'s prefetch (kernel:
    l2_prefetch.cu's)."""
    model, backend = llm.model, llm.backend
    patch = SidePrefetch(cp, kernel, backend, model.decode_blocks, regions_of(model, variant, gate_mb))
    try:
        cache = new_cache(model, depth + steps + 64)
        prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, depth)
        dec, tok = profile_decode.ready_decoder(model, backend, cache, prompt)
        cp.cuda.Device().synchronize()
        tokens, t0 = [], time.perf_counter()
        for _ in range(steps):
            tok = dec.step(tok)
            tokens.append(int(tok))
        cp.cuda.Device().synchronize()
        seconds = (time.perf_counter() - t0) / steps
        dec.close()
        return seconds, tokens
    finally:
        patch.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--depth", default="512,8192")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gate-mb", type=int, default=16)
    args = ap.parse_args()
    import cupy as cp

    depths = [int(d) for d in args.depth.split(",")]
    llm, label = load_bench_model(LoadSettings(device="cuda", dtype=args.dtype, context=max(depths) + 256),
                                  synthetic=True, shape=None if args.shape == "smollm2" else args.shape)
    variants = ("none", "o", f"o+gate{args.gate_mb}")
    source = Path(__file__).with_name("l2_prefetch.cu").read_text()
    kernel = cp.RawModule(code=source, options=("-std=c++17",)).get_function("l2_prefetch")
    for depth in depths:
        times: dict[str, list[float]] = {v: [] for v in variants}
        reference = None
        for _ in range(args.rounds):
            for variant in variants:
                seconds, tokens = run(cp, kernel, llm, variant, depth, args.steps, args.gate_mb)
                reference = reference or tokens
                if tokens != reference:
                    raise SystemExit(f"{variant} at depth {depth}: tokens differ from the first run's")
                times[variant].append(seconds)
        base = min(times["none"])
        print(f"{label} {args.dtype}, depth {depth}: us a step (rounds), and against none")
        for variant in variants:
            best = min(times[variant])
            print(f"  {variant:12s} {' / '.join(f'{t * 1e6:.0f}' for t in times[variant]):>24s}  "
                  f"{(best / base - 1) * 100:+.1f}%  ({1 / best:.1f} tokens/s)")


if __name__ == "__main__":
    main()
