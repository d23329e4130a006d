// Matrix-vector products of one token (decode): a plain GEMV and the fused decode-step kernels, with
// RMSNorm folded into the GEMVs that read it, the key rotation and KV-cache store into the QKV GEMV,
// SwiGLU into gate/up, the residual add into the output projections.
//
// Design. Every kernel is one launch; each block of 256 threads first stages its input vector in
// shared memory ("stage"), then its 8 warps take the block's tasks (output rows, or row pairs) in
// turn, one warp per task, lanes splitting the row; each warp asks L2 for its first PREFETCH_TASKS tasks'
// rows before staging (their HBM latency overlaps it) and, before computing a task, for the rows of the task
// PREFETCH_TASKS ahead. tasks_per_block (a multiple of 8,
// chosen on the host from the shape and the SM count) trades staging work against parallelism.
//
// Quantized weights (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K): the input is quantized as it is staged, llama.cpp
// q8_1 style: per block of 32 values d = max|x| / 127, q = rint(x / d) (int8), and the block's float sum
// s; dot products are dp4a on the packed weights, scaled per block in fp32:
//   Q8_0, Q4_0, Q6_K  sum_b d_w * d_b * dot(q_w, q_b)      (Q4_0's q-8 and Q6_K's q-32 made signed bytes)
//   Q4_1              sum_b d_w * d_b * dot(q_w, q_b) + m * s_b
//   Q4_K              sum_b d*sc * d_b * dot(q_w, q_b) - dmin*m * s_b
// A lane takes one "unit" of a row at a time (32 values; Q4_K/Q6_K: 64, the values sharing packed
// bytes: Q4_K sub-blocks 2g, 2g+1; Q6_K quarters k and k+2 of a half). The staged int8 vector is
// stored unit-interleaved: 16-byte part p of unit u at uint4 index p * U + u (U units in a row), so
// the lanes of a warp read consecutive 16-byte words (no bank conflicts); then the block scales d_b
// (float, cols/32) and sums s_b (float, cols/32). Shared memory: cols + cols/4 bytes.
// Float weights (F32, F16, BF16): the input is staged as fp32 (4*cols bytes; above 48 KB the host opts
// in to more) and dotted by dequant.cuh's row_dot.
//
// Every activation value is rounded to act_t (fp16, or bf16 with -DACT_BF16) where the op-by-op path
// would store it, so the fused kernels and gemv + elementwise agree to summation order.
//   gemv_T       y[r] = W[r].x (x act_t; y act_t, or fp32 when out_f32)
//   gemv_add_T   x[r] += act_t(W[r].a) (fp32 residual in place); with a_staged (int8 types), a arrives quantized
//                by the kernel that produced it (store_q8_block: gateup's or dca_combine's epilogue) and is copied
//                in (copy_staged) instead of staged: the same values, without the per-block quantization; with
//                out_staged (prenorm_epilogue; rows % 32 == 0), then x[r] * next_norm[r] quantized for the next
//                RMSNorm-fused product (32-row groups across blocks handed off through arrivals) and
//                partials[block] = the block's sum of x[r]^2
//   qkv_T        tasks: Hq*D query rows (act_t out, unrotated) | per KV head, R/2 rotary pairs (two rows, in
//                one unit loop for the int8 types, rotated at the key position, stored in the cache) and D-R
//                pass-through rows | Hkv*D value rows (stored in the cache); input rmsnorm(x)*w; position read
//                from pos[0]; with Q/K/V biases (qwen2; bq, bk, bv fp32, or all null) each row's
//                act_t(act_t(dot) + bias), before the rotation, as the composed path's add_bias
//   gateup_T     out[r] = act_t(silu(g) * u), g, u = act_t(Wg[r].h), act_t(Wu[r].h), h = rmsnorm(x)*w; with
//                out_staged, each block then quantizes its rows of out for the down product (per_block % 32 == 0)
//   head_T       logits[r] = Wout[r].h (fp32), h = rmsnorm(x)*w
// Prenormed inputs (qkv, gateup, head; in_staged non-null, int8 types): h's q8 from the gemv_add before them. q8 is
// scale-invariant (d(s u) = s d(u), q(s u) = q(u)), so that gemv_add quantizes u = x * w without knowing the norm
// and writes per-block sums of x^2; the consumer sums the n_partials in a fixed order, s = rsqrt(sum / d + eps),
// and copies its input in with scales and sums times s (copy_staged_normed) instead of rms_scale + stage: no pass
// over x in every block. The rounding differs from the composed path's q8(act_t(x * inv * w)) where act_t's
// rounding moves a value across a .5 boundary (gemv.py prenormed_q8 is the numpy model).

#define GEMV_THREADS 256
// Blocks of GEMV_THREADS an SM must hold at once (gemv.py BLOCKS_PER_SM): it lets ptxas use up to 65536 / (256 * 2) =
// 128 registers a thread, where __launch_bounds__(256) alone kept these kernels at 64 (its occupancy heuristic) and
// so fewer weight loads in flight a warp. 0: no minimum (a measurement variant).
#ifndef GEMV_MIN_BLOCKS
#define GEMV_MIN_BLOCKS 2
#endif
#if GEMV_MIN_BLOCKS > 0
#define GEMV_BOUNDS __launch_bounds__(GEMV_THREADS, GEMV_MIN_BLOCKS)
#else
#define GEMV_BOUNDS __launch_bounds__(GEMV_THREADS)
#endif
// Tasks each warp keeps asked for in L2 ahead of the one it computes. One is fastest: on the H100 (dev/cuda/
// gemv.py --prefetch 1,2,3,4,6) every further task ahead made each 8B GEMV slower (gate+up 29.8 -> 43.6 us,
// the Q6_K head 179 -> 282 us): more rows in flight over the chip evict lines before their use (NOTES.md, v3).
#ifndef PREFETCH_TASKS
#define PREFETCH_TASKS 1
#endif
// Units a lane's row loop unrolls (its loads issued together): a measurement macro (dev/cuda/gemv.py --defines)
#ifndef UNIT_UNROLL
#define UNIT_UNROLL 2
#endif
constexpr int kUnitUnroll = UNIT_UNROLL;  // #pragma unroll takes a constant expression, not a macro
template <int T> __device__ constexpr bool int8_input() {
    return T == T_Q8_0 || T == T_Q4_0 || T == T_Q4_1 || T == T_Q4_K || T == T_Q6_K;
}
template <int T> __device__ constexpr int unit_values() { return (T == T_Q4_K || T == T_Q6_K) ? 64 : 32; }

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// 32 bits at a 2-byte aligned address
__device__ __forceinline__ int load_b2(const u8* p) {
    const unsigned short* h = (const unsigned short*)p;
    return (int)(h[0] | ((unsigned)h[1] << 16));
}
// four bytes 0..15 -> signed bytes q - 8; four bytes 0..63 -> q - 32 (per byte, no carries)
__device__ __forceinline__ int minus8(int q) { return (q + 0x78787878) ^ 0x80808080; }
__device__ __forceinline__ int minus32(int q) { return (q + 0x60606060) ^ 0x80808080; }

