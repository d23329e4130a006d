// Per-token elementwise ops: RMSNorm, residual add, SwiGLU, key rotation (RoPE at DCA key
// positions) and the KV-cache row store.
//
// Design. Activations are row-major (n_tokens, features). The residual stream is fp32; everything
// that feeds a matrix product is fp16. One block per token row for the reductions (RMSNorm), one
// thread per element otherwise. Positions are read from device memory (never from the host), so the
// same launch serves every decode step of a captured CUDA graph.
// RoPE is HF rotate-half on the first rope_dim dims: x1 = x[:R/2], x2 = x[R/2:R];
// out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin; cos/sin tables (n_positions, R/2) fp32.

// out (n, d) fp16 = x * rsqrt(mean(x^2) + eps) * w; x fp32 (x_f16 = 0) or fp16 (x_f16 = 1); one block per row
extern "C" __global__ void rmsnorm(const void* __restrict__ x, const float* __restrict__ w,
                                   half_t* __restrict__ out, int d, float eps, int x_f16) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = x_f16 ? h2f(((const half_t*)x)[base + i]) : ((const float*)x)[base + i];
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = x_f16 ? h2f(((const half_t*)x)[base + i]) : ((const float*)x)[base + i];
        out[base + i] = f2h(v * inv * w[i]);
    }
}

// out fp32 = x fp32 + y (fp16 if y_f16 else fp32), n elements
extern "C" __global__ void add_residual(const float* __restrict__ x, const void* __restrict__ y,
                                        float* __restrict__ out, long long n, int y_f16) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = x[i] + (y_f16 ? h2f(((const half_t*)y)[i]) : ((const float*)y)[i]);
}

// out fp16 = silu(gate) * up, silu(g) = g * sigmoid(g) = g * (0.5 + 0.5 tanh(g/2)) (no overflow)
extern "C" __global__ void swiglu(const half_t* __restrict__ gate, const half_t* __restrict__ up,
                                  half_t* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = h2f(gate[i]);
    out[i] = f2h(g * (0.5f + 0.5f * tanhf(0.5f * g)) * h2f(up[i]));
}

// Keys k (n, H, D) fp16 rotated at their key positions: p = positions[t] (mod chunk_len when
// chunk_len > 0, i.e. DCA). One thread per (token, head, rotary pair t < R/2) or pass-through dim.
extern "C" __global__ void rotate_keys(const half_t* __restrict__ k, const int* __restrict__ positions,
                                       const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                       half_t* __restrict__ out, int n, int heads, int head_dim, int rope_dim,
                                       int chunk_len) {
    const int half_r = rope_dim >> 1;
    const int per_head = head_dim - half_r;  // R/2 rotary pairs + (D - R) pass-through dims
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * heads * per_head) return;
    const int j = (int)(idx % per_head);
    const long long row = idx / per_head;  // token * heads + head
    const int t = (int)(row / heads);
    const half_t* src = k + row * head_dim;
    half_t* dst = out + row * head_dim;
    if (j >= half_r) {  // pass-through dim R + (j - R/2)
        const int dim = rope_dim + j - half_r;
        dst[dim] = src[dim];
        return;
    }
    int p = positions[t];
    if (chunk_len > 0) p %= chunk_len;
    const float c = cos_t[(long long)p * half_r + j], s = sin_t[(long long)p * half_r + j];
    const float x1 = h2f(src[j]), x2 = h2f(src[j + half_r]);
    dst[j] = f2h(x1 * c - x2 * s);
    dst[j + half_r] = f2h(x2 * c + x1 * s);
}

// cache_k[positions[t]], cache_v[positions[t]] = k[t], v[t]; rows of row_elems fp16 values
extern "C" __global__ void store_kv(const half_t* __restrict__ k, const half_t* __restrict__ v,
                                    const int* __restrict__ positions, half_t* __restrict__ cache_k,
                                    half_t* __restrict__ cache_v, int n, int row_elems) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * row_elems) return;
    const int t = (int)(idx / row_elems), e = (int)(idx % row_elems);
    const long long dst = (long long)positions[t] * row_elems + e;
    cache_k[dst] = k[idx];
    cache_v[dst] = v[idx];
}
