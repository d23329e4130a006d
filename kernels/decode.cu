// Fused decode-step kernels (one token): RMSNorm folded into the GEMVs that read it, the key rotation
// and KV-cache store folded into the QKV GEMV, SwiGLU into the gate/up GEMV, the residual add into
// the output GEMVs. Six launches per layer (with attention's two) instead of sixteen, which is what
// bounds a decode step captured as a CUDA graph.
//
// Design. Same arithmetic as the unfused path, so the two agree to activation rounding: the normed
// input is staged in shared memory as `rmsnorm` computes it (256 threads, strided sum, block_sum,
// rounded to act_t; elementwise.cu sums per warp, in another order), every dot product is
// row_dot<TYPE> (dequant.cuh), and every value the unfused path would store as an activation (act_t:
// fp16, or bf16 when built with -DACT_BF16) is rounded to act_t here too. One warp per task, 8 warps
// (256 threads) per block; each warp first prefetches its weight rows into L2, so their HBM latency
// overlaps the RMSNorm staging. The position is read from device memory (pos[0]).
//   dec_qkv_T      tasks: Hq*D query rows (act_t out, unrotated) | per KV head, R/2 rotary pairs (two
//                  rows each, rotated at the key position and stored in the cache) and D-R
//                  pass-through rows | Hkv*D value rows (stored in the cache)
//   dec_gateup_T   out[r] = silu(Wg[r].h) * (Wu[r].h), act_t
//   dec_gemv_add_T x[r] += (W[r].a) (fp32 residual, in place; a act_t)
//   dec_head_T     logits[r] = Wout[r].rmsnorm(x), fp32

#define DEC_THREADS 256

// hs[0..d) = act_t-rounded rmsnorm(x) * w (blockDim.x == 256)
// Values per thread are loaded STAGE_BATCH at a time (all in flight together), summed in index order.
#define STAGE_BATCH 4
__device__ __forceinline__ void stage_normed(const float* __restrict__ x, const float* __restrict__ w, float eps,
                                             int d, float* hs, float* scratch) {
    float ss = 0.0f;
    for (int base = threadIdx.x; base < d; base += STAGE_BATCH * blockDim.x) {
        float xv[STAGE_BATCH];
#pragma unroll
        for (int u = 0; u < STAGE_BATCH; ++u) {
            const int i = base + u * blockDim.x;
            xv[u] = i < d ? x[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < STAGE_BATCH; ++u) ss += xv[u] * xv[u];
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)d + eps);
    for (int base = threadIdx.x; base < d; base += STAGE_BATCH * blockDim.x) {
        float xv[STAGE_BATCH], wv[STAGE_BATCH];
#pragma unroll
        for (int u = 0; u < STAGE_BATCH; ++u) {
            const int i = base + u * blockDim.x;
            xv[u] = i < d ? x[i] : 0.0f;
            wv[u] = i < d ? w[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < STAGE_BATCH; ++u) {
            const int i = base + u * blockDim.x;
            if (i < d) hs[i] = a2f(f2a(xv[u] * inv * wv[u]));
        }
    }
    __syncthreads();
}

template <int T>
__device__ __forceinline__ void dec_qkv_body(
    const float* __restrict__ x, const float* __restrict__ w_norm, float eps, int d, const u8* __restrict__ wq,
    const u8* __restrict__ wk, const u8* __restrict__ wv, long long row_bytes, act_t* __restrict__ q_out,
    act_t* __restrict__ cache_k, act_t* __restrict__ cache_v, const int* __restrict__ pos,
    const float* __restrict__ cos_t, const float* __restrict__ sin_t, int n_heads, int n_kv, int D, int rope_dim,
    int chunk_len) {
    extern __shared__ float hs[];
    __shared__ float scratch[32];
    const int half_r = rope_dim >> 1;
    const int k_per_head = D - half_r;
    const int n_q = n_heads * D, n_k = n_kv * k_per_head, n_v = n_kv * D;
    int task = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (task < n_q) {
        prefetch_row(wq + task * row_bytes, row_bytes);
    } else if (task < n_q + n_k) {
        const int head = (task - n_q) / k_per_head, j = (task - n_q) - head * k_per_head;
        prefetch_row(wk + (long long)(head * D + (j < half_r ? j : rope_dim + j - half_r)) * row_bytes, row_bytes);
        if (j < half_r) prefetch_row(wk + (long long)(head * D + j + half_r) * row_bytes, row_bytes);
    } else if (task < n_q + n_k + n_v) {
        prefetch_row(wv + (task - n_q - n_k) * row_bytes, row_bytes);
    }
    stage_normed(x, w_norm, eps, d, hs, scratch);
    const bool lane0 = (threadIdx.x & 31) == 0;
    const int p = pos[0];
    const long long cache_row = (long long)p * n_kv * D;
    if (task < n_q) {
        const float acc = row_dot<T>(wq + task * row_bytes, hs, d);
        if (lane0) q_out[task] = f2a(acc);
        return;
    }
    task -= n_q;
    if (task < n_k) {
        const int head = task / k_per_head, j = task - head * k_per_head;
        const int base = head * D;
        if (j >= half_r) {  // pass-through dim
            const int dim = rope_dim + j - half_r;
            const float acc = row_dot<T>(wk + (long long)(base + dim) * row_bytes, hs, d);
            if (lane0) cache_k[cache_row + base + dim] = f2a(acc);
            return;
        }
        const float x1 = a2f(f2a(row_dot<T>(wk + (long long)(base + j) * row_bytes, hs, d)));
        const float x2 = a2f(f2a(row_dot<T>(wk + (long long)(base + j + half_r) * row_bytes, hs, d)));
        if (lane0) {
            const int kp = Dca{chunk_len, 0}.key_position(p);
            const float c = cos_t[(long long)kp * half_r + j], s = sin_t[(long long)kp * half_r + j];
            cache_k[cache_row + base + j] = f2a(x1 * c - x2 * s);
            cache_k[cache_row + base + j + half_r] = f2a(x2 * c + x1 * s);
        }
        return;
    }
    task -= n_k;
    if (task < n_v) {
        const float acc = row_dot<T>(wv + task * row_bytes, hs, d);
        if (lane0) cache_v[cache_row + task] = f2a(acc);
    }
}

template <int T>
__device__ __forceinline__ void dec_gateup_body(const float* __restrict__ x, const float* __restrict__ w_norm,
                                                float eps, int d, const u8* __restrict__ wg,
                                                const u8* __restrict__ wu, long long row_bytes, int rows,
                                                act_t* __restrict__ out) {
    extern __shared__ float hs[];
    __shared__ float scratch[32];
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row < rows) {
        prefetch_row(wg + row * row_bytes, row_bytes);
        prefetch_row(wu + row * row_bytes, row_bytes);
    }
    stage_normed(x, w_norm, eps, d, hs, scratch);
    if (row >= rows) return;
    const float g = a2f(f2a(row_dot<T>(wg + row * row_bytes, hs, d)));
    const float u = a2f(f2a(row_dot<T>(wu + row * row_bytes, hs, d)));
    if ((threadIdx.x & 31) == 0) out[row] = f2a(g * (0.5f + 0.5f * tanhf(0.5f * g)) * u);
}