// Where value v of a row goes in the staged layout: unit and offset (0 .. unit_values-1) within it.
template <int T> __device__ __forceinline__ void unit_slot(int v, int& unit, int& offset) {
    if constexpr (T == T_Q6_K) {  // unit 4*sb + 2h + (k&1) holds quarters k&1 (offsets 0..31), k&1 + 2 (32..63)
        const int sb = v >> 8, h = (v >> 7) & 1, k = (v >> 5) & 3;
        unit = 4 * sb + 2 * h + (k & 1);
        offset = 32 * (k >> 1) + (v & 31);
    } else {
        unit = v / unit_values<T>();
        offset = v % unit_values<T>();
    }
}

// The whole block stages value(i), i < cols, into smem (layout above); ends with __syncthreads.
template <int T, class F> __device__ __forceinline__ void stage(F value, int cols, u8* smem) {
    if constexpr (!int8_input<T>()) {
        float* xf = (float*)smem;
        for (int i = threadIdx.x; i < cols; i += blockDim.x) xf[i] = value(i);
    } else {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
        const int n_blocks = cols >> 5, units = cols / unit_values<T>();
        i8* xq = (i8*)smem;
        float* xd = (float*)(smem + cols);
        float* xs = xd + n_blocks;
        // each warp quantizes 4 blocks of 32 at a time (independent shuffle chains overlap)
        for (int b0 = 4 * warp; b0 < n_blocks; b0 += 4 * n_warps) {
            float v[4], amax[4], sum[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[j] = b0 + j < n_blocks ? value(32 * (b0 + j) + lane) : 0.0f;
                amax[j] = fabsf(v[j]);
                sum[j] = v[j];
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    amax[j] = fmaxf(amax[j], __shfl_xor_sync(0xffffffffu, amax[j], o));
                    sum[j] += __shfl_xor_sync(0xffffffffu, sum[j], o);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int b = b0 + j;
                if (b < n_blocks) {
                    const float d = q8_scale(amax[j]);
                    const int q = q8_round(v[j], d);
                    int unit, offset;
                    unit_slot<T>(32 * b + lane, unit, offset);
                    xq[16 * ((offset >> 4) * units + unit) + (offset & 15)] = (i8)q;
                    if (lane == 0) {
                        xd[b] = d;
                        xs[b] = sum[j];
                    }
                }
            }
        }
    }
    __syncthreads();
}

// Piece c (values 16c..16c+15) of a staged input into its unit slot of smem (stage's layout, `units` units a row).
template <int T> __device__ __forceinline__ void place_piece(u8* smem, int units, int c, uint4 piece) {
    int unit, offset;
    unit_slot<T>(16 * c, unit, offset);
    ((uint4*)smem)[(offset >> 4) * units + unit] = piece;
}
// The whole block reads an input quantized ahead (store_q8_block's staged layout: the producing kernel's epilogue
// quantized it as stage would) into smem in stage's layout: 16-value pieces moved to their unit slots, then the scales
// and sums; ends with __syncthreads. The staging without its quantization: 30 -> 20 us on the 8B down product (H100).
template <int T> __device__ __forceinline__ void copy_staged(const u8* __restrict__ staged, int cols, u8* smem) {
    if constexpr (int8_input<T>()) {
        const int units = cols / unit_values<T>();
        for (int c = threadIdx.x; c < cols / 16; c += blockDim.x)
            place_piece<T>(smem, units, c, ((const uint4*)staged)[c]);
        const float* scales = (const float*)(staged + cols);  // d[cols/32], s[cols/32], as stage keeps them
        for (int i = threadIdx.x; i < cols / 16; i += blockDim.x) ((float*)(smem + cols))[i] = scales[i];
    }
    __syncthreads();
}

// One unit's contribution to a row's dot product. xq: staged int8 (uint4 words), xd / xs: block scales
// and sums, units: units per row.
template <int T> __device__ __forceinline__ float unit_dot(const u8* __restrict__ row, int u, const uint4* xq,
                                                           const float* xd, const float* xs, int units);

template <> __device__ __forceinline__ float unit_dot<T_Q8_0>(const u8* __restrict__ row, int u, const uint4* xq,
                                                              const float* xd, const float*, int units) {
    const u8* blk = row + (long long)u * 34;  // d, qs[32]
    const uint4 a = xq[u], b = xq[units + u];
    const int x[8] = {(int)a.x, (int)a.y, (int)a.z, (int)a.w, (int)b.x, (int)b.y, (int)b.z, (int)b.w};
    int acc = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc = dp4a(load_b2(blk + 2 + 4 * i), x[i], acc);
    return load_h(blk) * xd[u] * (float)acc;
}

template <> __device__ __forceinline__ float unit_dot<T_Q4_0>(const u8* __restrict__ row, int u, const uint4* xq,
                                                              const float* xd, const float*, int units) {
    const u8* blk = row + (long long)u * 18;  // d, qs[16]: value j < 16 low nibble of qs[j], j >= 16 high of qs[j-16]
    const uint4 a = xq[u], b = xq[units + u];
    const int lo[4] = {(int)a.x, (int)a.y, (int)a.z, (int)a.w}, hi[4] = {(int)b.x, (int)b.y, (int)b.z, (int)b.w};
    int acc = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int w = load_b2(blk + 2 + 4 * i);
        acc = dp4a(minus8(w & 0x0F0F0F0F), lo[i], acc);
        acc = dp4a(minus8((w >> 4) & 0x0F0F0F0F), hi[i], acc);
    }
    return load_h(blk) * xd[u] * (float)acc;
}

template <> __device__ __forceinline__ float unit_dot<T_Q4_1>(const u8* __restrict__ row, int u, const uint4* xq,
                                                              const float* xd, const float* xs, int units) {
    const u8* blk = row + (long long)u * 20;  // d, m, qs[16] (4-byte aligned); nibbles as Q4_0; q*d + m
    const uint4 a = xq[u], b = xq[units + u];
    const int lo[4] = {(int)a.x, (int)a.y, (int)a.z, (int)a.w}, hi[4] = {(int)b.x, (int)b.y, (int)b.z, (int)b.w};
    const unsigned* qs = (const unsigned*)(blk + 4);
    int acc = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int w = (int)qs[i];
        acc = dp4a(w & 0x0F0F0F0F, lo[i], acc);
        acc = dp4a((w >> 4) & 0x0F0F0F0F, hi[i], acc);
    }
    const unsigned dm = *(const unsigned*)blk;
    return h2f((half_t)(dm & 0xffffu)) * xd[u] * (float)acc + h2f((half_t)(dm >> 16)) * xs[u];
}

