// Quantized weights on the device: dequantize-to-act_t (prefill GEMM scratch: fp16, or bf16 when built
// with -DACT_BF16) and embedding lookup, for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (the GEMVs of
// one token are in gemv.cu).
//
// Design. A weight stays in its GGUF bytes: numpy shape (rows, cols), each row `row_bytes` bytes of
// whole blocks (ggml-common.h layouts). dequant.cuh (prepended) gives dequant8<TYPE>(row, c, v), the
// 8 consecutive values c*8 .. c*8+7 of a row; both kernels walk rows in 8-value chunks:
//   dequant_T one thread per chunk, writes 8 act_t values (16-byte store): (rows, cols) act_t.
//   embed_T   one block per token: out[t, :] = fp32 row ids[t] of the table.
// Requires cols % 8 == 0 (block types: cols % block size == 0, checked on the host).

// out (rows, cols) act_t = dequantized W; one thread per 8-value chunk
template <int T>
__device__ __forceinline__ void dequant_body(const u8* __restrict__ w, act_t* __restrict__ out, int rows,
                                             int cols, long long row_bytes) {
    const long long chunk = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int per_row = cols >> 3;
    if (chunk >= (long long)rows * per_row) return;
    const long long row = chunk / per_row;
    const int c = (int)(chunk - row * per_row);
    float v[8];
    dequant8<T>(w + row * row_bytes, c, v);
    uint4 packed;
    packed.x = pack2(v[0], v[1]);
    packed.y = pack2(v[2], v[3]);
    packed.z = pack2(v[4], v[5]);
    packed.w = pack2(v[6], v[7]);
    ((uint4*)(out + row * cols))[c] = packed;
}

// out (n, cols) fp32 = rows ids[t] of the table; one block per token
template <int T>
__device__ __forceinline__ void embed_body(const u8* __restrict__ w, const int* __restrict__ ids,
                                           float* __restrict__ out, int cols, long long row_bytes) {
    const int t = blockIdx.x;
    const u8* wr = w + (long long)ids[t] * row_bytes;
    float v[8];
    for (int c = threadIdx.x; c < (cols >> 3); c += blockDim.x) {
        dequant8<T>(wr, c, v);
        float* o = out + (long long)t * cols + 8 * c;
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = v[i];
    }
}

// One weight type per build, instantiated by the loader (kernels.per_type): QUANT_KERNELS(q4_k, T_Q4_K).
#define QUANT_KERNELS(NAME, T)                                                                              \
    extern "C" __global__ void dequant_##NAME(const u8* w, act_t* out, int rows, int cols,                 \
                                              long long row_bytes) {                                        \
        dequant_body<T>(w, out, rows, cols, row_bytes);                                                     \
    }                                                                                                       \
    extern "C" __global__ void embed_##NAME(const u8* w, const int* ids, float* out, int cols,             \
                                            long long row_bytes) {                                          \
        embed_body<T>(w, ids, out, cols, row_bytes);                                                        \
    }

