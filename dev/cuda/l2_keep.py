"""Development driver: can a decode step park part of a layer's KV cache in L2 while its GEMVs run (session 34)?

At Llama-2-7B widths after 8,192 tokens a layer reads 134 MB of cache at the copy rate in its decode attention, while
the GEMVs before it (qkv: 28 MB in ~16 us) leave ~1.2 TB/s of HBM idle. If lines of the cache asked of L2 during the
GEMVs with the evict_last priority survive the weights streamed after them, the attention reads them from L2. This
driver measures, on plain kernels, the three facts that idea rests on:

  keep     flush L2; prefetch the cache's first X MB (prefetch.global.L2 or .L2::evict_last); stream W MB of
           "weights" (ld.global.nc, or with an L2::evict_first policy); then time a read of the whole cache:
           us and the MB it saved against X = 0 (the lines that survived, at the copy rate)
  cost     a latency-bound stream (one 16-byte load in flight a thread, the GEMVs' 2 blocks of 256 an SM) of W MB,
           timed alone and with prefetches of X MB of the cache issued beside its loads: what the prefetches cost
  demote   the kept read plain, demoting its lines (applypriority.global.L2::evict_normal) or under an evict_first
           policy (what v57's bit 17 makes the decode attention do), then the next prefetch-and-stream round: whether
           stale evict_last lines crowd out the next layer's
each at every --set-aside-mb (cudaLimitPersistingL2CacheSize; "max" the device's most): the CUDA programming guide
(4.13.1) gives persisting lines the set-aside only, so evict_last may keep nothing without one. Between rounds the
whole cache is demoted and L2 flushed.

    python dev/cuda/l2_keep.py [--cache-mb 134] [--weights-mb 28,53] [--keep-mb 0,8,16,24,32,48] [--reps 5]
                               [--set-aside-mb 0,max]

Needs a GPU (sm_80+ for the eviction priorities).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

SOURCE = r"""
typedef unsigned long long u64;

