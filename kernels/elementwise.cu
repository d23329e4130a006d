// Per-token elementwise ops: RMSNorm, residual add, SwiGLU and the KV-cache row store (keys rotated
// with RoPE at their DCA key positions on the way).
//
// Design. Activations are row-major (n_tokens, features). The residual stream is fp32; everything
// that feeds a matrix product is act_t (fp16, or bf16 when built with -DACT_BF16; common.cuh). One
// block per token row for the reductions (RMSNorm), one thread per element otherwise. Positions are
// read from device memory (never from the host), so the same launch serves every decode step of a
// captured CUDA graph.
// RoPE is HF rotate-half on the first rope_dim dims: x1 = x[:R/2], x2 = x[R/2:R];
// out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin; cos/sin tables (n_positions, R/2) fp32.

// out (n, d) act_t = x * rsqrt(mean(x^2) + eps) * w; x fp32 (x_act = 0) or act_t (x_act = 1).
// One warp per row (blockDim.x / 32 rows per block); vec4 = 1 (d % 4 == 0, 16-byte aligned x): 4 values per
// load, and rows of up to 128 * ROW_VECS values are held in registers (every load issued before the sum);
// longer rows are read twice (sum of squares, then scale; the second read hits L1).
#define ROW_VECS 8  // float4 per lane kept in registers: rows of d <= 32 * 4 * ROW_VECS
__device__ __forceinline__ void load4(const void* x, long long i, int x_act, float (&v)[4]) {
    if (x_act) {
        const uint2 u = *(const uint2*)((const act_t*)x + i);
        v[0] = a2f_lo(u.x); v[1] = a2f_hi(u.x);
        v[2] = a2f_lo(u.y); v[3] = a2f_hi(u.y);
    } else {
        const float4 f = *(const float4*)((const float*)x + i);
        v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    }
}

extern "C" __global__ void rmsnorm(const void* __restrict__ x, const float* __restrict__ w,
                                   act_t* __restrict__ out, int n, int d, float eps, int x_act, int vec4) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n) return;
    const long long base = (long long)row * d;
    if (vec4 && d <= 128 * ROW_VECS) {
        float v[ROW_VECS][4];
        float ss = 0.0f;
#pragma unroll
        for (int u = 0; u < ROW_VECS; ++u) {
            const int i = 4 * lane + 128 * u;
            if (i < d) load4(x, base + i, x_act, v[u]);
        }
#pragma unroll
        for (int u = 0; u < ROW_VECS; ++u)
            if (4 * lane + 128 * u < d) ss += v[u][0] * v[u][0] + v[u][1] * v[u][1] + v[u][2] * v[u][2] + v[u][3] * v[u][3];
        const float inv = rsqrtf(warp_sum(ss) / (float)d + eps);
#pragma unroll
        for (int u = 0; u < ROW_VECS; ++u) {
            const int i = 4 * lane + 128 * u;
            if (i >= d) continue;
            const float4 g = *(const float4*)(w + i);
            uint2 o;
            o.x = pack2(v[u][0] * inv * g.x, v[u][1] * inv * g.y);
            o.y = pack2(v[u][2] * inv * g.z, v[u][3] * inv * g.w);
            *(uint2*)(out + base + i) = o;
        }
        return;
    }
    float ss = 0.0f;
    if (vec4) {
        for (int i = 4 * lane; i < d; i += 128) {
            float v[4];
            load4(x, base + i, x_act, v);
            ss += v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3];
        }
    } else {
        for (int i = lane; i < d; i += 32) {
            const float v = x_act ? a2f(((const act_t*)x)[base + i]) : ((const float*)x)[base + i];
            ss += v * v;
        }
    }
    const float inv = rsqrtf(warp_sum(ss) / (float)d + eps);
    if (vec4) {
        for (int i = 4 * lane; i < d; i += 128) {
            float v[4];
            load4(x, base + i, x_act, v);
            const float4 g = *(const float4*)(w + i);
            uint2 o;
            o.x = pack2(v[0] * inv * g.x, v[1] * inv * g.y);
            o.y = pack2(v[2] * inv * g.z, v[3] * inv * g.w);
            *(uint2*)(out + base + i) = o;
        }
    } else {
        for (int i = lane; i < d; i += 32) {
            const float v = x_act ? a2f(((const act_t*)x)[base + i]) : ((const float*)x)[base + i];
            out[base + i] = f2a(v * inv * w[i]);
        }
    }
}

