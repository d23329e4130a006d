// Measurement variants (dev/cuda/gemv_tma.py builds them; production never does), appended after gemv.cu and its
// preludes:
//   gemv_tma_T   the one-token GEMV with its weight rows streamed into shared memory by Hopper's bulk copy engine:
//                gemv.cu's ring_row_dots (the head_ring kernels' loop) over a plainly staged input, fp32 out. 8
//                consumer warps + 1 producer warp; `stages` stages of `stage_rows` rows a block in flight.
//   gemv_next_T  gemv.cu's gemv body (fp32 out) whose thread 0 first asks L2 for this block's share of the next GEMV's
//                weights (cp.async.bulk.prefetch.L2, 64 KiB pieces, NEXT_PREFETCH_BYTES at most a block).
//   gemv_ovl_T   gemv_tma_T launched dependent, its first stages copied before its pdl_wait (below).
// Questions (dev/cuda/NOTES.md v8): do more rows in flight, or the next GEMV's rows in L2, speed the 8B step's
// GEMVs (0.5-0.6 of the copy bandwidth)? Measured: neither for Q4_K; the ring for the Q6_K head (now production).
// v30: does a dependent ring GEMV resident beside the one before it, its first stages copied meanwhile, take the
// products' fixed ramp (dev/cuda/boundary.py: 4-6 us a product, < 1 us of it the launch) off the chain?
#ifndef NEXT_PREFETCH_BYTES
#define NEXT_PREFETCH_BYTES (1LL << 40)
#endif

__device__ __forceinline__ void bulk_prefetch_l2(const void* src, unsigned bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

// This block's share of the next GEMV's weights (next_bytes, split evenly over the grid, at most NEXT_PREFETCH_BYTES)
// asked of L2 in 64 KiB pieces.
__device__ __forceinline__ void prefetch_share(const u8* next, long long next_bytes) {
    long long share = (next_bytes + gridDim.x - 1) / gridDim.x;
    share = min(share, (long long)NEXT_PREFETCH_BYTES);
    share = (share + 15) & ~15LL;
    const long long begin = blockIdx.x * share, end = min(next_bytes, begin + share);
    for (long long off = begin; off < end; off += 65536)
        bulk_prefetch_l2(next + off, (unsigned)min(65536LL, (end - off + 15) & ~15LL));
}

template <int T>
__device__ __forceinline__ void gemv_tma_body(const u8* __restrict__ w, long long row_bytes,
                                              const act_t* __restrict__ x, int rows, int cols, float* __restrict__ y,
                                              int per_block, int stage_rows, int stages) {
    extern __shared__ __align__(16) u8 smem[];
    ring_row_dots<T>(w, row_bytes, rows, cols, per_block, stage_rows, stages,
                     [&] { stage<T>([&](int i) { return a2f(x[i]); }, cols, smem); },
                     [&](int r, float acc) { y[r] = acc; });
}

#define GEMV_TMA_KERNEL(NAME, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(RING_THREADS) gemv_tma_##NAME(                                   \
        const u8* w, long long row_bytes, const act_t* x, int rows, int cols, float* y, int per_block,            \
        int stage_rows, int stages) {                                                                             \
        gemv_tma_body<T>(w, row_bytes, x, rows, cols, y, per_block, stage_rows, stages);                         \
    }

// The production kernel's input staging and row loop, with an L2 prefetch of the next GEMV's weights as above
// (the "prefetch next" question without the TMA ring): gemv.cu's gemv body, fp32 output.
template <int T>
__device__ __forceinline__ void gemv_next_body(const u8* __restrict__ w, long long row_bytes,
                                               const act_t* __restrict__ x, int rows, int cols, float* __restrict__ y,
                                               int per_block, const u8* __restrict__ next, long long next_bytes) {
    if (threadIdx.x == 0 && next != nullptr) prefetch_share(next, next_bytes);
    gemv_body<T>(w, row_bytes, x, rows, cols, y, 1, per_block);
}

#define GEMV_NEXT_KERNEL(NAME, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_next_##NAME(                                 \
        const u8* w, long long row_bytes, const act_t* x, int rows, int cols, float* y, int per_block,            \
        const u8* next, long long next_bytes) {                                                                   \
        gemv_next_body<T>(w, row_bytes, x, rows, cols, y, per_block, next, next_bytes);                          \
    }

// gemv_ovl_T: gemv_tma_T for a chain of dependent launches (NOTES.md v30): its first `stages` stages' bulk copies go
// out before pdl_wait, so where this block is resident beside the kernel before it (one block an SM each, their shared
// memory fitting together) its first rows come in while that kernel runs; early != 0 releases this kernel's dependents
// right after its wait (griddepcontrol.launch_dependents), so that their blocks take the room beside it and copy their
// own first stages meanwhile (common.cuh's pdl_wait releases early only from grids below %nsmid).
template <int T>
__device__ __forceinline__ void gemv_ovl_body(const u8* __restrict__ w, long long row_bytes,
                                              const act_t* __restrict__ x, int rows, int cols, float* __restrict__ y,
                                              int per_block, int stage_rows, int stages, int early) {
    extern __shared__ __align__(16) u8 smem[];
    ring_row_dots<T>(w, row_bytes, rows, cols, per_block, stage_rows, stages,
                     [&] {
                         pdl_wait();
#if __CUDA_ARCH__ >= 900
                         if (early) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
                         stage<T>([&](int i) { return a2f(x[i]); }, cols, smem);
                     },
                     [&](int r, float acc) { y[r] = acc; });
}

#define GEMV_OVL_KERNEL(NAME, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(RING_THREADS) gemv_ovl_##NAME(                                   \
        const u8* w, long long row_bytes, const act_t* x, int rows, int cols, float* y, int per_block,            \
        int stage_rows, int stages, int early) {                                                                  \
        gemv_ovl_body<T>(w, row_bytes, x, rows, cols, y, per_block, stage_rows, stages, early);                  \
    }

GEMV_TMA_KERNEL(q4_k, T_Q4_K)
GEMV_TMA_KERNEL(q6_k, T_Q6_K)
GEMV_TMA_KERNEL(q8_0, T_Q8_0)
GEMV_NEXT_KERNEL(q4_k, T_Q4_K)
GEMV_NEXT_KERNEL(q6_k, T_Q6_K)
GEMV_OVL_KERNEL(q4_k, T_Q4_K)