// Q4_K: 144 bytes = d, dmin, scales[12], qs[128]; unit u = 4 * superblock + g: sub-blocks 2g (low nibbles of
// qs[32g .. 32g+31]) and 2g+1 (high nibbles); value = d*sc*q - dmin*m (ggml get_scale_min_k4)
template <> __device__ __forceinline__ float unit_dot<T_Q4_K>(const u8* __restrict__ row, int u, const uint4* xq,
                                                              const float* xd, const float* xs, int units) {
    const u8* blk = row + (long long)(u >> 2) * 144;
    const int g = u & 3;
    const uint4* qs = (const uint4*)(blk + 16) + 2 * g;
    const uint4 w0 = qs[0], w1 = qs[1];
    const int w[8] = {(int)w0.x, (int)w0.y, (int)w0.z, (int)w0.w, (int)w1.x, (int)w1.y, (int)w1.z, (int)w1.w};
    const uint4 x0 = xq[u], x1 = xq[units + u], x2 = xq[2 * units + u], x3 = xq[3 * units + u];
    const int xl[8] = {(int)x0.x, (int)x0.y, (int)x0.z, (int)x0.w, (int)x1.x, (int)x1.y, (int)x1.z, (int)x1.w};
    const int xh[8] = {(int)x2.x, (int)x2.y, (int)x2.z, (int)x2.w, (int)x3.x, (int)x3.y, (int)x3.z, (int)x3.w};
    int dl = 0, dh = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        dl = dp4a(w[i] & 0x0F0F0F0F, xl[i], dl);
        dh = dp4a((w[i] >> 4) & 0x0F0F0F0F, xh[i], dh);
    }
    // 6-bit scales and mins of sub-blocks 2g, 2g+1 (get_scale_min_k4 on the 12 bytes as 3 words; bytes 2g&3,
    // 2g&3 + 1 of each word): g < 2: word 0 (scales), word 1 (mins); else low/high nibbles of word 2 with the
    // top two bits of words 0 / 1
    const unsigned* scw = (const unsigned*)(blk + 4);
    const int shift = 16 * (g & 1);
    const unsigned a0 = scw[0] >> shift, a1 = scw[1] >> shift, a2 = scw[2] >> shift;
    const unsigned sc2 = g < 2 ? a0 & 0x3f3f : (a2 & 0x0f0f) | ((a0 >> 2) & 0x3030);
    const unsigned mn2 = g < 2 ? a1 & 0x3f3f : ((a2 >> 4) & 0x0f0f) | ((a1 >> 2) & 0x3030);
    const int s0 = sc2 & 0xff, s1 = (sc2 >> 8) & 0xff, m0 = mn2 & 0xff, m1 = (mn2 >> 8) & 0xff;
    const unsigned dm = *(const unsigned*)blk;
    const float d = h2f((half_t)(dm & 0xffffu)), dmin = h2f((half_t)(dm >> 16));
    return d * ((float)(s0 * dl) * xd[2 * u] + (float)(s1 * dh) * xd[2 * u + 1]) -
           dmin * ((float)m0 * xs[2 * u] + (float)m1 * xs[2 * u + 1]);
}

// Q6_K: 210 bytes = ql[128], qh[64], scales[16] (int8), d. Unit u = 4 * superblock + 2h + kk: quarters k = kk
// (low nibbles of ql[64h + 32kk + l], qh bits 2kk) and k = kk + 2 (high nibbles, qh bits 2kk + 4) of half h,
// l = 0..31; value (q - 32) * d * scales[8h + 2k + l/16]
template <> __device__ __forceinline__ float unit_dot<T_Q6_K>(const u8* __restrict__ row, int u, const uint4* xq,
                                                              const float* xd, const float*, int units) {
    const u8* blk = row + (long long)(u >> 2) * 210;
    const int h = (u >> 1) & 1, kk = u & 1;
    const u8* ql = blk + 64 * h + 32 * kk;
    const u8* qh = blk + 128 + 32 * h;
    const uint4 x0 = xq[u], x1 = xq[units + u], x2 = xq[2 * units + u], x3 = xq[3 * units + u];
    const int xa[8] = {(int)x0.x, (int)x0.y, (int)x0.z, (int)x0.w, (int)x1.x, (int)x1.y, (int)x1.z, (int)x1.w};
    const int xc[8] = {(int)x2.x, (int)x2.y, (int)x2.z, (int)x2.w, (int)x3.x, (int)x3.y, (int)x3.z, (int)x3.w};
    int dot[4] = {0, 0, 0, 0};  // (k = kk, l < 16), (kk, l >= 16), (kk + 2, l < 16), (kk + 2, l >= 16)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int lw = load_b2(ql + 4 * i), hw = load_b2(qh + 4 * i) >> (2 * kk);
        const int a = (lw & 0x0F0F0F0F) | ((hw & 0x03030303) << 4);
        const int c = ((lw >> 4) & 0x0F0F0F0F) | (((hw >> 4) & 0x03030303) << 4);
        dot[i >> 2] = dp4a(minus32(a), xa[i], dot[i >> 2]);
        dot[2 + (i >> 2)] = dp4a(minus32(c), xc[i], dot[2 + (i >> 2)]);
    }
    const i8* sc = (const i8*)(blk + 192) + 8 * h + 2 * kk;
    const int b = 2 * u - kk;  // x block of quarter kk (quarter kk + 2: b + 2)
    return load_h(blk + 208) * (xd[b] * (float)(sc[0] * dot[0] + sc[1] * dot[1]) +
                                xd[b + 2] * (float)(sc[4] * dot[2] + sc[5] * dot[3]));
}

// One warp's dot product of a stored row with the staged input (fp32 result, every lane).
template <int T> __device__ __forceinline__ float dot_row(const u8* __restrict__ row, const u8* smem, int cols) {
    if constexpr (int8_input<T>()) {
        const int units = cols / unit_values<T>();
        const uint4* xq = (const uint4*)smem;
        const float* xd = (const float*)(smem + cols);
        const float* xs = xd + (cols >> 5);
        float acc = 0.0f;
#pragma unroll kUnitUnroll
        for (int u = threadIdx.x & 31; u < units; u += 32) acc += unit_dot<T>(row, u, xq, xd, xs, units);
        return warp_sum(acc);
    } else {
        return row_dot<T>(row, (const float*)smem, cols);
    }
}