__device__ __forceinline__ u64 evict_first_policy() {
    u64 policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

__device__ __forceinline__ uint4 load16(const uint4* p, int evict_first, u64 policy) {
    uint4 v;
    if (evict_first)
        asm volatile("ld.global.nc.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(policy));
    else
        asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void prefetch_line(const char* p, int keep) {
    if (keep) asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
    else asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Every thread reads 16-byte vectors, grid-stride; the xor of all goes to sink so the loads stay.
// demote: then applypriority.global.L2::evict_normal on each 128-byte line it read.
extern "C" __global__ void read_all(const uint4* p, long long n16, int evict_first, int demote, unsigned* sink) {
    const u64 policy = evict_first_policy();
    unsigned acc = 0;
    const long long threads = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16; i += threads) {
        const uint4 v = load16(p + i, evict_first, policy);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
        if (demote && (i & 7) == 0) asm volatile("applypriority.global.L2::evict_normal [%0], 128;" ::"l"(p + i));
    }
    if (acc == 0x9e3779b9u) atomicAdd(sink, 1u);
}

// The first `bytes` of p asked of L2, one 128-byte line a thread, grid-stride.
extern "C" __global__ void prefetch_all(const char* p, long long bytes, int keep) {
    for (long long off = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 128; off < bytes;
         off += (long long)gridDim.x * blockDim.x * 128)
        prefetch_line(p + off, keep);
}

// A latency-bound stream: each thread one 16-byte load in flight (its xor waits on it), grid-stride over w; beside
// every load, while lines of the cache remain, one prefetch of the next of them (a thread's share, strided).
extern "C" __global__ void stream_with_prefetch(const uint4* w, long long n16, const char* cache, long long keep_bytes,
                                                int keep, int evict_first, unsigned* sink) {
    const u64 policy = evict_first_policy();
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long threads = (long long)gridDim.x * blockDim.x;
    long long line = tid * 128;
    unsigned acc = 0;
    for (long long i = tid; i < n16; i += threads) {
        if (line < keep_bytes) {
            prefetch_line(cache + line, keep);
            line += threads * 128;
        }
        const uint4 v = load16(w + i, evict_first, policy);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
        if (acc == 0x9e3779b9u) atomicAdd(sink, 1u);  // a use of every load: one in flight
    }
    for (; line < keep_bytes; line += threads * 128) prefetch_line(cache + line, keep);
}
"""

MB = 1 << 20
PERSISTING_L2_LIMIT, MAX_PERSISTING_L2_ATTRIBUTE = 0x06, 108  # cudaLimitPersistingL2CacheSize, its device maximum


def timed(cp, stream, fn) -> float:
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) * 1e3  # us


def main() -> None:
    import cupy as cp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-mb", type=int, default=134)
    parser.add_argument("--weights-mb", default="28,53")
    parser.add_argument("--keep-mb", default="0,8,16,24,32,48")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--set-aside-mb", default="0,max")
    args = parser.parse_args()

    module = cp.RawModule(code=SOURCE, options=("-std=c++17",))
    read_all, prefetch_all = module.get_function("read_all"), module.get_function("prefetch_all")
    stream_with_prefetch = module.get_function("stream_with_prefetch")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    big_grid, gemv_grid = (sms * 8,), (sms * 2,)
    cache = cp.random.randint(0, 2**31, size=args.cache_mb * MB // 4, dtype=cp.int32)
    weights_mb = [int(x) for x in args.weights_mb.split(",")]
    weights = cp.random.randint(0, 2**31, size=max(weights_mb) * MB // 4, dtype=cp.int32)
    flush = cp.zeros(256 * MB // 4, dtype=cp.int32)
    sink = cp.zeros(1, dtype=cp.uint32)
    stream = cp.cuda.Stream(non_blocking=True)
    runtime = cp.cuda.runtime
    most = runtime.deviceGetAttribute(MAX_PERSISTING_L2_ATTRIBUTE, runtime.getDevice())
    print(json.dumps({"device": runtime.getDeviceProperties(0)["name"].decode(), "sms": sms,
                      "l2_mb": cp.cuda.Device().attributes["L2CacheSize"] / MB,
                      "max_set_aside_mb": round(most / MB, 2)}))

    def read(buf, mb, evict_first=0, demote=0, grid=big_grid):
        read_all(grid, (256,), (buf, np.int64(mb * MB // 16), np.int32(evict_first), np.int32(demote), sink))

    def cold():  # every kept line of the cache demoted, then L2 flushed
        read(cache, args.cache_mb, 0, 1)
        read(flush, 256)

    def rounds():  # the keep / cost grid and the demote rounds at the current set-aside (a JSON line each)
        for w_mb in weights_mb:
            for evict_first in (0, 1):
                for keep in (0, 1):
                    for x_mb in (int(x) for x in args.keep_mb.split(",")):
                        reads, alone, beside = [], [], []
                        for _ in range(args.reps):
                            cold()
                            alone.append(timed(cp, stream, lambda: stream_with_prefetch(
                                gemv_grid, (256,), (weights, np.int64(w_mb * MB // 16), cache, np.int64(0),
                                                    np.int32(keep), np.int32(evict_first), sink))))
                            cold()
                            beside.append(timed(cp, stream, lambda: stream_with_prefetch(
                                gemv_grid, (256,), (weights, np.int64(w_mb * MB // 16), cache, np.int64(x_mb * MB),
                                                    np.int32(keep), np.int32(evict_first), sink))))
                            reads.append(timed(cp, stream, lambda: read(cache, args.cache_mb)))
                        # keep: prefetched first, then the whole stream, then the read (the survival alone)
                        after = []
                        for _ in range(args.reps):
                            cold()
                            prefetch_all(big_grid, (256,), (cache, np.int64(x_mb * MB), np.int32(keep)))
                            read(weights, w_mb, evict_first)
                            after.append(timed(cp, stream, lambda: read(cache, args.cache_mb)))
                        print(json.dumps({"weights_mb": w_mb, "weights_evict_first": evict_first, "keep_last": keep,
                                          "x_mb": x_mb, "stream_us": round(float(np.median(alone)), 2),
                                          "stream_beside_us": round(float(np.median(beside)), 2),
                                          "read_after_beside_us": round(float(np.median(reads)), 2),
                                          "read_after_prefetch_then_stream_us": round(float(np.median(after)), 2)}))
        # demote: the kept read plain (0), demoting its lines (1) or under an evict_first policy (2), then the next
        # layer's round on another part of the cache
        half = args.cache_mb // 2
        for demote in (0, 1, 2):
            times = []
            for _ in range(args.reps):
                cold()
                prefetch_all(big_grid, (256,), (cache, np.int64(32 * MB), np.int32(1)))
                read(cache, half, int(demote == 2), int(demote == 1))
                nxt = cache[half * MB // 4:]
                prefetch_all(big_grid, (256,), (nxt, np.int64(32 * MB), np.int32(1)))
                read(weights, 28, 1)
                times.append(timed(cp, stream, lambda: read(nxt, half)))
            print(json.dumps({"demote": ("none", "applypriority", "evict_first read")[demote],
                              "second_half_read_us": round(float(np.median(times)), 2)}))

    with stream:
        for _ in range(2):  # compile and warm
            cold(); read(cache, args.cache_mb)
        stream.synchronize()
        for set_aside in args.set_aside_mb.split(","):
            wanted = most if set_aside == "max" else int(set_aside) * MB
            runtime.deviceSetLimit(PERSISTING_L2_LIMIT, min(wanted, most))
            print(json.dumps({"set_aside_mb": round(runtime.deviceGetLimit(PERSISTING_L2_LIMIT) / MB, 2)}))
            rounds()
        # the cold read alone, for the rates
        times = []
        for _ in range(args.reps):
            cold()
            times.append(timed(cp, stream, lambda: read(cache, args.cache_mb)))
        us = float(np.median(times))
        print(json.dumps({"cold_read_us": round(us, 2), "TB/s": round(args.cache_mb * MB / us / 1e6, 3)}))


if __name__ == "__main__":
    main()
