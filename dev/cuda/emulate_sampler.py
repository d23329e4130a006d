"""The device sampler's kernels (kernels/sampling.cu) executed on the CPU, for machines without a GPU: each CUDA block
runs as std::threads (g++ -std=c++20: std::barrier for __syncthreads, per-warp exchange buffers for the shuffles
and ballots, std::atomic_ref for atomicAdd), blocks one after another, so a function's __shared__ statics are the
running block's shared memory. No timing and no memory model beyond that; only what sampling.cu uses. Then
dev/cuda/sampler.py's check (the split against the previous single-block kernel, OLD_SOURCE, emulated alike) runs
through DeviceSampler with numpy arrays standing in for CuPy's:

    python dev/cuda/emulate_sampler.py [--vocabs 7,2049,32000] [--modes greedy,stoch/peaked] [--steps 6]
                                       [--threads 256]

A difference is a logic error in the kernels (or in this emulation); identical is not a GPU run: the cuda tests
(tests/test_cuda_ops.py) stay the judge. Slow: ~1-10 s per stochastic launch at a 32k vocabulary on 2 cores.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.backends.cuda import kernels, sampling  # noqa: E402

EMULATION = r"""
// A CPU stand-in for the CUDA features sampling.cu uses: each block's threads are std::threads, blocks run one
// after another (so function-local __shared__ statics are the running block's shared memory).
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3_ { unsigned x = 0, y = 0, z = 0; };
thread_local dim3_ threadIdx;
dim3_ blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __constant__

struct Warp {
    std::barrier<> bar{32};
    uint64_t buf[32];
};
static std::unique_ptr<std::barrier<>> g_bar;
static std::vector<std::unique_ptr<Warp>> g_warps;
static std::atomic<int> g_or;

inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline int __syncthreads_or(int p) {
    __syncthreads();
    if (threadIdx.x == 0) g_or = 0;
    __syncthreads();
    if (p) g_or = 1;
    __syncthreads();
    int r = g_or;
    __syncthreads();
    return r;
}
template <class T> inline T exchange(T v, int src_of_lane_fn_kind, int arg) {
    Warp& w = *g_warps[threadIdx.x / 32];
    int lane = threadIdx.x % 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w.buf[lane] = bits;
    w.bar.arrive_and_wait();
    int src = src_of_lane_fn_kind == 0 ? (lane ^ arg) : arg;
    uint64_t b = w.buf[src];
    w.bar.arrive_and_wait();
    T r;
    std::memcpy(&r, &b, sizeof(T));
    return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return exchange(v, 0, o); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return exchange(v, 1, src); }
inline unsigned __ballot_sync(unsigned, int p) {
    Warp& w = *g_warps[threadIdx.x / 32];
    int lane = threadIdx.x % 32;
    w.buf[lane] = p ? 1 : 0;
    w.bar.arrive_and_wait();
    unsigned m = 0;
    for (int l = 0; l < 32; ++l) m |= (w.buf[l] ? 1u : 0u) << l;
    w.bar.arrive_and_wait();
    return m;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int min(int a, int b) { return a < b ? a : b; }
using std::exp;
using std::fmaxf;

#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <class F> void run_grid(int grid, int block, F f) {
    gridDim.x = grid;
    blockDim.x = block;
    for (int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        g_bar = std::make_unique<std::barrier<>>(block);
        g_warps.clear();
        for (int w = 0; w < block / 32; ++w) g_warps.push_back(std::make_unique<Warp>());
        std::vector<std::thread> threads;
        for (int t = 0; t < block; ++t)
            threads.emplace_back([t, &f] { threadIdx.x = t; f(); });
        for (auto& th : threads) th.join();
    }
}

template <class... A, std::size_t... I>
void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <class... A> void launch_kernel(void (*k)(A...), int grid, int block, void** args) {
    run_grid(grid, block, [&] { call(k, args, std::index_sequence_for<A...>{}); });
}
"""
NEW_KERNELS = ("sample_scan", "sample_pool", "sample_narrow", "sample_token")


def build(source: str, names, folder: Path, label: str):
    """source (a sampling.cu) + the emulation -> a shared library with launch_<name>(grid, block, args)."""
    source = source.replace("__restrict__", "__restrict").replace("#pragma unroll", "// unroll")
    code = '#include "emu.h"\n' + source + "\n" + "\n".join(
        f'extern "C" void launch_{n}(int g, int b, void** a) {{ launch_kernel({n}, g, b, a); }}' for n in names)
    (folder / "emu.h").write_text(EMULATION)
    (folder / f"{label}.cpp").write_text(code)
    subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", "-fPIC", "-shared", "-w", str(folder / f"{label}.cpp"),
                    "-o", str(folder / f"{label}.so")], check=True)
    return ctypes.CDLL(str(folder / f"{label}.so"))


class Array(np.ndarray):
    """A host array with CuPy's .get()."""

    def get(self, stream=None):
        return np.asarray(self).copy()


class Kernel:
    def __init__(self, lib, name):
        self.fn = getattr(lib, f"launch_{name}")

    def __call__(self, grid, block, args, shared_mem=0):
        keep = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous
                keep.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.float32):
                keep.append(ctypes.c_float(float(a)))
            elif isinstance(a, np.int32):
                keep.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.uint64):
                keep.append(ctypes.c_uint64(int(a)))
            else:
                raise TypeError(f"launch argument {a!r}")
        pointers = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(k) for k in keep])
        self.fn(ctypes.c_int(grid[0]), ctypes.c_int(block[0]), pointers)


def fake_cupy(old_lib):
    class Module:
        def __init__(self, code=None, options=None):
            pass

        def get_function(self, name):
            return Kernel(old_lib, name)

    return types.SimpleNamespace(
        float32=np.float32, int32=np.int32, uint64=np.uint64,
        asarray=lambda a, dtype=None: np.array(a, dtype=dtype).view(Array),
        zeros=lambda shape, dtype=float: np.zeros(shape, dtype).view(Array),
        asnumpy=lambda a, stream=None: np.asarray(a).copy(), RawModule=Module)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="7,2049,32000")
    ap.add_argument("--modes", default=None, help="comma-separated names of dev/cuda/sampler.py MODES (default all)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=sampling.SCAN_THREADS, help="scan / pool / narrow block size")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("dev_cuda_sampler", Path(__file__).with_name("sampler.py"))
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        new_lib = build((kernels.KERNEL_DIR / "sampling.cu").read_text(), NEW_KERNELS, folder, "new")
        old_lib = build(dev.OLD_SOURCE, ("sample_token",), folder, "old")
        sampling.function = lambda file, name, dtype="f16", instance=None: Kernel(new_lib, name)
        sampling.SCAN_THREADS = args.threads
        cp = fake_cupy(old_lib)
        failed = False
        for vocab in (int(v) for v in args.vocabs.split(",")):
            for mode in (args.modes.split(",") if args.modes else dev.MODES):
                params, shape = dev.MODES[mode]
                problems = dev.compare(cp, vocab, params, shape, args.steps, seed=vocab)
                failed |= bool(problems)
                print(f"vocab {vocab:>6} {mode:<14}: " + ("identical" if not problems else "; ".join(problems[:3])),
                      flush=True)
    if failed:
        raise SystemExit("the split and the single-block kernel differ (emulated)")


if __name__ == "__main__":
    main()