// One warp's dot products of two stored rows with the staged input (int8 types): dot_row's sums, each row's
// in its order, both rows' unit loads issued together.
template <int T> __device__ __forceinline__ float2 dot_rows2(const u8* __restrict__ row0, const u8* __restrict__ row1,
                                                             const u8* smem, int cols) {
    const int units = cols / unit_values<T>();
    const uint4* xq = (const uint4*)smem;
    const float* xd = (const float*)(smem + cols);
    const float* xs = xd + (cols >> 5);
    float acc0 = 0.0f, acc1 = 0.0f;
#pragma unroll kUnitUnroll
    for (int u = threadIdx.x & 31; u < units; u += 32) {
        const float d0 = unit_dot<T>(row0, u, xq, xd, xs, units);
        const float d1 = unit_dot<T>(row1, u, xq, xd, xs, units);
        acc0 += d0;
        acc1 += d1;
    }
    return make_float2(warp_sum(acc0), warp_sum(acc1));
}

// rsqrt(mean(x^2) + eps) over the whole block (every thread gets it). The first GEMV_THREADS threads sum, in the
// same order whatever the block's size: head_ring's extra producer warp adds zeros, so its scale is head's bit for bit.
__device__ __forceinline__ float rms_scale(const float* __restrict__ x, float eps, int d, float* scratch) {
    float ss = 0.0f;
    if (threadIdx.x < GEMV_THREADS)
#pragma unroll 4
        for (int i = threadIdx.x; i < d; i += GEMV_THREADS) ss += x[i] * x[i];
    return rsqrtf(block_sum(ss, scratch) / (float)d + eps);
}

// copy_staged of a prenormed input, its block scales and sums times s = rsqrt(mean(x^2) + eps), mean(x^2) from the
// producer's partial sums of squares (n_partials fp32: gemv_add's epilogue, one per block), summed by every block in
// the same fixed order so that every block gets the same s. The partials, the staged pieces and their scales and
// sums are all asked for before any is used: one L2 round trip after the wait (v51; the scale summed first, then the
// copy, took two). Ends with __syncthreads.
constexpr int kPiecesHeld = 2;  // a thread's pieces and scales loaded ahead (all of them to d = 8192 at 256 threads)
template <int T>
__device__ __forceinline__ void copy_staged_normed(const u8* __restrict__ staged, int cols, u8* smem,
                                                   const float* __restrict__ partials, int n_partials, float eps,
                                                   float* scratch) {
    if constexpr (int8_input<T>()) {  // (float types stage their input: never called for them)
        // cols / 16 pieces of 16 values, and as many floats: d[cols/32], s[cols/32]
        const int n_pieces = cols / 16, units = cols / unit_values<T>();
        const uint4* pieces = (const uint4*)staged;
        const float* scales = (const float*)(staged + cols);
        uint4 piece[kPiecesHeld];
        float scale[kPiecesHeld];
#pragma unroll
        for (int k = 0; k < kPiecesHeld; ++k) {  // before the partials' loop, whose sums wait for their loads
            const int c = threadIdx.x + k * blockDim.x;
            if (c < n_pieces) {
                piece[k] = pieces[c];
                scale[k] = scales[c];
            }
        }
        float ss = 0.0f;
        if (threadIdx.x < GEMV_THREADS)  // as rms_scale: the same order whatever the block's size
#pragma unroll 4
            for (int i = threadIdx.x; i < n_partials; i += GEMV_THREADS) ss += partials[i];
        float* dst = (float*)(smem + cols);
#pragma unroll
        for (int k = 0; k < kPiecesHeld; ++k) {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < n_pieces) place_piece<T>(smem, units, c, piece[k]);
        }
        const float s = rsqrtf(block_sum(ss, scratch) / (float)cols + eps);
#pragma unroll
        for (int k = 0; k < kPiecesHeld; ++k) {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < n_pieces) dst[c] = scale[k] * s;
        }
        for (int c = threadIdx.x + kPiecesHeld * blockDim.x; c < n_pieces; c += blockDim.x) {
            place_piece<T>(smem, units, c, pieces[c]);
            dst[c] = scales[c] * s;
        }
    }
    __syncthreads();
}

// The input h = rmsnorm(x) * w of qkv, gateup and head into smem (stage's layout): staged with its norm (rms_scale,
// then NORMED) or, with in_staged (int8 types; the residual's producer quantized u = x * w and wrote the partial
// sums of squares of x), copied in with its block scales and sums times s = rsqrt(mean(x^2) + eps): q8 is
// scale-invariant (q(s u) = q(u), d(s u) = s d(u)), so these are h's int8 values but for the rounding of h to act_t,
// which this path skips. Ends with __syncthreads.
#define NORMED(x, w, inv) [&](int i) { return a2f(f2a(x[i] * inv * w[i])); }
template <int T>
__device__ __forceinline__ void stage_normed(const float* __restrict__ x, const float* __restrict__ w_norm, float eps,
                                             int d, const u8* __restrict__ in_staged,
                                             const float* __restrict__ partials, int n_partials, u8* smem,
                                             float* scratch) {
    if (int8_input<T>() && in_staged != nullptr) {
        copy_staged_normed<T>(in_staged, d, smem, partials, n_partials, eps, scratch);
    } else {
        const float inv = rms_scale(x, eps, d, scratch);
        stage<T>(NORMED(x, w_norm, inv), d, smem);
    }
}

