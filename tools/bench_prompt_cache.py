"""Time to first token for a long prompt: cold (full prefill) vs restored from a session file vs reused in memory.

    python tools/bench_prompt_cache.py --tokens 32768 --device cuda          # the issue's target: >= 20x at 32k
    python tools/bench_prompt_cache.py --tokens 1024 --device cpu
    python tools/bench_prompt_cache.py --tokens 32768 --device cuda -ctk q8_0 -ctv q8_0   # a q8_0 cache: half the bytes

The prompt is English prose (tests/prose.py). Each time ends when the first generated token id is on the host
(greedy). "restored" = reading the file into the cache + prefilling the prompt's last token + sampling; the file
is written once after the cold run (its size and the time to write it are printed too); "file_read_GBps" is its size
over the time reading it into the cache took. The restore runs twice: the first also pins its ring buffers and
starts its readers, the second ("warm") finds them in CuPy's pinned pool, as a server's later restores do.
--breakdown (CUDA) adds the restore's two stages alone: the file read by the same reader threads into host
buffers (page cache -> memory, "read_only_GBps") and the file's bytes copied from pinned host memory to the
device ("h2d_GBps"): a restore is bounded by the slower of them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import engine  # noqa: E402
from engine import restore  # noqa: E402
from engine.kv_storage import CACHE_TYPES  # noqa: E402
from engine.prompt_cache import tensor_bytes  # noqa: E402
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


def restored_first_token(llm, path: Path, ids) -> tuple[int, float, float]:
    """(first token, load seconds, restored TTFT seconds) of a fresh session loading the file."""
    llm.logits(ids[:8])  # something else takes the cache over: the restored session starts from nothing
    session = llm.session()
    t0 = time.perf_counter()
    session.load(path)
    load_seconds = time.perf_counter() - t0
    token, prefill_last = first_token(session, ids)
    return token, load_seconds, load_seconds + prefill_last


def read_only_seconds(path: Path, n_layers: int) -> float:
    """The file's k and v rows read as a restore reads them (restore.plan's chunks, restore.READERS threads) into
    one host buffer per thread, nothing copied further."""
    tensors = dict(zip(("k", "v"), tensor_bytes(path, ("k", "v"))))
    chunks = list(restore.plan(tensors, range(n_layers)))
    local = threading.local()
    size = max(chunk.nbytes for chunk in chunks)

    def read(chunk) -> None:
        if not hasattr(local, "buffer"):
            local.buffer = np.empty(size, np.uint8)
        restore.read_chunk(fd, path, chunk, local.buffer)

    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(restore.READERS) as pool:
            list(pool.map(read, chunks[:restore.READERS]))  # threads started, buffers made
            t0 = time.perf_counter()
            list(pool.map(read, chunks))
            return time.perf_counter() - t0
    finally:
        os.close(fd)


def h2d_seconds(nbytes: int) -> float:
    """nbytes copied from pinned host memory to the device in restore.CHUNK_BYTES copies on one stream."""
    import cupy as cp

    chunk = restore.CHUNK_BYTES
    host = np.frombuffer(cp.cuda.alloc_pinned_memory(chunk), np.uint8, chunk)
    device = cp.empty(nbytes, dtype=cp.uint8)
    stream = cp.cuda.Stream(non_blocking=True)
    runtime = cp.cuda.runtime

    def copy_all() -> None:
        for start in range(0, nbytes, chunk):
            n = min(chunk, nbytes - start)
            runtime.memcpyAsync(device.data.ptr + start, host.ctypes.data, n, runtime.memcpyHostToDevice, stream.ptr)
        stream.synchronize()

    copy_all()
    t0 = time.perf_counter()
    copy_all()
    return time.perf_counter() - t0


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
    parser.add_argument("--breakdown", action="store_true",
                        help="CUDA: also time the restore's file read and host-to-device copies alone")
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

        restored_token, load_seconds, restored = restored_first_token(llm, path, ids)
        warm_token, warm_load_seconds, warm_restored = restored_first_token(llm, path, ids)
        stages = {}
        if args.breakdown and llm.device == "cuda":
            stages = {"read_only_GBps": size / read_only_seconds(path, llm.config.n_layers) / 1e9,
                      "h2d_GBps": size / h2d_seconds(size) / 1e9}

    result = {
        "device": f"{llm.device} ({llm.dtype})", "cache_types": "/".join(llm.cache_types), "prompt_tokens": len(ids),
        "ttft_cold_s": cold, "ttft_restored_s": restored, "file_load_s": load_seconds,
        "ttft_in_memory_reuse_s": in_memory, "speedup_restored": cold / restored, "speedup_in_memory": cold / in_memory,
        "ttft_restored_warm_s": warm_restored, "file_load_warm_s": warm_load_seconds,
        "speedup_restored_warm": cold / warm_restored,
        "file_bytes": size, "file_read_GBps": size / load_seconds / 1e9,
        "file_read_warm_GBps": size / warm_load_seconds / 1e9, **stages, "file_save_s": save_seconds,
        "same_first_token": cold_token == restored_token == warm_token,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {result['device']}, KV cache {result['cache_types']}, prompt {len(ids)} tokens, "
          f"DCA {llm.dca or 'off'}")
    print(f"time to first token, cold (full prefill):      {cold * 1e3:10.1f} ms")
    print(f"time to first token, restored from the file:   {restored * 1e3:10.1f} ms "
          f"(load {load_seconds * 1e3:.1f} ms, {result['file_read_GBps']:.1f} GB/s)  {cold / restored:6.1f}x faster")
    print(f"  restored again (pinned buffers pooled):      {warm_restored * 1e3:10.1f} ms "
          f"(load {warm_load_seconds * 1e3:.1f} ms, {result['file_read_warm_GBps']:.1f} GB/s)  "
          f"{cold / warm_restored:6.1f}x faster")
    if stages:
        print(f"  the restore's stages alone: file read {stages['read_only_GBps']:.1f} GB/s, "
              f"pinned host -> device {stages['h2d_GBps']:.1f} GB/s")
    print(f"time to first token, reused in memory:         {in_memory * 1e3:10.1f} ms  "
          f"{cold / in_memory:6.1f}x faster")
    print(f"session file: {size / 2**20:.1f} MiB, written in {save_seconds * 1e3:.1f} ms; "
          f"same first token: {'yes' if result['same_first_token'] else 'NO'}")


if __name__ == "__main__":
    main()
