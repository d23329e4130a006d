"""What a KV cache type costs in quality: perplexity, KL divergence from the f32 cache's next-token distributions,
top-1 agreement, and bytes per token, for each --cache-type-k/-v (keys and values of the same type).

    python tools/kv_cache_quality.py --text book.txt --tokens 4096                    # CPU, the default model
    python tools/kv_cache_quality.py --text book.txt --tokens 16384 --types f32,q8_0 -m model.gguf --dca on

One window of --tokens tokens from the start of the text; every type runs the same ids. The f32 row is the
reference (KL 0). Bytes per token: the KV cache's, over all layers (engine/memory.py).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import engine
from engine import memory


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(n, vocab) float32 -> float64 log-probabilities."""
    rows = logits.astype(np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    rows -= np.log(np.exp(rows).sum(axis=1, keepdims=True))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", required=True, help="a text file (its first --tokens tokens are scored)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--types", default="f32,f16,q8_0,q5_1,q5_0,q4_1,q4_0",
                        help="cache types to compare; the first is the reference")
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--dca", default="auto", choices=("auto", "on", "off"))
    args = parser.parse_args()
    types = args.types.split(",")
    reference = None
    print(f"{'type':6} {'bytes/token':>11} {'ppl':>9} {'KL vs ' + types[0]:>12} {'top-1 same':>10} {'seconds':>8}")
    for cache_type in types:
        llm = engine.load(args.model, context=args.tokens, dca=args.dca, cache_type_k=cache_type,
                          cache_type_v=cache_type)
        ids = llm.tokenize(open(args.text, encoding="utf-8").read())[:args.tokens]
        if len(ids) < args.tokens:
            raise SystemExit(f"{args.text} has only {len(ids)} tokens, fewer than --tokens {args.tokens}")
        t0 = time.perf_counter()
        logprobs = log_softmax(llm.logits(ids))  # (n, vocab)
        seconds = time.perf_counter() - t0
        ppl = float(np.exp(-logprobs[np.arange(len(ids) - 1), ids[1:]].mean()))
        if reference is None:
            reference = logprobs
        kl = float((np.exp(reference) * (reference - logprobs)).sum(axis=1).mean())
        same = float((reference.argmax(axis=1) == logprobs.argmax(axis=1)).mean())
        per_token = memory.kv_bytes_per_token(llm.config, llm.cache_types)
        print(f"{cache_type:6} {per_token:>11,} {ppl:>9.3f} {kl:>12.5f} {same:>10.4f} {seconds:>8.1f}", flush=True)
        del llm, logprobs


if __name__ == "__main__":
    main()