// This warp's tasks: blockIdx.x * per_block + warp + 8k, below n (task_range; qkv cuts its blocks otherwise, below,
// and walks its TaskRange with prefetch_range / for_range). for_tasks calls f(task) for each, and
// before it prefetch(the task PREFETCH_TASKS ahead) (its rows come into L2 while these are computed);
// prefetch_first asks for the first PREFETCH_TASKS (before the staging, whose latency it then overlaps).
// A bounded distance keeps L2 from thrashing (prefetching a whole block's rows at once overflowed it on
// large matrices).
struct TaskRange {
    long long first, end;  // this warp's first task; the end of its block's tasks
};
__device__ __forceinline__ TaskRange task_range(int n, int per_block) {
    const long long start = (long long)blockIdx.x * per_block;
    return {start + (threadIdx.x >> 5), start + per_block < n ? start + per_block : n};
}
template <class P> __device__ __forceinline__ void prefetch_range(TaskRange range, P prefetch,
                                                                  int tasks = PREFETCH_TASKS) {
    const int step = blockDim.x >> 5;
    for (int k = 0; k < tasks; ++k)
        if (range.first + k * step < range.end) prefetch((int)(range.first + k * step));
}
template <class P> __device__ __forceinline__ void prefetch_first(int n, int per_block, P prefetch,
                                                                  int tasks = PREFETCH_TASKS) {
    prefetch_range(task_range(n, per_block), prefetch, tasks);
}
template <class P, class F> __device__ __forceinline__ void for_range(TaskRange range, P prefetch, F f) {
    const int step = blockDim.x >> 5;
    for (long long t = range.first; t < range.end; t += step) {
        if (t + PREFETCH_TASKS * step < range.end) prefetch((int)(t + PREFETCH_TASKS * step));
        f((int)t);
    }
}
template <class P, class F> __device__ __forceinline__ void for_tasks(int n, int per_block, P prefetch, F f) {
    for_range(task_range(n, per_block), prefetch, f);
}
// for_tasks two at a time: f2(task, task + step) while both are this warp's, then f(last) for an odd one out;
// before a pair, the rows of the PREFETCH_TASKS pairs after it are asked for (prefetch_first: the first pairs').
template <class P, class F, class F2>
__device__ __forceinline__ void for_task_pairs(int n, int per_block, P prefetch, F f, F2 f2) {
    const TaskRange range = task_range(n, per_block);
    const int step = blockDim.x >> 5;
    long long t = range.first;
    for (; t + step < range.end; t += 2 * step) {
        for (int k = 2; k < 2 + 2 * PREFETCH_TASKS; ++k)
            if (t + k * step < range.end) prefetch((int)(t + k * step));
        f2((int)t, (int)(t + step));
    }
    if (t < range.end) f((int)t);
}

// Rows a warp computes at once: R (1 or 2) for the int8 types, else 1. Two rows in one unit loop (dot_rows2) double
// the bytes a warp has in flight: faster for gemv_add (the 8B o / down products give each warp 2-3 rows) and gateup
// (a task's gate and up rows), slower for the head and gemv (dev/cuda/NOTES.md, v4).
template <int T, int R> __device__ constexpr int rows_at_once() { return R == 2 && int8_input<T>() ? 2 : 1; }

// This warp's rows r of w (row_bytes apart) dotted with the staged input, emit(r, dot, ahead(r)) for each,
// rows_at_once<T, R>() at a time; ahead(r) (a value the emit needs, e.g. gemv_add's residual row) is read before the
// row's dot product, so that its round trip overlaps the product's instead of following it (v52);
// prefetch_first(rows, per_block, prefetch, PREFETCH_TASKS * rows_at_once<T, R>()) goes before the staging.
struct NothingAhead {
    __device__ __forceinline__ float operator()(int) const { return 0.0f; }
};
template <int T, int R, class P, class A, class E>
__device__ __forceinline__ void each_row_dot(const u8* __restrict__ w, long long row_bytes, int rows, int cols,
                                             int per_block, const u8* smem, P prefetch, A ahead, E emit) {
    auto one = [&](int r) {
        const float value = ahead(r);
        emit(r, dot_row<T>(w + r * row_bytes, smem, cols), value);
    };
    if constexpr (rows_at_once<T, R>() == 2) {
        for_task_pairs(rows, per_block, prefetch, one, [&](int r0, int r1) {
            const float value0 = ahead(r0), value1 = ahead(r1);
            const float2 acc = dot_rows2<T>(w + r0 * row_bytes, w + r1 * row_bytes, smem, cols);
            emit(r0, acc.x, value0);
            emit(r1, acc.y, value1);
        });
    } else {
        for_tasks(rows, per_block, prefetch, one);
    }
}

template <int T>
__device__ __forceinline__ void gemv_body(const u8* __restrict__ w, long long row_bytes, const act_t* __restrict__ x,
                                          int rows, int cols, void* __restrict__ y, int out_f32, int per_block) {
    extern __shared__ __align__(16) u8 smem[];
    auto prefetch = [&](int r) { prefetch_row(w + r * row_bytes, row_bytes); };
    prefetch_first(rows, per_block, prefetch, PREFETCH_TASKS);
    pdl_wait();  // the weights' first rows asked for; everything after may read what earlier kernels wrote
    stage<T>([&](int i) { return a2f(x[i]); }, cols, smem);
    auto emit = [&](int r, float acc, float) {
        if ((threadIdx.x & 31) == 0) {
            if (out_f32) ((float*)y)[r] = acc;
            else ((act_t*)y)[r] = f2a(acc);
        }
    };
    each_row_dot<T, 1>(w, row_bytes, rows, cols, per_block, smem, prefetch, NothingAhead(), emit);
}

// gemv_add's epilogue for the next RMSNorm-fused product (rows % 32 == 0; per_block any multiple of 8, so a 32-row
// group may span blocks): the block writes the sum of x[r]^2 over its rows to partials[blockIdx.x] (`squares`: each
// warp's lane 0 summed its own new rows in task order as it stored them, v53; then block_sum: a fixed order, no
// atomics, no read-back); then each group it touches is quantized by the block that stores its rows
// last: u = x[r] * next_norm[r] (store_q8_block, staged layout over `rows` values). A group inside one block is that
// block's; a group across blocks is handed off: each of its blocks, its rows stored and fenced, counts itself on
// arrivals[group] (zero before the launch), and the one that finds all the others counted quantizes the group (reading
// their rows through L2) and sets the count back to zero for the next launch. Which block that is does not change the
// bytes: the group's 32 values are the same, quantized by one warp in one order. Launched in clusters of
// 32 / per_block blocks (gemv.py prenorm_cluster: per_block 16, or 8 in a small grid; sm_90), a group's blocks are
// one cluster: each block stores its rows, the cluster synchronizes (cluster_sync: release / acquire at cluster scope)
// and the cluster's last block quantizes the group, without the fence, the count and its round trips.
__device__ __forceinline__ float load_cg(const float* p) {  // through L2: another block's store, fenced before
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void prenorm_epilogue(const float* x, const float* __restrict__ next_norm, int rows,
                                                 u8* __restrict__ out_staged, float* __restrict__ partials,
                                                 unsigned* __restrict__ arrivals, int per_block, float squares) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int r0 = blockIdx.x * per_block, r1 = min(rows, r0 + per_block);
    const unsigned cluster = cluster_ctas();  // > 1: 32 / per_block, the blocks of this block's group
    if (cluster == 1) __threadfence();  // every thread's stores of x visible beyond the block before any arrival
    const float ss = block_sum(squares, scratch);  // its barriers: every row of the block stored
    if (threadIdx.x == 0) partials[blockIdx.x] = ss;
    if (cluster > 1) {
        cluster_sync();  // the group's rows stored by each of its blocks, visible to all of them
        if (cluster_rank() == cluster - 1 && warp == 0) {
            const int r = (r0 & ~31) + lane;
            store_q8_block(load_cg(x + r) * next_norm[r], r0 >> 5, rows, out_staged);
        }
        return;
    }
    for (int g = (r0 >> 5) + warp; 32 * g < r1; g += n_warps) {
        const int first = 32 * g / per_block, last = min(32 * g + 31, rows - 1) / per_block;
        bool mine = first == last;
        if (!mine) {
            unsigned counted = 0;
            if (lane == 0) counted = atomicAdd(&arrivals[g], 1u);
            counted = __shfl_sync(0xffffffffu, counted, 0);
            mine = counted == (unsigned)(last - first);
            if (mine && lane == 0) arrivals[g] = 0u;
            if (mine) {
                __threadfence();
                __syncwarp();  // every lane past the fence before any reads the other blocks' rows
            }
        }
        if (mine) {
            const int r = 32 * g + lane;
            store_q8_block(load_cg(x + r) * next_norm[r], g, rows, out_staged);
        }
    }
}

