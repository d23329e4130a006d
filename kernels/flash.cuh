// Shared by the fused attention kernels (dca_flash_attn.cu, dca_flash_attn_sm90.cu, dca_decode.cu): the query
// rotation and the prefill epilogue. Prepended after mma.cuh (uses Elt) and dca.cuh.

// Rotate-half RoPE of 8 rotary pairs held as two 16-byte chunks: x1 = dims d..d+7, x2 = dims
// d+rope_dim/2 .. +7; c0, c1 / s0, s1 the tables' entries for dims d..d+7 of the position (or cos_row / sin_row
// pointing at them).
template <bool BF16>
__device__ __forceinline__ void rotate_pairs8(uint4& x1, uint4& x2, float4 c0, float4 c1, float4 s0, float4 s1) {
    typedef Elt<BF16> E;
    const float cs[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
    const float sn[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
    unsigned a[4] = {x1.x, x1.y, x1.z, x1.w}, b[4] = {x2.x, x2.y, x2.z, x2.w};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float a0 = E::lo(a[p]), a1 = E::hi(a[p]), b0 = E::lo(b[p]), b1 = E::hi(b[p]);
        a[p] = E::pack(a0 * cs[2 * p] - b0 * sn[2 * p], a1 * cs[2 * p + 1] - b1 * sn[2 * p + 1]);
        b[p] = E::pack(b0 * cs[2 * p] + a0 * sn[2 * p], b1 * cs[2 * p + 1] + a1 * sn[2 * p + 1]);
    }
    x1 = make_uint4(a[0], a[1], a[2], a[3]);
    x2 = make_uint4(b[0], b[1], b[2], b[3]);
}

template <bool BF16>
__device__ __forceinline__ void rotate_pairs8(uint4& x1, uint4& x2, const float* cos_row, const float* sin_row) {
    rotate_pairs8<BF16>(x1, x2, *(const float4*)cos_row, *(const float4*)(cos_row + 4), *(const float4*)sin_row,
                        *(const float4*)(sin_row + 4));
}

// Prefill epilogue for one packed row R (query R / group, head kvh*group + R % group) held in the mma
// C-fragment layout: lane t of the row's quad holds columns 8*dt + 2t and +1, given by o_at(dt, 0 | 1).
// Every lane of the warp calls it (the quad sums l by shuffles). No partials (part_o null: one split): out = O / l
// in the element type; else the unnormalized partials (O, m, l) of split `split` for dca_combine.
template <int D, bool BF16, typename OAt>
__device__ __forceinline__ void store_row(OAt o_at, float m, float l, int R, int rows_total, int group, int kvh,
                                          int n, int n_heads, int t, int split, int n_splits, u16* __restrict__ out,
                                          float* __restrict__ part_o, float* __restrict__ part_m,
                                          float* __restrict__ part_l) {
    typedef Elt<BF16> E;
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (R >= rows_total) return;
    const long long row = (long long)(R / group) * n_heads + kvh * group + R % group;
    if (part_o == nullptr) {
        const float inv = 1.0f / l;
        unsigned* dst = (unsigned*)(out + row * D);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) dst[dt * 4 + t] = E::pack(o_at(dt, 0) * inv, o_at(dt, 1) * inv);
    } else {
        const long long prow = (long long)split * n * n_heads + row;
        if (t == 0) {
            part_m[prow] = m;
            part_l[prow] = l;
        }
        float2* dst = (float2*)(part_o + prow * D);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) dst[dt * 4 + t] = make_float2(o_at(dt, 0), o_at(dt, 1));
    }
}