// out fp32 = x fp32 + y (act_t if y_act else fp32), n elements
extern "C" __global__ void add_residual(const float* __restrict__ x, const void* __restrict__ y,
                                        float* __restrict__ out, long long n, int y_act) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = x[i] + (y_act ? a2f(((const act_t*)y)[i]) : ((const float*)y)[i]);
}

// out (n, cols) act_t contiguous = y + b: y rows `stride` elements apart (a column range of a fused product),
// b (cols,) fp32 (a Q/K/V bias); one thread per element
extern "C" __global__ void add_bias(const act_t* __restrict__ y, long long stride, const float* __restrict__ b,
                                    act_t* __restrict__ out, int n, int cols) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * cols) return;
    const long long row = idx / cols, col = idx - row * cols;
    out[idx] = f2a(a2f(y[row * stride + col]) + b[col]);
}

// silu(g) * u with silu(g) = g * sigmoid(g) = g * (0.5 + 0.5 tanh(g/2)) (no overflow)
__device__ __forceinline__ float swiglu_one(float g, float u) {
    return g * (0.5f + 0.5f * tanhf(0.5f * g)) * u;
}

// out (n, f) act_t contiguous = silu(gate) * up; gate and up rows are `stride` elements apart (f for
// separate arrays, 2f for the two halves of one (n, 2f) product). vec8 = 1 (f % 8 == 0, 16-byte
// aligned rows): 8 elements per thread, else 1.
extern "C" __global__ void swiglu(const act_t* __restrict__ gate, const act_t* __restrict__ up,
                                  act_t* __restrict__ out, int n, int f, long long stride, int vec8) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec8) {
        const int per_row = f >> 3;
        if (idx >= (long long)n * per_row) return;
        const long long row = idx / per_row, col = (idx - row * per_row) * 8;
        const uint4 g = *(const uint4*)(gate + row * stride + col), u = *(const uint4*)(up + row * stride + col);
        const unsigned gs[4] = {g.x, g.y, g.z, g.w}, us[4] = {u.x, u.y, u.z, u.w};
        unsigned os[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
            os[k] = pack2(swiglu_one(a2f_lo(gs[k]), a2f_lo(us[k])), swiglu_one(a2f_hi(gs[k]), a2f_hi(us[k])));
        *(uint4*)(out + row * f + col) = make_uint4(os[0], os[1], os[2], os[3]);
        return;
    }
    if (idx >= (long long)n * f) return;
    const long long row = idx / f, col = idx - row * f;
    out[idx] = f2a(swiglu_one(a2f(gate[row * stride + col]), a2f(up[row * stride + col])));
}

// Cache rows positions[t] <- (k[t] rotated at the key position: positions[t] mod chunk_len under DCA,
// rotate-half over the first rope_dim dims; v[t] as it is). k and v rows are k_stride / v_stride elements
// apart (e.g. the K and V columns of a fused QKV product); rows of heads x head_dim. One thread per
// (token, head, item): items are the rope_dim/2 rotary pairs, the head_dim - rope_dim pass-through dims
// of K, then the head_dim dims of V.
extern "C" __global__ void store_kv(const act_t* __restrict__ k, long long k_stride, const act_t* __restrict__ v,
                                    long long v_stride, const int* __restrict__ positions,
                                    const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                    act_t* __restrict__ cache_k, act_t* __restrict__ cache_v, int n, int heads,
                                    int head_dim, int rope_dim, int chunk_len) {
    const int half_r = rope_dim >> 1, k_items = head_dim - half_r, per_head = k_items + head_dim;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * heads * per_head) return;
    const int j = (int)(idx % per_head);
    const long long row = idx / per_head;  // token * heads + head
    const int t = (int)(row / heads), h = (int)(row % heads);
    const long long dst = ((long long)positions[t] * heads + h) * head_dim;
    if (j >= k_items) {
        const int dim = j - k_items;
        cache_v[dst + dim] = v[t * v_stride + (long long)h * head_dim + dim];
        return;
    }
    const act_t* src = k + t * k_stride + (long long)h * head_dim;
    if (j >= half_r) {  // pass-through dim R + (j - R/2)
        const int dim = rope_dim + j - half_r;
        cache_k[dst + dim] = src[dim];
        return;
    }
    const int p = Dca{chunk_len, 0}.key_position(positions[t]);
    const float c = cos_t[(long long)p * half_r + j], s = sin_t[(long long)p * half_r + j];
    const float x1 = a2f(src[j]), x2 = a2f(src[j + half_r]);
    cache_k[dst + j] = f2a(x1 * c - x2 * s);
    cache_k[dst + j + half_r] = f2a(x2 * c + x1 * s);
}