template <int T>
__device__ __forceinline__ void gemv_add_body(const u8* __restrict__ w, long long row_bytes,
                                              const act_t* __restrict__ a, const u8* __restrict__ a_staged, int rows,
                                              int cols, float* __restrict__ x, const float* __restrict__ next_norm,
                                              u8* __restrict__ out_staged, float* __restrict__ partials,
                                              unsigned* __restrict__ arrivals, int per_block) {
    extern __shared__ __align__(16) u8 smem[];
    auto prefetch = [&](int r) { prefetch_row(w + r * row_bytes, row_bytes); };
    prefetch_first(rows, per_block, prefetch, PREFETCH_TASKS * rows_at_once<T, 2>());
    pdl_wait();  // the weights' first rows asked for; everything after may read what earlier kernels wrote
    if (a_staged != nullptr) copy_staged<T>(a_staged, cols, smem);
    else stage<T>([&](int i) { return a2f(a[i]); }, cols, smem);
    const bool lane0 = (threadIdx.x & 31) == 0;
    float squares = 0.0f;  // lane 0: the sum of this warp's new x[r]^2, for the prenorm epilogue
    auto residual_row = [&](int r) { return lane0 ? x[r] : 0.0f; };  // read before the row's dot product
    auto emit = [&](int r, float acc, float x_r) {
        if (lane0) {
            const float updated = x_r + a2f(f2a(acc));
            x[r] = updated;
            squares += updated * updated;
        }
    };
    each_row_dot<T, 2>(w, row_bytes, rows, cols, per_block, smem, prefetch, residual_row, emit);
    if (out_staged != nullptr) prenorm_epilogue(x, next_norm, rows, out_staged, partials, arrivals, per_block, squares);
}

// A Q/K/V row's value as the composed path rounds it: act_t(dot), then act_t(that + bias[i]) when b is set
__device__ __forceinline__ float biased(float dot, const float* __restrict__ b, long long i) {
    const float y = a2f(f2a(dot));
    return b != nullptr ? a2f(f2a(y + b[i])) : y;
}

// qkv's blocks hold equal rows, not equal tasks (dev/cuda/NOTES.md v54): the first ceil(n_q / per_block) blocks take
// per_block query tasks each, the next ceil(n_k / (per_block / 2)) half as many key tasks (a rotary pair is two
// rows), the rest per_block value tasks (gemv.py qkv_blocks). Equal tasks gave the key blocks twice the bytes: the
// launch's tail.
__device__ __forceinline__ TaskRange qkv_task_range(int n_q, int n_k, int n, int per_block) {
    const int per_key_block = per_block > 1 ? per_block >> 1 : 1;
    const int q_blocks = (n_q + per_block - 1) / per_block, k_blocks = (n_k + per_key_block - 1) / per_key_block;
    const int b = blockIdx.x;
    long long start, end;
    if (b < q_blocks) {
        start = (long long)b * per_block;
        end = min(start + per_block, (long long)n_q);
    } else if (b < q_blocks + k_blocks) {
        start = n_q + (long long)(b - q_blocks) * per_key_block;
        end = min(start + per_key_block, (long long)n_q + n_k);
    } else {
        start = n_q + n_k + (long long)(b - q_blocks - k_blocks) * per_block;
        end = min(start + per_block, (long long)n);
    }
    return {start + (threadIdx.x >> 5), end};
}

