// Measurement variant (dev/cuda/gemv_tma.py builds it; production never does): the one-token GEMV of gemv.cu
// with its weight rows streamed into shared memory by Hopper's bulk copy engine (cp.async.bulk, sm_90) instead of
// each warp loading its own row after an L2 prefetch. Appended after common.cuh, dequant.cuh, dca.cuh, mma.cuh,
// wgmma.cuh and gemv.cu (its stage, dot_row, dot_rows2 and unit_dot are used as they are).
//
// Question it answers (dev/cuda/NOTES.md v8): the 8B step's GEMVs run at 0.5-0.6 of the copy bandwidth (gate+up
// 35 us a layer for 66 MB, qkv 18 us for 14 MB); each warp keeps one row (2.3 KB) in flight. A ring of
// `stages` stages of `stage_rows` rows each keeps stages * stage_rows rows a block in flight, issued by one
// thread, with no per-row address arithmetic or prefetch instructions.
//
// Block: 8 consumer warps + 1 producer warp (288 threads). Thread 0 initializes the mbarriers and issues the first
// stages stages before the block stages its input (their HBM latency overlaps the quantization); then the
// producer's lane 0 refills stage s as soon as the 8 consumer warps have arrived on empty[s]. Consumer warp w
// computes rows w, w + 8, ... of each stage (stage_rows / 8 rows, two at a time with dot_rows2), reading them from
// shared memory. Shared memory: the staged input (cols + cols/4, rounded to 128) | stages stages of
// stage_rows * row_bytes | 2 * stages mbarriers. row_bytes % 16 == 0 (bulk copies move 16-byte multiples).
//
// With next != null, block b also asks L2 for its share of next_bytes (the next GEMV's weights) right after its
// first stages: cp.async.bulk.prefetch.L2, in pieces of 64 KiB (NEXT_PREFETCH_BYTES caps the share per block).
#ifndef NEXT_PREFETCH_BYTES
#define NEXT_PREFETCH_BYTES (1LL << 40)
#endif
#define TMA_MAX_STAGES 8
#define TMA_CONSUMERS 8
#define TMA_THREADS (32 * (TMA_CONSUMERS + 1))

__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
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
                                              int per_block, int stage_rows, int stages, const u8* __restrict__ next,
                                              long long next_bytes) {
    extern __shared__ __align__(128) u8 smem[];
    const int in_bytes = ((cols + cols / 4) + 127) & ~127;
    u8* ring = smem + in_bytes;
    const long long stage_bytes = stage_rows * row_bytes;
    const unsigned full = smem_addr(ring + stages * stage_bytes), empty = full + 8 * stages;
    const int r0 = blockIdx.x * per_block, r1 = min(rows, r0 + per_block);
    const int n_stages = r1 > r0 ? (r1 - r0 + stage_rows - 1) / stage_rows : 0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    auto issue = [&](int k) {
        const int s = k % stages;
        const int first = r0 + k * stage_rows, n = min(stage_rows, r1 - first);
        mbar_expect_tx(full + 8 * s, (unsigned)(n * row_bytes));
        bulk_load(smem_addr(ring + s * stage_bytes), w + first * row_bytes, (unsigned)(n * row_bytes), full + 8 * s);
    };
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, TMA_CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int k = 0; k < min(stages, n_stages); ++k) issue(k);
        if (next != nullptr) prefetch_share(next, next_bytes);
    }
    __syncthreads();  // the mbarriers initialized
    stage<T>([&](int i) { return a2f(x[i]); }, cols, smem);
    if (warp == TMA_CONSUMERS) {  // producer
        if (lane == 0)
            for (int k = stages; k < n_stages; ++k) {
                mbar_wait(empty + 8 * (k % stages), ((k / stages) - 1) & 1);
                issue(k);
            }
        return;
    }
    for (int k = 0; k < n_stages; ++k) {
        const int s = k % stages;
        mbar_wait(full + 8 * s, (k / stages) & 1);
        const u8* held = ring + s * stage_bytes;
        const int first = r0 + k * stage_rows;
        for (int j = warp; j < stage_rows; j += 2 * TMA_CONSUMERS) {
            const int ra = first + j, rb = first + j + TMA_CONSUMERS;
            if (rb < r1 && j + TMA_CONSUMERS < stage_rows) {
                const float2 acc = dot_rows2<T>(held + j * row_bytes, held + (j + TMA_CONSUMERS) * row_bytes, smem, cols);
                if (lane == 0) {
                    y[ra] = acc.x;
                    y[rb] = acc.y;
                }
            } else if (ra < r1) {
                const float acc = dot_row<T>(held + j * row_bytes, smem, cols);
                if (lane == 0) y[ra] = acc;
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + 8 * s);
    }
}

#define GEMV_TMA_KERNEL(NAME, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(TMA_THREADS) gemv_tma_##NAME(                                   \
        const u8* w, long long row_bytes, const act_t* x, int rows, int cols, float* y, int per_block,            \
        int stage_rows, int stages, const u8* next, long long next_bytes) {                                       \
        gemv_tma_body<T>(w, row_bytes, x, rows, cols, y, per_block, stage_rows, stages, next, next_bytes);       \
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

GEMV_TMA_KERNEL(q4_k, T_Q4_K)
GEMV_TMA_KERNEL(q6_k, T_Q6_K)
GEMV_TMA_KERNEL(q8_0, T_Q8_0)
GEMV_NEXT_KERNEL(q4_k, T_Q4_K)
GEMV_NEXT_KERNEL(q6_k, T_Q6_K)
