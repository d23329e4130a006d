// DCA positions and query rotation shared by the fused attention kernels (dca_flash_attn.cu,
// dca_flash_attn_sm90.cu, dca_decode.cu); DESIGN.md §3. Prepended after mma.cuh (uses Elt).

struct Dca {
    int chunk_len, chunk_size;  // chunk_len 0: plain causal attention
    // relation of query position i to key position j: 0 intra, 1 successive, 2 inter
    __device__ __forceinline__ int relation(int i, int j) const {
        return chunk_len > 0 ? min(max(i / chunk_len - j / chunk_len, 0), 2) : 0;
    }
    // the position a query at `pos` is rotated at for relation `rel`
    __device__ __forceinline__ int query_position(int pos, int rel) const {
        if (chunk_len == 0) return pos;
        const int intra = pos % chunk_len;
        return rel == 0 ? intra : rel == 1 ? min(chunk_len + intra, chunk_size) : min(2 * chunk_len - 1, chunk_size);
    }
};

// Rotate-half RoPE of 8 rotary pairs held as two 16-byte chunks: x1 = dims d..d+7, x2 = dims
// d+rope_dim/2 .. +7; cos_row / sin_row point at the tables' entries for dims d..d+7 of the position.
template <bool BF16>
__device__ __forceinline__ void rotate_pairs8(uint4& x1, uint4& x2, const float* cos_row, const float* sin_row) {
    typedef Elt<BF16> E;
    const float4 c0 = *(const float4*)cos_row, c1 = *(const float4*)(cos_row + 4);
    const float4 s0 = *(const float4*)sin_row, s1 = *(const float4*)(sin_row + 4);
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