template <int T>
__device__ __forceinline__ void qkv_body(
    const float* __restrict__ x, const float* __restrict__ w_norm, float eps, int d, const u8* __restrict__ wq,
    const u8* __restrict__ wk, const u8* __restrict__ wv, const float* __restrict__ bq, const float* __restrict__ bk,
    const float* __restrict__ bv, long long row_bytes, act_t* __restrict__ q_out,
    act_t* __restrict__ cache_k, act_t* __restrict__ cache_v, const int* __restrict__ pos,
    const float* __restrict__ cos_t, const float* __restrict__ sin_t, int n_heads, int n_kv, int D, int rope_dim,
    int chunk_len, const u8* __restrict__ in_staged, const float* __restrict__ partials, int n_partials,
    int per_block) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ float scratch[32];
    const int half_r = rope_dim >> 1;
    const int k_per_head = D - half_r;
    const int n_q = n_heads * D, n_k = n_kv * k_per_head, n_v = n_kv * D;
    // key task j of a head: j < half_r the rotary pair (j, j + half_r), else pass-through dim rope_dim + j - half_r
    auto prefetch = [&](int task) {
        if (task < n_q) {
            prefetch_row(wq + task * row_bytes, row_bytes);
        } else if (task < n_q + n_k) {
            const int head = (task - n_q) / k_per_head, j = (task - n_q) - head * k_per_head;
            prefetch_row(wk + (long long)(head * D + (j < half_r ? j : rope_dim + j - half_r)) * row_bytes, row_bytes);
            if (j < half_r) prefetch_row(wk + (long long)(head * D + j + half_r) * row_bytes, row_bytes);
        } else {
            prefetch_row(wv + (long long)(task - n_q - n_k) * row_bytes, row_bytes);
        }
    };
    const TaskRange range = qkv_task_range(n_q, n_k, n_q + n_k + n_v, per_block);
    prefetch_range(range, prefetch);
    pdl_wait();  // the weights' first rows asked for; everything after may read what earlier kernels wrote
    stage_normed<T>(x, w_norm, eps, d, in_staged, partials, n_partials, smem, scratch);
    const bool lane0 = (threadIdx.x & 31) == 0;
    const int p = pos[0];
    const long long cache_row = (long long)p * n_kv * D;
    for_range(range, prefetch, [&](int task) {
        if (task < n_q) {
            const float acc = dot_row<T>(wq + task * row_bytes, smem, d);
            if (lane0) q_out[task] = f2a(biased(acc, bq, task));
            return;
        }
        task -= n_q;
        if (task < n_k) {
            const int head = task / k_per_head, j = task - head * k_per_head;
            const int base = head * D;
            if (j >= half_r) {  // pass-through dim
                const int dim = rope_dim + j - half_r;
                const float acc = dot_row<T>(wk + (long long)(base + dim) * row_bytes, smem, d);
                if (lane0) cache_k[cache_row + base + dim] = f2a(biased(acc, bk, base + dim));
                return;
            }
            const u8* row1 = wk + (long long)(base + j) * row_bytes;
            const u8* row2 = wk + (long long)(base + j + half_r) * row_bytes;
            float2 acc;
            if constexpr (rows_at_once<T, 2>() == 2) {  // both rows' loads issued together (NOTES.md v23)
                acc = dot_rows2<T>(row1, row2, smem, d);
            } else {
                acc = make_float2(dot_row<T>(row1, smem, d), dot_row<T>(row2, smem, d));
            }
            const float x1 = biased(acc.x, bk, base + j), x2 = biased(acc.y, bk, base + j + half_r);
            if (lane0) {
                const int kp = Dca{chunk_len, 0}.key_position(p);
                const float c = cos_t[(long long)kp * half_r + j], s = sin_t[(long long)kp * half_r + j];
                cache_k[cache_row + base + j] = f2a(x1 * c - x2 * s);
                cache_k[cache_row + base + j + half_r] = f2a(x2 * c + x1 * s);
            }
            return;
        }
        task -= n_k;
        const float acc = dot_row<T>(wv + (long long)task * row_bytes, smem, d);
        if (lane0) cache_v[cache_row + task] = f2a(biased(acc, bv, task));
    });
}

template <int T>
__device__ __forceinline__ void gateup_body(const float* __restrict__ x, const float* __restrict__ w_norm, float eps,
                                            int d, const u8* __restrict__ wg, const u8* __restrict__ wu,
                                            long long row_bytes, int rows, act_t* __restrict__ out,
                                            u8* __restrict__ out_staged, const u8* __restrict__ in_staged,
                                            const float* __restrict__ partials, int n_partials, int per_block) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ float scratch[32];
    auto prefetch = [&](int r) {
        prefetch_row(wg + r * row_bytes, row_bytes);
        prefetch_row(wu + r * row_bytes, row_bytes);
    };
    prefetch_first(rows, per_block, prefetch);
    pdl_wait();  // the weights' first rows asked for; everything after may read what earlier kernels wrote
    stage_normed<T>(x, w_norm, eps, d, in_staged, partials, n_partials, smem, scratch);
    for_tasks(rows, per_block, prefetch, [&](int r) {
        float g, u;
        if constexpr (rows_at_once<T, 2>() == 2) {  // the gate and up rows in one unit loop
            const float2 gu = dot_rows2<T>(wg + r * row_bytes, wu + r * row_bytes, smem, d);
            g = a2f(f2a(gu.x));
            u = a2f(f2a(gu.y));
        } else {
            g = a2f(f2a(dot_row<T>(wg + r * row_bytes, smem, d)));
            u = a2f(f2a(dot_row<T>(wu + r * row_bytes, smem, d)));
        }
        if ((threadIdx.x & 31) == 0) out[r] = f2a(g * (0.5f + 0.5f * tanhf(0.5f * g)) * u);
    });
    if (out_staged != nullptr) {  // the down product's input, quantized: this block's rows (whole blocks of 32)
        __syncthreads();          // every row of the block stored
        const int end = min(rows, (blockIdx.x + 1) * per_block);
        for (int b = blockIdx.x * per_block / 32 + (threadIdx.x >> 5); 32 * b < end; b += blockDim.x >> 5)
            store_q8_block(a2f(out[32 * b + (threadIdx.x & 31)]), b, rows, out_staged);
    }
}

template <int T>
__device__ __forceinline__ void head_body(const float* __restrict__ x, const float* __restrict__ w_norm, float eps,
                                          int d, const u8* __restrict__ w, long long row_bytes, int rows,
                                          float* __restrict__ logits, const u8* __restrict__ in_staged,
                                          const float* __restrict__ partials, int n_partials, int per_block) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ float scratch[32];
    auto prefetch = [&](int r) { prefetch_row(w + r * row_bytes, row_bytes); };
    prefetch_first(rows, per_block, prefetch, PREFETCH_TASKS);
    pdl_wait();  // the weights' first rows asked for; everything after may read what earlier kernels wrote
    stage_normed<T>(x, w_norm, eps, d, in_staged, partials, n_partials, smem, scratch);
    auto emit = [&](int r, float acc, float) {
        if ((threadIdx.x & 31) == 0) logits[r] = acc;
    };
    each_row_dot<T, 1>(w, row_bytes, rows, d, per_block, smem, prefetch, NothingAhead(), emit);
}