template <int T>
__device__ __forceinline__ void dec_gemv_add_body(const act_t* __restrict__ a, const u8* __restrict__ w,
                                                  long long row_bytes, int rows, int cols, float* __restrict__ x) {
    extern __shared__ float hs[];
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row < rows) prefetch_row(w + row * row_bytes, row_bytes);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) hs[i] = a2f(a[i]);
    __syncthreads();
    if (row >= rows) return;
    const float acc = row_dot<T>(w + row * row_bytes, hs, cols);
    if ((threadIdx.x & 31) == 0) x[row] = x[row] + a2f(f2a(acc));
}

template <int T>
__device__ __forceinline__ void dec_head_body(const float* __restrict__ x, const float* __restrict__ w_norm,
                                              float eps, int d, const u8* __restrict__ w, long long row_bytes,
                                              int rows, float* __restrict__ logits) {
    extern __shared__ float hs[];
    __shared__ float scratch[32];
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row < rows) prefetch_row(w + row * row_bytes, row_bytes);
    stage_normed(x, w_norm, eps, d, hs, scratch);
    if (row >= rows) return;
    const float acc = row_dot<T>(w + row * row_bytes, hs, d);
    if ((threadIdx.x & 31) == 0) logits[row] = acc;
}

#define DECODE_KERNELS(NAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) dec_qkv_##NAME(                              \
        const float* x, const float* w_norm, float eps, int d, const u8* wq, const u8* wk, const u8* wv,   \
        long long row_bytes, act_t* q_out, act_t* cache_k, act_t* cache_v, const int* pos,                 \
        const float* cos_t, const float* sin_t, int n_heads, int n_kv, int D, int rope_dim, int chunk_len) { \
        dec_qkv_body<T>(x, w_norm, eps, d, wq, wk, wv, row_bytes, q_out, cache_k, cache_v, pos, cos_t,     \
                        sin_t, n_heads, n_kv, D, rope_dim, chunk_len);                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) dec_gateup_##NAME(                           \
        const float* x, const float* w_norm, float eps, int d, const u8* wg, const u8* wu,                 \
        long long row_bytes, int rows, act_t* out) {                                                        \
        dec_gateup_body<T>(x, w_norm, eps, d, wg, wu, row_bytes, rows, out);                                \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) dec_gemv_add_##NAME(                         \
        const act_t* a, const u8* w, long long row_bytes, int rows, int cols, float* x) {                   \
        dec_gemv_add_body<T>(a, w, row_bytes, rows, cols, x);                                               \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) dec_head_##NAME(                             \
        const float* x, const float* w_norm, float eps, int d, const u8* w, long long row_bytes, int rows,  \
        float* logits) {                                                                                    \
        dec_head_body<T>(x, w_norm, eps, d, w, row_bytes, rows, logits);                                    \
    }

DECODE_KERNELS(f32, T_F32)
DECODE_KERNELS(f16, T_F16)
DECODE_KERNELS(bf16, T_BF16)
DECODE_KERNELS(q8_0, T_Q8_0)
DECODE_KERNELS(q4_0, T_Q4_0)
DECODE_KERNELS(q4_1, T_Q4_1)
DECODE_KERNELS(q4_k, T_Q4_K)
DECODE_KERNELS(q6_k, T_Q6_K)