// store_kv with 16-byte accesses: items are groups of 8 rotary pairs, of 8 pass-through K dims, of 8 V
// dims. Needs rope_dim % 16 == 0, head_dim % 8 == 0, strides % 8 == 0 and 16-byte aligned k and v.
extern "C" __global__ void store_kv_vec8(const act_t* __restrict__ k, long long k_stride,
                                         const act_t* __restrict__ v, long long v_stride,
                                         const int* __restrict__ positions, const float* __restrict__ cos_t,
                                         const float* __restrict__ sin_t, act_t* __restrict__ cache_k,
                                         act_t* __restrict__ cache_v, int n, int heads, int head_dim, int rope_dim,
                                         int chunk_len) {
    const int half_r = rope_dim >> 1, pair_groups = half_r >> 3;
    const int k_groups = pair_groups + ((head_dim - rope_dim) >> 3), per_head = k_groups + (head_dim >> 3);
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * heads * per_head) return;
    const int grp = (int)(idx % per_head);
    const long long row = idx / per_head;  // token * heads + head
    const int t = (int)(row / heads), h = (int)(row % heads);
    const long long dst = ((long long)positions[t] * heads + h) * head_dim;
    if (grp >= k_groups) {
        const int dim = (grp - k_groups) * 8;
        *(uint4*)(cache_v + dst + dim) = *(const uint4*)(v + t * v_stride + (long long)h * head_dim + dim);
        return;
    }
    const act_t* src = k + t * k_stride + (long long)h * head_dim;
    if (grp >= pair_groups) {  // pass-through dims
        const int dim = rope_dim + (grp - pair_groups) * 8;
        *(uint4*)(cache_k + dst + dim) = *(const uint4*)(src + dim);
        return;
    }
    const int j0 = grp * 8;
    const int p = Dca{chunk_len, 0}.key_position(positions[t]);
    const float* cr = cos_t + (long long)p * half_r + j0;
    const float* sr = sin_t + (long long)p * half_r + j0;
    const float4 c0 = *(const float4*)cr, c1 = *(const float4*)(cr + 4);
    const float4 s0 = *(const float4*)sr, s1 = *(const float4*)(sr + 4);
    const float cs[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
    const float sn[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
    const uint4 a = *(const uint4*)(src + j0), b = *(const uint4*)(src + j0 + half_r);
    const unsigned av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
    unsigned o1[4], o2[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float x1a = a2f_lo(av[q]), x1b = a2f_hi(av[q]);
        const float x2a = a2f_lo(bv[q]), x2b = a2f_hi(bv[q]);
        const float ca = cs[2 * q], cb = cs[2 * q + 1], sa = sn[2 * q], sb = sn[2 * q + 1];
        o1[q] = pack2(x1a * ca - x2a * sa, x1b * cb - x2b * sb);
        o2[q] = pack2(x2a * ca + x1a * sa, x2b * cb + x1b * sb);
    }
    *(uint4*)(cache_k + dst + j0) = make_uint4(o1[0], o1[1], o1[2], o1[3]);
    *(uint4*)(cache_k + dst + j0 + half_r) = make_uint4(o2[0], o2[1], o2[2], o2[3]);
}

// x (n,) act_t -> its staged int8 input for a GEMV (common.cuh store_q8_block's layout), a warp per block of 32: what
// gemv.cu's gateup and dca_combine write in their epilogues, for the tests and dev/cuda/gemv.py. n % 32 == 0.
extern "C" __global__ void quantize_input(const act_t* x, int n, unsigned char* staged) {
    const int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (32 * b < n) store_q8_block(a2f(x[32 * b + (threadIdx.x & 31)]), b, n, staged);
}

// Self-Extend / StreamingLLM one-token decode (engine/backends/cuda/extension.py decode_attention): the flash
// kernel's two passes take their positions from `plan`, written here from the token's device position slot, so
// a captured CUDA graph replays the step. plan = {positions, rotation positions} of pass 0, then of pass 1.

// Self-Extend (group G, neighbour window W) for the token at pos = pos_slot[0]: pass 0 (group) {pos - W,
// floor(pos/G) + W - floor(W/G)}, pass 1 (neighbour) {m - 1, pos} over the m = min(W, pos + 1) rows written here:
// row t of k_near / v_near (W, heads, head_dim) is cache row r = pos - m + 1 + t, its key rotated on from the
// cached position floor(r/G) to r (cos/sin scaled by inv_mscale: the cached key carries YaRN's factor once).
// One thread per item of store_kv's (rotary pairs, pass-through K dims, V dims) for each of the W rows.
extern "C" __global__ void self_extend_window(const act_t* __restrict__ k, const act_t* __restrict__ v,
                                              const int* __restrict__ pos_slot, const float* __restrict__ cos_t,
                                              const float* __restrict__ sin_t, act_t* __restrict__ k_near,
                                              act_t* __restrict__ v_near, int* __restrict__ plan, int window,
                                              int group, int heads, int head_dim, int rope_dim, float inv_mscale) {
    const int pos = pos_slot[0], m = min(window, pos + 1);
    const int half_r = rope_dim >> 1, k_items = head_dim - half_r, per_head = k_items + head_dim;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx == 0) {
        plan[0] = pos - window;
        plan[1] = pos / group + window - window / group;
        plan[2] = m - 1;
        plan[3] = pos;
    }
    if (idx >= (long long)window * heads * per_head) return;
    const int j = (int)(idx % per_head);
    const long long row = idx / per_head;  // scratch row * heads + head
    const int t = (int)(row / heads), h = (int)(row % heads);
    if (t >= m) return;
    const int r = pos - m + 1 + t;
    const long long src = ((long long)r * heads + h) * head_dim, dst = ((long long)t * heads + h) * head_dim;
    if (j >= k_items) {
        const int dim = j - k_items;
        v_near[dst + dim] = v[src + dim];
        return;
    }
    if (j >= half_r) {  // pass-through dim R + (j - R/2)
        const int dim = rope_dim + j - half_r;
        k_near[dst + dim] = k[src + dim];
        return;
    }
    const long long by = (long long)(r - r / group) * half_r + j;
    const float c = cos_t[by] * inv_mscale, s = sin_t[by] * inv_mscale;
    const float x1 = a2f(k[src + j]), x2 = a2f(k[src + j + half_r]);
    k_near[dst + j] = f2a(x1 * c - x2 * s);
    k_near[dst + j + half_r] = f2a(x2 * c + x1 * s);
}

// StreamingLLM (S sinks, window R) for the token at pos = pos_slot[0]: pass 0 (sinks, keys 0..S-1)
// {min(pos, S - 1), min(pos, S + R - 1)}, pass 1 (the cache from row S on, window R) {pos - S, pos}. One thread.
extern "C" __global__ void streaming_plan(const int* __restrict__ pos_slot, int* __restrict__ plan, int sinks,
                                          int window) {
    if (blockIdx.x | threadIdx.x) return;
    const int pos = pos_slot[0];
    plan[0] = min(pos, sinks - 1);
    plan[1] = min(pos, sinks + window - 1);
    plan[2] = pos - sinks;
    plan[3] = pos;
}