// head_ring_T: head_T with the weight rows streamed into shared memory by Hopper's bulk copy engine (sm_90; an empty
// body below it, where the host never launches it). Why only the head: its Q6_K rows (210-byte blocks) are read as
// 2-byte words, cheap from shared memory (8B head 180.6 -> 154.3 us, H100; the Q4_K products gain nothing:
// dev/cuda/NOTES.md v8).
// ring_row_dots: the block's rows [blockIdx.x * per_block, + per_block) of w dotted with its staged input. Block:
// RING_CONSUMERS warps + 1 producer warp. Thread 0 initializes the stages' mbarriers and issues the first `stages`
// stages (stage_rows rows each, contiguous in memory) before stage_input() (the whole block stages the input into
// smem, ending with __syncthreads; the rows' HBM latency overlaps it); then the producer's lane 0 refills a stage once
// every consumer warp has arrived on its `empty` barrier. Consumer warp w computes rows w, w + 8, ... of each stage,
// two at a time (dot_rows2) from shared memory, emit(row, dot) on lane 0: the same sums in the same order as head_T,
// so the same values bit for bit. Shared memory: the staged input (d + d/4 rounded up to 128) | stages x stage_rows x
// row_bytes | 2 x stages mbarriers; row_bytes % 16 == 0.
#define RING_CONSUMERS 8
#define RING_THREADS (32 * (RING_CONSUMERS + 1))
template <int T, class S, class E>
__device__ __forceinline__ void ring_row_dots(const u8* __restrict__ w, long long row_bytes, int rows, int d,
                                              int per_block, int stage_rows, int stages, S stage_input, E emit) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(16) u8 smem[];
    u8* ring = smem + (((d + d / 4) + 127) & ~127);
    const long long stage_bytes = stage_rows * row_bytes;
    const unsigned full = smem_addr(ring + stages * stage_bytes), empty = full + 8 * stages;
    const int r0 = blockIdx.x * per_block, r1 = min(rows, r0 + per_block);
    const int n_stages = r1 > r0 ? (r1 - r0 + stage_rows - 1) / stage_rows : 0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    auto issue = [&](int k) {  // stage k's rows into buffer k % stages
        const int s = k % stages, first = r0 + k * stage_rows, n = min(stage_rows, r1 - first);
        mbar_expect_tx(full + 8 * s, (unsigned)(n * row_bytes));
        bulk_load(smem_addr(ring + s * stage_bytes), w + first * row_bytes, (unsigned)(n * row_bytes), full + 8 * s);
    };
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, RING_CONSUMERS);
        }
        mbar_init_fence();
        for (int k = 0; k < min(stages, n_stages); ++k) issue(k);
    }
    __syncthreads();  // the mbarriers initialized
    stage_input();
    if (warp == RING_CONSUMERS) {  // the producer
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
        for (int j = warp; j < stage_rows; j += 2 * RING_CONSUMERS) {
            if (first + j + RING_CONSUMERS < r1 && j + RING_CONSUMERS < stage_rows) {
                const float2 acc = dot_rows2<T>(held + j * row_bytes, held + (j + RING_CONSUMERS) * row_bytes, smem, d);
                if (lane == 0) {
                    emit(first + j, acc.x);
                    emit(first + j + RING_CONSUMERS, acc.y);
                }
            } else if (first + j < r1) {
                const float acc = dot_row<T>(held + j * row_bytes, smem, d);
                if (lane == 0) emit(first + j, acc);
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + 8 * s);
    }
#else
    __trap();  // the host launches head_ring only on compute capability >= 9.0 (gemv.head_uses_ring)
#endif
}

template <int T>
__device__ __forceinline__ void head_ring_body(const float* __restrict__ x, const float* __restrict__ w_norm,
                                               float eps, int d, const u8* __restrict__ w, long long row_bytes,
                                               int rows, float* __restrict__ logits, const u8* __restrict__ in_staged,
                                               const float* __restrict__ partials, int n_partials, int per_block,
                                               int stage_rows, int stages) {
    if constexpr (int8_input<T>()) {
        extern __shared__ __align__(16) u8 smem[];
        __shared__ float scratch[32];
        ring_row_dots<T>(w, row_bytes, rows, d, per_block, stage_rows, stages,
                         [&] {  // after the first stages' bulk copies (weights only) are issued
                             pdl_wait();
                             stage_normed<T>(x, w_norm, eps, d, in_staged, partials, n_partials, smem, scratch);
                         },
                         [&](int r, float acc) { logits[r] = acc; });
    }
}

// One weight type per build, instantiated by the loader (kernels.per_type): GEMV_KERNELS(q4_k, T_Q4_K).
#define GEMV_KERNELS(NAME, T)                                                                               \
    extern "C" __global__ void GEMV_BOUNDS gemv_##NAME(                                \
        const u8* w, long long row_bytes, const act_t* x, int rows, int cols, void* y, int out_f32,         \
        int per_block) {                                                                                    \
        gemv_body<T>(w, row_bytes, x, rows, cols, y, out_f32, per_block);                                   \
    }                                                                                                       \
    extern "C" __global__ void GEMV_BOUNDS gemv_add_##NAME(                            \
        const u8* w, long long row_bytes, const act_t* a, const u8* a_staged, int rows, int cols, float* x, \
        const float* next_norm, u8* out_staged, float* partials, unsigned* arrivals, int per_block) {       \
        gemv_add_body<T>(w, row_bytes, a, a_staged, rows, cols, x, next_norm, out_staged, partials,         \
                         arrivals, per_block);                                                              \
    }                                                                                                       \
    extern "C" __global__ void GEMV_BOUNDS qkv_##NAME(                                 \
        const float* x, const float* w_norm, float eps, int d, const u8* wq, const u8* wk, const u8* wv,   \
        const float* bq, const float* bk, const float* bv, long long row_bytes, act_t* q_out,              \
        act_t* cache_k, act_t* cache_v, const int* pos, const float* cos_t, const float* sin_t,            \
        int n_heads, int n_kv, int D, int rope_dim, int chunk_len, const u8* in_staged,                    \
        const float* partials, int n_partials, int per_block) {                                             \
        qkv_body<T>(x, w_norm, eps, d, wq, wk, wv, bq, bk, bv, row_bytes, q_out, cache_k, cache_v, pos,     \
                    cos_t, sin_t, n_heads, n_kv, D, rope_dim, chunk_len, in_staged, partials, n_partials,   \
                    per_block);                                                                             \
    }                                                                                                       \
    extern "C" __global__ void GEMV_BOUNDS gateup_##NAME(                              \
        const float* x, const float* w_norm, float eps, int d, const u8* wg, const u8* wu,                 \
        long long row_bytes, int rows, act_t* out, u8* out_staged, const u8* in_staged,                    \
        const float* partials, int n_partials, int per_block) {                                             \
        gateup_body<T>(x, w_norm, eps, d, wg, wu, row_bytes, rows, out, out_staged, in_staged, partials,    \
                       n_partials, per_block);                                                              \
    }                                                                                                       \
    extern "C" __global__ void GEMV_BOUNDS head_##NAME(                                \
        const float* x, const float* w_norm, float eps, int d, const u8* w, long long row_bytes, int rows,  \
        float* logits, const u8* in_staged, const float* partials, int n_partials, int per_block) {         \
        head_body<T>(x, w_norm, eps, d, w, row_bytes, rows, logits, in_staged, partials, n_partials,        \
                     per_block);                                                                            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(RING_THREADS) head_ring_##NAME(                           \
        const float* x, const float* w_norm, float eps, int d, const u8* w, long long row_bytes, int rows,  \
        float* logits, const u8* in_staged, const float* partials, int n_partials, int per_block,          \
        int stage_rows, int stages) {                                                                       \
        head_ring_body<T>(x, w_norm, eps, d, w, row_bytes, rows, logits, in_staged, partials, n_partials,   \
                          per_block, stage_rows, stages);                                                   \
    }
