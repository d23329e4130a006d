"""Time to first token for a long prompt: cold (full prefill) vs restored from a session file vs reused in memory.

    python tools/bench_prompt_cache.py --tokens 32768 --device cuda          # the issue's target: >= 20x at 32k
    python tools/bench_prompt_cache.py --tokens 1024 --device cpu
    python tools/bench_prompt_cache.py --tokens 32768 --device cuda -ctk q8_0 -ctv q8_0   # a q8_0 cache: half the bytes

The prompt is English prose (tests/prose.py). Each time ends when the first generated token id is on the host
(greedy). "restored" = reading the file into the cache + prefilling the prompt's last token + sampling; the file
is written once after the cold run (its size and the time to write it are printed too); "file_read_GBps" is its size
over the time reading it into the cache took.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import engine  # noqa: E402
from engine.kv_storage import CACHE_TYPES  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from prose import prose  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def prompt_ids(llm, n_tokens: int) -> list[int]:
    ids = llm.tokenize(prose())
    while len(ids) < n_tokens:
        ids += ids
    return ids[:n_tokens]


def first_token(session, ids) -> tuple[int, float]:
    t0 = time.perf_counter()
    token = next(session.generate_ids(ids, 1, GREEDY))
    return token, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None, help="GGUF file or HF folder (default: the default model)")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument("-c", "--ctx-size", type=int, default=None, help="context (default: tokens + 16)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "f16", "bf16"])
    parser.add_argument("--dca", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("-ctk", "--cache-type-k", default=None, choices=list(CACHE_TYPES),
                        help="how the KV cache stores keys (default: the backend's own; CUDA: the dtype or q8_0)")
    parser.add_argument("-ctv", "--cache-type-v", default=None, choices=list(CACHE_TYPES),
                        help="how the KV cache stores values (as --cache-type-k)")
    parser.add_argument("--file", type=Path, default=None, help="session file to write (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    llm = engine.load(args.model, device=args.device, dtype=args.dtype, context=args.ctx_size or args.tokens + 16,
                      dca=args.dca, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)
    ids = prompt_ids(llm, args.tokens)
    list(llm.generate_ids(ids[:min(256, len(ids) - 1)], 4, GREEDY))  # warm-up: kernels compiled, pools filled

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "prompt.session"
        session = llm.session()
        cold_token, cold = first_token(session, ids)
        t0 = time.perf_counter()
        session.save(path)
        save_seconds = time.perf_counter() - t0
        size = path.stat().st_size
        _, in_memory = first_token(session, ids)

        llm.logits(ids[:8])  # something else takes the cache over: the restored session starts from nothing
        restored_session = llm.session()
        t0 = time.perf_counter()
        restored_session.load(path)
        load_seconds = time.perf_counter() - t0
        restored_token, prefill_last = first_token(restored_session, ids)
        restored = load_seconds + prefill_last

    result = {
        "device": f"{llm.device} ({llm.dtype})", "cache_types": "/".join(llm.cache_types), "prompt_tokens": len(ids),
        "ttft_cold_s": cold, "ttft_restored_s": restored, "file_load_s": load_seconds,
        "ttft_in_memory_reuse_s": in_memory, "speedup_restored": cold / restored, "speedup_in_memory": cold / in_memory,
        "file_bytes": size, "file_read_GBps": size / load_seconds / 1e9, "file_save_s": save_seconds,
        "same_first_token": cold_token == restored_token,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {result['device']}, KV cache {result['cache_types']}, prompt {len(ids)} tokens, "
          f"DCA {llm.dca or 'off'}")
    print(f"time to first token, cold (full prefill):      {cold * 1e3:10.1f} ms")
    print(f"time to first token, restored from the file:   {restored * 1e3:10.1f} ms "
          f"(load {load_seconds * 1e3:.1f} ms, {result['file_read_GBps']:.1f} GB/s)  {cold / restored:6.1f}x faster")
    print(f"time to first token, reused in memory:         {in_memory * 1e3:10.1f} ms  "
          f"{cold / in_memory:6.1f}x faster")
    print(f"session file: {size / 2**20:.1f} MiB, written in {save_seconds * 1e3:.1f} ms; "
          f"same first token: {'yes' if result['same_first_token'] else 'NO'}")


if __name__ == "__main__":
    main()
