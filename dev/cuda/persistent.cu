// Measurement variant (dev/cuda/persistent.py builds it after gemv_tma.cu; production never does): a chain of one-token
// GEMVs (Q4_K) run by ONE persistent launch, the phases separated by a grid-wide barrier, against one launch per GEMV.
//
// Question (dev/cuda/NOTES.md v9): a GEMV launch of the 8B step costs ~5 us beyond its bytes (o: 9.4 MB in 7 us,
// q+k+v 14 MB in 11 us, gate+up 66 MB in 30 us: ~0.4 us a MB plus ~5 us), ~190 launches a step. Does a grid barrier
// (a counter in global memory; every block co-resident) cost less than a kernel boundary, and does asking L2 for the
// next phase's rows before the barrier (they do not depend on the activations) hide the first rows' latency?
//
// Block: 256 threads; the phase's rows split into gridDim.x contiguous ranges; each block stages the phase's input
// (gemv.cu's stage, int8 per 32) and its warps take rows w, w + 8, ... two at a time (dot_rows2), asking L2 for the
// pair after next; outputs act_t. prefetch_next > 0: after its rows, thread 0 asks L2 (cp.async.bulk.prefetch) for up
// to prefetch_next bytes of its row range of the next phase, then the block waits at the barrier.
#define MAX_PHASES 16

struct Phase {
    const u8* w;
    long long row_bytes;
    const act_t* x;
    act_t* y;
    int rows, cols;
};
struct Chain {  // in device memory (persistent.py writes it: 40-byte phases, then n at byte 640)
    Phase p[MAX_PHASES];
    int n;
};

// Every block of the grid arrives, then waits until gridDim.x * generation blocks have (counter zeroed before the
// launch; all blocks resident: the host sizes the grid from the occupancy).
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned generation) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
        const unsigned target = generation * gridDim.x;
        unsigned seen;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
        } while (seen < target);
    }
    __syncthreads();
}

__device__ __forceinline__ void block_rows(int rows, int& r0, int& r1) {
    const int per_block = (rows + gridDim.x - 1) / gridDim.x;
    r0 = min(rows, blockIdx.x * per_block);
    r1 = min(rows, r0 + per_block);
}

extern "C" __global__ void __launch_bounds__(256) persistent_chain_q4_k(const Chain* __restrict__ chain, unsigned* counter,
                                                                        long long prefetch_next) {
    extern __shared__ __align__(16) u8 smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int k = 0; k < chain->n; ++k) {
        const Phase ph = chain->p[k];
        int r0, r1;
        block_rows(ph.rows, r0, r1);
        if (k > 0) grid_barrier(counter, k);  // phase k-1's outputs written everywhere
        for (int r = r0 + warp; r < r0 + 16 && r < r1; r += 8) prefetch_row(ph.w + r * ph.row_bytes, ph.row_bytes);
        stage<T_Q4_K>([&](int i) { return a2f(ph.x[i]); }, ph.cols, smem);
        for (int r = r0 + warp; r < r1; r += 16) {
            for (int ahead = r + 16; ahead < r + 32 && ahead < r1; ahead += 8)
                prefetch_row(ph.w + ahead * ph.row_bytes, ph.row_bytes);
            if (r + 8 < r1) {
                const float2 acc = dot_rows2<T_Q4_K>(ph.w + r * ph.row_bytes, ph.w + (r + 8) * ph.row_bytes, smem,
                                                     ph.cols);
                if (lane == 0) {
                    ph.y[r] = f2a(acc.x);
                    ph.y[r + 8] = f2a(acc.y);
                }
            } else {
                const float acc = dot_row<T_Q4_K>(ph.w + r * ph.row_bytes, smem, ph.cols);
                if (lane == 0) ph.y[r] = f2a(acc);
            }
        }
        if (prefetch_next > 0 && k + 1 < chain->n && threadIdx.x == 0) {
            const Phase nx = chain->p[k + 1];
            int n0, n1;
            block_rows(nx.rows, n0, n1);
            const long long begin = n0 * nx.row_bytes;
            const long long end = min(n1 * nx.row_bytes, begin + prefetch_next);
            for (long long off = begin; off < end; off += 65536)
                bulk_prefetch_l2(nx.w + off, (unsigned)(min(65536LL, end - off) & ~15LL));
        }
    }
}
