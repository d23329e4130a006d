// Block decoders shared by quant.cu and gemv.cu (prepended to both by the loader).
// dequant8<TYPE>(row, c, v): the 8 consecutive values c*8 .. c*8+7 of a row stored in ggml type TYPE
// (ggml-common.h block layouts; every 32- or 256-wide block splits into whole 8-value chunks).
// row_dot<TYPE>(row, xs, cols): one warp's dot product of a stored row with fp32 x in shared memory;
// lane l takes chunks l, l+32, ... (adjacent lanes read adjacent bytes); the result is warp-reduced
// (gemv.cu's products over float weights).

#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q6_K 14
#define T_BF16 30

template <int T> __device__ __forceinline__ void dequant8(const u8* row, int c, float* v);

template <> __device__ __forceinline__ void dequant8<T_F32>(const u8* row, int c, float* v) {
    const float4* p = (const float4*)(row) + 2 * c;
    float4 a = p[0], b = p[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <> __device__ __forceinline__ void dequant8<T_F16>(const u8* row, int c, float* v) {
    uint4 q = ((const uint4*)row)[c];
    unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = h2f((half_t)(w[i] & 0xffffu));
        v[2 * i + 1] = h2f((half_t)(w[i] >> 16));
    }
}

template <> __device__ __forceinline__ void dequant8<T_BF16>(const u8* row, int c, float* v) {
    uint4 q = ((const uint4*)row)[c];
    unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Q8_0: 34 bytes = d (fp16), qs[32] int8; value k = d * qs[k]
template <> __device__ __forceinline__ void dequant8<T_Q8_0>(const u8* row, int c, float* v) {
    const u8* blk = row + (c >> 2) * 34;
    const float d = load_h(blk);
    const i8* qs = (const i8*)(blk + 2) + (c & 3) * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = d * (float)qs[i];
}

// Q4_0: 18 bytes = d, qs[16]; value k < 16 = low nibble of qs[k], k >= 16 = high nibble of qs[k-16]; (q-8)*d
template <> __device__ __forceinline__ void dequant8<T_Q4_0>(const u8* row, int c, float* v) {
    const u8* blk = row + (c >> 2) * 18;
    const float d = load_h(blk);
    const int s = c & 3;
    const u8* qs = blk + 2 + (s & 1) * 8;
    const int shift = (s >> 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = d * (float)(((qs[i] >> shift) & 15) - 8);
}

// Q4_1: 20 bytes = d, m, qs[16]; nibbles as Q4_0; q*d + m
template <> __device__ __forceinline__ void dequant8<T_Q4_1>(const u8* row, int c, float* v) {
    const u8* blk = row + (c >> 2) * 20;
    const float d = load_h(blk), m = load_h(blk + 2);
    const int s = c & 3;
    const u8* qs = blk + 4 + (s & 1) * 8;
    const int shift = (s >> 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = d * (float)((qs[i] >> shift) & 15) + m;
}

// Q4_K: 144 bytes = d, dmin, scales[12] (6-bit packed scale/min per 32-value sub-block), qs[128].
// Sub-block sb (0..7): group g = sb/2 uses bytes qs[32g .. 32g+31], low nibbles for even sb, high for odd.
// value = d*sc[sb]*q - dmin*m[sb]  (ggml get_scale_min_k4)
template <> __device__ __forceinline__ void dequant8<T_Q4_K>(const u8* row, int c, float* v) {
    const u8* blk = row + (c >> 5) * 144;
    const int s = c & 31, sb = s >> 2;
    const u8* sc = blk + 4;
    int scale, mn;
    if (sb < 4) {
        scale = sc[sb] & 63;
        mn = sc[sb + 4] & 63;
    } else {
        scale = (sc[sb + 4] & 0xF) | ((sc[sb - 4] >> 6) << 4);
        mn = (sc[sb + 4] >> 4) | ((sc[sb] >> 6) << 4);
    }
    const float d = load_h(blk) * (float)scale, m = load_h(blk + 2) * (float)mn;
    const u8* qs = blk + 16 + (sb >> 1) * 32 + (s & 3) * 8;
    const int shift = (sb & 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = d * (float)((qs[i] >> shift) & 15) - m;
}

// Q6_K: 210 bytes = ql[128], qh[64], scales[16] (int8), d (fp16 at 208). Value e: half h = e/128,
// r = e%128, quarter k = r/32, l = r%32; low 4 bits from ql[64h + l + 32*(k&1)] (>> 4 if k >= 2),
// high 2 bits (qh[32h + l] >> 2k) & 3; (q - 32) * d * scales[e/16]
template <> __device__ __forceinline__ void dequant8<T_Q6_K>(const u8* row, int c, float* v) {
    const u8* blk = row + (c >> 5) * 210;
    const int e0 = 8 * (c & 31), h = e0 >> 7, r = e0 & 127, k = r >> 5, l0 = r & 31;
    const u8* ql = blk + 64 * h + l0 + (k & 1) * 32;
    const u8* qh = blk + 128 + 32 * h + l0;
    const int lo_shift = (k >> 1) * 4, hi_shift = 2 * k;
    const float d = load_h(blk + 208) * (float)((const i8*)(blk + 192))[e0 >> 4];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int q = ((ql[i] >> lo_shift) & 15) | (((qh[i] >> hi_shift) & 3) << 4);
        v[i] = d * (float)(q - 32);
    }
}

template <int T>
__device__ __forceinline__ float row_dot(const u8* __restrict__ wr, const float* xs, int cols) {
    const int lane = threadIdx.x & 31;
    float acc = 0.0f, v[8];
#pragma unroll 4
    for (int c = lane; c < (cols >> 3); c += 32) {
        dequant8<T>(wr, c, v);
        const float4* xp = (const float4*)(xs + 8 * c);
        const float4 a = xp[0], b = xp[1];
        acc += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w + v[4] * b.x + v[5] * b.y + v[6] * b.z +
               v[7] * b.w;
    }
    return warp_sum(acc);
}

// Ask L2 for the first PREFETCH_ROW_BYTES of a stored row (each lane one 128-byte line, strided) so that its HBM
// latency overlaps whatever the warp does before row_dot (the fused kernels' RMSNorm staging). A row's head only: long
// rows asked whole (the 8B down product's 8 KB rows, 33 MB over the chip at once) evicted lines before their use;
// 2 KB (a Q4_K row of 4096 values is 2,304 bytes) gave the shortest 8B decode step of 0, 1, 2, 4 KB and whole rows,
// and shortened the 1B and SmolLM2 steps (dev/cuda/NOTES.md v28). Overridable for measurement (profile_decode --define).
#ifndef PREFETCH_ROW_BYTES
#define PREFETCH_ROW_BYTES 2048
#endif
__device__ __forceinline__ void prefetch_row(const u8* wr, long long row_bytes) {
    const long long asked = row_bytes < PREFETCH_ROW_BYTES ? row_bytes : PREFETCH_ROW_BYTES;
    for (long long off = (threadIdx.x & 31) * 128; off < asked; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(wr + off));
}
