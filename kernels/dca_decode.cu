// Split-K (flash-decoding) DCA attention for decode: the new token(s) of a sequence against the
// chunk-aware KV cache, on tensor cores, plus the reduction kernel that merges the splits (also used
// by dca_flash_attn.cu when a prefill is split over the keys).
//
// Layouts: q (n, Hq, D) UNROTATED fp16|bf16 (n is 1 for plain decode; every token is independent);
// K cache (capacity, Hkv, D) rotated at key positions (j mod chunk_len); V cache (capacity, Hkv, D);
// positions (n,) int32 on the device (so a captured CUDA graph follows the growing context);
// cos/sin (n_positions, rope_dim/2) fp32; partials part_o (S, n*Hq, D) fp32, part_m / part_l
// (S, n*Hq) fp32 in log2 units; out (n, Hq, D) in q's dtype.
//
// Design.
// - Grid (split, kv head, token). The block owns the `group` query heads of one KV head (GQA: each
//   K/V byte is read once for the whole group) as the 16 rows of one mma m-tile (rows >= group are
//   zero and never stored), so the scores and P V run on mma.sync m16n8k16 with fp32 accumulation.
// - The three query rotations (intra, successive, inter positions of the token) are made once per
//   block in shared memory; each key tile takes the rotation of its relation (clamp(chunk(i) -
//   chunk(j), 0, 2)); a tile straddling a chunk boundary is scored per relation present and each
//   element keeps its own; the last tile masks keys after the token.
// - The block's slice of the keys is dealt to its 4 warps tile by tile; each warp streams its tiles through
//   its own cp.async stages (flash_attention.decode_config: two in production; warp-local sync only), keeps an
//   online softmax, and the warps merge through shared memory at the end. The slice bounds come from the
//   device positions: keys past the token are never read.
// - q8_0 caches (KQ / VQ, each on its own: dca_decode_q8_<D>_<KQ><VQ>; kv_q8.cuh's int8 values + fp16 scales):
//   a warp's stages hold the raw rows (D + D/16 bytes a key, half a 16-bit row's bytes, cp.async as well, placed by
//   q8_chunk), and the lanes read their mma fragments straight from them (no dequantized tile, so the shared memory
//   a 16-bit tile took holds more stages in flight). K: each fragment's bytes as exact integers in fp16 (one permute
//   and one subtraction a pair), the products summed per 32-value block in their own accumulators, the key's block
//   scales applied to those sums (scores = sum_b d_b (q . k_b)); the queries' rows in fp16 too, in a bf16 build each
//   row scaled by a power of two that keeps it below 2^15 (exact: bf16's 8 significant bits fit fp16's 11), undone
//   on the row's scores. V: P and V in fp16 whatever the activations (p in [0, 1]; q * d rounded once to
//   fp16, as kv_q8.cuh's dequantization does); lane g reads the DT contiguous bytes of dims g*DT .. of four key rows
//   and so owns column g of every n-tile: n-tile dt's column n is physical dim n*DT + dt, undone where the warps
//   merge.
// - dca_combine: out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M), one block of 8 warps per row; with
//   out_staged (one-token decode), also out quantized for the output projection (common.cuh store_q8_block).
// Limits: D in {64, 128}; rope_dim % 32 == 0 and <= D; group = Hq / Hkv <= 16.

// cp.async of 4, 8 or 16 bytes (a q8_0 key's scales: D/16 bytes); src_bytes 0 zero-fills
template <int BYTES>
__device__ __forceinline__ void cp_async_small(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(BYTES), "r"(src_bytes)
                 : "memory");
}

// byte offset of 16-byte chunk c of key row `row` among a q8_0 stage's [BN][D] int8 values, placed so that the
// fragment reads meet no bank conflicts: D 128, a row a 128-byte line, its chunks XOR the row (k_int_fragment's 8 keys
// of one chunk; the V reads' 4 rows of one chunk a quarter warp); D 64, two rows a line, each half-line's chunks XOR
// 0, 3, 5, 6 by the row pair
template <int D>
__device__ __forceinline__ int q8_chunk(int row, int c) {
    static_assert(D == 64 || D == 128, "q8_0 stages: head_dim 64 or 128");
    if constexpr (D == 128) return row * 128 + ((c ^ (row & 7)) << 4);
    const int h = (0x6530 >> (4 * ((row >> 1) & 3))) & 7;
    return (row >> 1) * 128 + (((((row & 1) << 2) + c) ^ h) << 4);
}

// A warp's copy of keys k0 .. k0+BN-1 (those < n_keys; zeros after) of KV head kvh into its stage `dst`:
// 16-bit rows into the swizzled [BN][D] tile; q8_0 rows (Q8) as [BN][D] int8 values (q8_chunk) then [BN][D/32] fp16
// scales.
template <int D, int BN, bool Q8>
__device__ __forceinline__ void load_rows(unsigned char* dst, const void* __restrict__ rows,
                                          const half_t* __restrict__ scales, int k0, int n_keys, int n_kv, int kvh,
                                          int lane) {
    if constexpr (Q8) {
        constexpr int CH = D / 16;  // 16-byte chunks of a key's values
#pragma unroll
        for (int idx = lane; idx < BN * CH; idx += 32) {
            const int j = idx / CH, c = idx - j * CH, key = k0 + j;
            const bool ok = key < n_keys;
            const long long off = ((long long)(ok ? key : 0) * n_kv + kvh) * D + c * 16;
            cp_async16(smem_addr(dst + q8_chunk<D>(j, c)), (const i8*)rows + off, ok ? 16 : 0);
        }
        for (int j = lane; j < BN; j += 32) {
            const int key = k0 + j;
            const bool ok = key < n_keys;
            const long long off = ((long long)(ok ? key : 0) * n_kv + kvh) * (D / Q8_BLOCK);
            cp_async_small<D / 16>(smem_addr(dst + BN * D + j * (D / 16)), scales + off, ok ? D / 16 : 0);
        }
    } else {
        constexpr int CH = D / 8;  // 16-byte chunks of a key's values
#pragma unroll
        for (int idx = lane; idx < BN * CH; idx += 32) {
            const int j = idx / CH, c = idx - j * CH, key = k0 + j;
            const bool ok = key < n_keys;
            const long long off = ((long long)(ok ? key : 0) * n_kv + kvh) * D + c * 8;
            cp_async16(smem_addr(dst + swz<D>(j, c)), (const u16*)rows + off, ok ? 16 : 0);
        }
    }
}

// The B fragment of k-step ks for key `key` of a q8_0 K stage (dims 16 ks + 2t, +1 in b0; + 8, + 9 in b1) as exact
// integers in fp16: two 4-byte reads of the key's chunk ks, the lane's bytes picked by one permute
template <int D>
__device__ __forceinline__ void k_int_fragment(const unsigned char* raw, int key, int ks, int t, unsigned& b0,
                                               unsigned& b1) {
    const unsigned char* chunk = raw + q8_chunk<D>(key, ks) + ((t >> 1) << 2);
    const unsigned w = __byte_perm(*(const unsigned*)chunk, *(const unsigned*)(chunk + 8), (t & 1) ? 0x7632u : 0x5410u)
                       ^ 0x80808080u;
    b0 = q8_pair_to_int_f16x2(w, 0x4140u);
    b1 = q8_pair_to_int_f16x2(w, 0x4342u);
}

// 8 bf16 values (16 bytes) times a power of two -> 8 fp16 values: exact while they stay in fp16's normal range
__device__ __forceinline__ uint4 bf16x8_to_f16x8(uint4 x, float scale) {
    const unsigned w[4] = {x.x, x.y, x.z, x.w};
    unsigned out[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) out[p] = Elt<false>::pack(Elt<true>::lo(w[p]) * scale, Elt<true>::hi(w[p]) * scale);
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// The lane's DT bytes (dims g*DT ..) of key row `row` of a q8_0 V stage, as DT / 4 words ^ 0x80 each byte
template <int D>
__device__ __forceinline__ void v_row_words(const unsigned char* raw, int row, int g, unsigned (&w)[D / 32]) {
    if constexpr (D == 128) {
        const uint4 x = *(const uint4*)(raw + q8_chunk<D>(row, g));
        w[0] = x.x ^ 0x80808080u, w[1] = x.y ^ 0x80808080u, w[2] = x.z ^ 0x80808080u, w[3] = x.w ^ 0x80808080u;
    } else {
        const uint2 x = *(const uint2*)(raw + q8_chunk<D>(row, g >> 1) + ((g & 1) << 3));
        w[0] = x.x ^ 0x80808080u, w[1] = x.y ^ 0x80808080u;
    }
}

// An fp16 pair of the block-blk scales of keys `row` and `row` + 1 (the low half the first) of a q8_0 stage whose
// scales start at byte scales_at
template <int D>
__device__ __forceinline__ unsigned v_scale_pair(const unsigned char* raw, int scales_at, int row, int blk) {
    const half_t* sc = (const half_t*)(raw + scales_at);
    return (unsigned)sc[row * (D / Q8_BLOCK) + blk] | ((unsigned)sc[(row + 1) * (D / Q8_BLOCK) + blk] << 16);
}

template <int D, int BN, int STAGES, bool BF16, bool KQ, bool VQ>
__device__ __forceinline__ void decode_body(const u16* __restrict__ q, const void* __restrict__ kc,
                                            const half_t* __restrict__ kd, const void* __restrict__ vc,
                                            const half_t* __restrict__ vd, const int* __restrict__ positions,
                                            const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                            float* __restrict__ part_o, float* __restrict__ part_m,
                                            float* __restrict__ part_l, int n, int n_heads, int n_kv, int rope_dim,
                                            int chunk_len, int chunk_size, float scale_log2, int temp_len,
                                            int n_splits) {
    typedef Elt<BF16> E;
    typedef Elt<BF16 && !KQ> EK;  // Q K: fp16 for a q8_0 K cache
    typedef Elt<BF16 && !VQ> EV;  // P V: fp16 for a q8_0 V cache
    constexpr bool SCALED_Q = BF16 && KQ;  // the bf16 queries as fp16 rows scaled by powers of two
    constexpr int WARPS = 4, THREADS = 32 * WARPS, CH = D / 8, NT = BN / 8, KS = D / 16, DT = D / 8;
    constexpr int NB = D / Q8_BLOCK;  // a q8_0 key's scale blocks
    // a warp's shared memory: STAGES stages of [K rows][V rows] (16-bit tiles, or q8_0 rows), which then hold its
    // fp32 output rows for the merge (W_STRIDE floats a row; flash_attention.decode_smem)
    constexpr int TILE = BN * D * 2, RAW = BN * D + BN * NB * 2;
    constexpr int K_STAGE = KQ ? RAW : TILE, V_STAGE = VQ ? RAW : TILE;
    constexpr int Q_BYTES = 3 * 16 * D * 2, STAGE_BYTES = K_STAGE + V_STAGE;
    // the merge's rows: with a q8_0 V a lane stores its 2 * DT contiguous dims as float4s XOR-placed, rows padded so
    // that a quarter warp's stores meet no bank conflicts
    constexpr int SEG = 2 * DT, W_STRIDE = VQ ? D + (D == 128 ? 16 : 8) : D;
    constexpr int WARP_BYTES = STAGES * STAGE_BYTES > 16 * W_STRIDE * 4 ? STAGES * STAGE_BYTES : 16 * W_STRIDE * 4;
    auto w_o_at = [&](int r, int d) -> int {  // float index of physical dim d of row r in a warp's merge rows
        if constexpr (!VQ) return r * D + d;
        const int seg = d / SEG, x = d - seg * SEG;
        return r * W_STRIDE + seg * SEG + (((x >> 2) ^ (D == 128 ? seg : seg >> 1)) << 2) + (x & 3);
    };
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* qr = smem;  // [3][16][D] the group's rows rotated for each relation
    pdl_wait();  // positions, q and the token's cache rows come from the kernels before this one

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int split = blockIdx.x, kvh = blockIdx.y, qi = blockIdx.z;
    const int group = n_heads / n_kv;
    const int pos = positions[qi], n_keys = pos + 1;
    const int n_tiles = (n_keys + BN - 1) / BN;
    const int per_split = (n_tiles + n_splits - 1) / n_splits;
    const int tile_begin = split * per_split, tile_end = min(n_tiles, tile_begin + per_split);
    const Dca dca{chunk_len, chunk_size};
    const int my_chunk = dca.chunk(pos);
    float row_scale = scale_log2;
    if (temp_len > 0 && pos + 1 > temp_len) row_scale *= 0.1f * logf((float)(pos + 1) / (float)temp_len) + 1.0f;
    __shared__ float q_unscale[16];  // SCALED_Q: 2^k of row r, whose fp16 queries are its values times 2^-k

    unsigned char* my_stages = smem + Q_BYTES + warp * WARP_BYTES;  // [STAGES][K, V rows]
    auto load_kv = [&](int tile, int stage) {
        const int k0 = tile * BN;
        unsigned char* ks = my_stages + stage * STAGE_BYTES;
        if constexpr (KQ || VQ) {
            load_rows<D, BN, KQ>(ks, kc, kd, k0, n_keys, n_kv, kvh, lane);
            load_rows<D, BN, VQ>(ks + K_STAGE, vc, vd, k0, n_keys, n_kv, kvh, lane);
        } else {  // both 16-bit: their copies interleaved
            unsigned char* vs = ks + K_STAGE;
#pragma unroll
            for (int idx = lane; idx < BN * CH; idx += 32) {
                const int j = idx / CH, c = idx - j * CH, key = k0 + j;
                const bool ok = key < n_keys;
                const long long off = ((long long)(ok ? key : 0) * n_kv + kvh) * D + c * 8;
                cp_async16(smem_addr(ks + swz<D>(j, c)), (const u16*)kc + off, ok ? 16 : 0);
                cp_async16(smem_addr(vs + swz<D>(j, c)), (const u16*)vc + off, ok ? 16 : 0);
            }
        }
    };

    const int first = tile_begin + warp;  // this warp's tiles: first, first + WARPS, ...
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {  // the first STAGES - 1 in flight while the queries are rotated
        if (first + s * WARPS < tile_end) load_kv(first + s * WARPS, s);
        cp_async_commit();
    }

    if constexpr (SCALED_Q) {  // k = 0 unless the row's largest |value| reaches 2^14 (rotated: at most sqrt 2 more)
        for (int r = warp; r < 16; r += WARPS) {
            float mx = 0.0f;
            const u16* row = q + ((long long)qi * n_heads + kvh * group + r) * D;
            if (r < group)
                for (int d = lane; d < D; d += 32) mx = fmaxf(mx, fabsf(a2f(row[d])));
            mx = warp_max(mx);
            if (lane == 0) q_unscale[r] = mx >= 16384.0f ? ldexpf(1.0f, min(ilogbf(mx) - 13, 127)) : 1.0f;
        }
        __syncthreads();
    }

    // the three rotations of the group's rows (zero rows beyond the group): a task is one row's rotary chunk pair
    // (or one chunk past rope_dim), its query chunks and the three positions' table entries all loaded before any
    // store, so that the rotations cost one round trip after the position
    {
        const int half = rope_dim >> 1, half_ch = half >> 3, rot_ch = rope_dim >> 3;
        const int per_row = half_ch + CH - rot_ch;  // the row's pairs (chunk c with c + half_ch), then its plain chunks
        for (int idx = threadIdx.x; idx < 16 * per_row; idx += THREADS) {
            const int r = idx / per_row, k = idx - r * per_row;
            const bool pair = k < half_ch;
            const int c = pair ? k : rot_ch + k - half_ch;
            const float unscale = SCALED_Q ? 1.0f / q_unscale[r] : 1.0f;
            auto as_query = [&](uint4 x) {  // the query tiles' element type: fp16 rows scaled by 2^-k (SCALED_Q)
                if constexpr (SCALED_Q) return bf16x8_to_f16x8(x, unscale);
                else return x;
            };
            uint4 x1 = make_uint4(0u, 0u, 0u, 0u), x2 = x1;
            if (r < group) {
                const u16* src = q + ((long long)qi * n_heads + kvh * group + r) * D;
                x1 = *(const uint4*)(src + c * 8);
                if (pair) x2 = *(const uint4*)(src + (c + half_ch) * 8);
            }
            if (pair && r < group) {
                float4 tab[3][4];  // cos dims c*8 .. +3, +4 .. +7, then sin, at each relation's query position
#pragma unroll
                for (int rel = 0; rel < 3; ++rel) {
                    const long long at = (long long)dca.query_position(pos, rel) * half + c * 8;
                    tab[rel][0] = *(const float4*)(cos_t + at), tab[rel][1] = *(const float4*)(cos_t + at + 4);
                    tab[rel][2] = *(const float4*)(sin_t + at), tab[rel][3] = *(const float4*)(sin_t + at + 4);
                }
#pragma unroll
                for (int rel = 0; rel < 3; ++rel) {
                    uint4 y1 = x1, y2 = x2;
                    rotate_pairs8<BF16>(y1, y2, tab[rel][0], tab[rel][1], tab[rel][2], tab[rel][3]);
                    unsigned char* tile = qr + rel * 16 * D * 2;
                    *(uint4*)(tile + swz<D>(r, c)) = as_query(y1);
                    *(uint4*)(tile + swz<D>(r, c + half_ch)) = as_query(y2);
                }
            } else {
#pragma unroll
                for (int rel = 0; rel < 3; ++rel) {
                    unsigned char* tile = qr + rel * 16 * D * 2;
                    *(uint4*)(tile + swz<D>(r, c)) = as_query(x1);
                    if (pair) *(uint4*)(tile + swz<D>(r, c + half_ch)) = as_query(x2);
                }
            }
        }
    }
    __syncthreads();

    const unsigned xor_hi = (unsigned)((((lane >> 4) & 1) ^ (lane & 7)) << 4);
    const unsigned xor_mid = (unsigned)((((lane >> 3) & 1) ^ (lane & 7)) << 4);
    const unsigned a_row = (unsigned)(((lane & 7) + ((lane >> 3) & 1) * 8) * D * 2);
    const unsigned b_row = (unsigned)(((lane & 7) + (lane >> 4) * 8) * D * 2);
    const unsigned q_base = smem_addr(qr);

    float o[DT][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;

    for (int tile = first, i = 0; tile < tile_end; tile += WARPS, ++i) {
        const int stage = i % STAGES, ahead = tile + (STAGES - 1) * WARPS;
        if (ahead < tile_end) load_kv(ahead, (i + STAGES - 1) % STAGES);  // the stage consumed last iteration
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncwarp();

        const int k0 = tile * BN;
        const unsigned char* k_stage = my_stages + stage * STAGE_BYTES;
        const unsigned char* v_stage = k_stage + K_STAGE;
        const unsigned k_base = smem_addr(k_stage), v_base = smem_addr(v_stage);
        float k_scale[NT][2][NB];  // q8_0 K: the block scales of the lane's score keys nt*8 + 2t, + 1
        if constexpr (KQ) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e)
#pragma unroll
                    for (int b = 0; b < NB; ++b)
                        k_scale[nt][e][b] = h2f(((const half_t*)(k_stage + BN * D))[(nt * 8 + 2 * t + e) * NB + b]);
        }
        const int rel_hi = dca.relation_in(my_chunk, k0), rel_lo = dca.relation_in(my_chunk, k0 + BN - 1);
        float s[NT][4];
        for (int rel = rel_hi; rel >= rel_lo; --rel) {
            const unsigned a_base = q_base + rel * 16 * D * 2 + a_row;
            float sr[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) sr[nt][0] = sr[nt][1] = sr[nt][2] = sr[nt][3] = 0.0f;
            if constexpr (KQ) {  // integer keys, a block's products apart, then the keys' scales
                float acc[NB][NT][4];
#pragma unroll
                for (int b = 0; b < NB; ++b)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) acc[b][nt][0] = acc[b][nt][1] = acc[b][nt][2] = acc[b][nt][3] = 0.0f;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    unsigned a[4];
                    ldsm_x4(a, a_base + ((unsigned)(ks * 32) ^ xor_hi));
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        unsigned b0, b1;
                        k_int_fragment<D>(k_stage, nt * 8 + g, ks, t, b0, b1);
                        EK::mma(acc[ks / 2][nt], a, b0, b1);
                    }
                }
#pragma unroll
                for (int b = 0; b < NB; ++b)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) sr[nt][e] = fmaf(k_scale[nt][e & 1][b], acc[b][nt][e], sr[nt][e]);
            } else {
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    unsigned a[4];
                    ldsm_x4(a, a_base + ((unsigned)(ks * 32) ^ xor_hi));
#pragma unroll
                    for (int np = 0; np < NT / 2; ++np) {
                        unsigned b[4];
                        ldsm_x4(b, k_base + b_row + np * 16 * D * 2 + ((unsigned)(ks * 32) ^ xor_mid));
                        E::mma(sr[2 * np], a, b[0], b[1]);
                        E::mma(sr[2 * np + 1], a, b[2], b[3]);
                    }
                }
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + nt * 8 + 2 * t + (e & 1);
                    const bool own = rel == rel_hi || dca.relation_in(my_chunk, key) == rel;
                    if (own) s[nt][e] = sr[nt][e];
                }
        }
        if (k0 + BN - 1 > pos) {  // the last tile: keys after the token
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (k0 + nt * 8 + 2 * t + (e & 1) > pos) s[nt][e] = NEG_INF;
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            // the row's softmax scale (times 2^k of a scaled query row)
            const float rs = SCALED_Q ? row_scale * q_unscale[g + 8 * hf] : row_scale;
            float mx = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hf], s[nt][2 * hf + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[hf], mx * rs);  // finite: key k0 <= pos is in every tile
            const float corr = fast_exp2(m[hf] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float p0 = fast_exp2(fmaf(s[nt][2 * hf], rs, -m_new));
                const float p1 = fast_exp2(fmaf(s[nt][2 * hf + 1], rs, -m_new));
                s[nt][2 * hf] = p0;
                s[nt][2 * hf + 1] = p1;
                sum += p0 + p1;
            }
            l[hf] = l[hf] * corr + sum;
            m[hf] = m_new;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][2 * hf] *= corr;
                o[dt][2 * hf + 1] *= corr;
            }
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const unsigned p[4] = {EV::pack(s[2 * kk][0], s[2 * kk][1]), EV::pack(s[2 * kk][2], s[2 * kk][3]),
                                   EV::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   EV::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            if constexpr (VQ) {  // keys 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1) of the step; column g = dim g*DT + dt
                const int r0 = kk * 16 + 2 * t, blk = g * DT / Q8_BLOCK;
                unsigned w0[D / 32], w1[D / 32], w8[D / 32], w9[D / 32];
                v_row_words<D>(v_stage, r0, g, w0);
                v_row_words<D>(v_stage, r0 + 1, g, w1);
                v_row_words<D>(v_stage, r0 + 8, g, w8);
                v_row_words<D>(v_stage, r0 + 9, g, w9);
                const unsigned d01 = v_scale_pair<D>(v_stage, BN * D, r0, blk);
                const unsigned d89 = v_scale_pair<D>(v_stage, BN * D, r0 + 8, blk);
#pragma unroll
                for (int w = 0; w < D / 32; ++w) {
                    const unsigned lo01 = __byte_perm(w0[w], w1[w], 0x5140u), hi01 = __byte_perm(w0[w], w1[w], 0x7362u);
                    const unsigned lo89 = __byte_perm(w8[w], w9[w], 0x5140u), hi89 = __byte_perm(w8[w], w9[w], 0x7362u);
                    EV::mma(o[4 * w], p, q8_pair_to_f16x2(lo01, 0x4140u, d01), q8_pair_to_f16x2(lo89, 0x4140u, d89));
                    EV::mma(o[4 * w + 1], p, q8_pair_to_f16x2(lo01, 0x4342u, d01), q8_pair_to_f16x2(lo89, 0x4342u, d89));
                    EV::mma(o[4 * w + 2], p, q8_pair_to_f16x2(hi01, 0x4140u, d01), q8_pair_to_f16x2(hi89, 0x4140u, d89));
                    EV::mma(o[4 * w + 3], p, q8_pair_to_f16x2(hi01, 0x4342u, d01), q8_pair_to_f16x2(hi89, 0x4342u, d89));
                }
            } else {
#pragma unroll
                for (int dp = 0; dp < DT / 2; ++dp) {
                    unsigned b[4];
                    ldsm_x4_trans(b, v_base + a_row + kk * 16 * D * 2 + ((unsigned)(dp * 32) ^ xor_hi));
                    EV::mma(o[2 * dp], p, b[0], b[1]);
                    EV::mma(o[2 * dp + 1], p, b[2], b[3]);
                }
            }
        }
        __syncwarp();  // the stage is consumed before it is refilled
    }
    cp_async_wait<0>();

    // merge the warps: each parks (m, l, o) of its 16 rows in its own stage memory
    float* w_o = (float*)my_stages;  // [16][W_STRIDE], dims placed by w_o_at
    __shared__ float w_m[WARPS][16], w_l[WARPS][16];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float sum = l[hf];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int r = g + 8 * hf;
        if (t == 0) {
            w_m[warp][r] = m[hf];
            w_l[warp][r] = sum;
        }
        if constexpr (VQ) {  // o[dt][2hf + c] is physical dim (2t + c)*DT + dt: the lane's dims 2t*DT .. + 2*DT - 1
#pragma unroll
            for (int i = 0; i < SEG / 4; ++i) {
                float v[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) v[j] = o[(4 * i + j) % DT][2 * hf + (4 * i + j) / DT];
                *(float4*)(w_o + w_o_at(r, 2 * t * DT + 4 * i)) = make_float4(v[0], v[1], v[2], v[3]);
            }
        } else {
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *(float2*)(w_o + r * D + dt * 8 + 2 * t) = make_float2(o[dt][2 * hf], o[dt][2 * hf + 1]);
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group * D; idx += THREADS) {
        const int r = idx / D, d = idx - r * D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) M = fmaxf(M, w_m[w][r]);
        const float M_use = M == NEG_INF ? 0.0f : M;  // an empty slice: every warp saw no key
        float L = 0.0f, O = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float wt = fast_exp2(w_m[w][r] - M_use);
            L += w_l[w][r] * wt;
            O += ((const float*)(smem + Q_BYTES + w * WARP_BYTES))[w_o_at(r, d)] * wt;
        }
        const long long prow = ((long long)split * n + qi) * n_heads + kvh * group + r;
        part_o[prow * D + d] = O;
        if (d == 0) {
            part_m[prow] = M;
            part_l[prow] = L;
        }
    }
}

// One configuration per build (D, BN keys per warp tile, S stages), instantiated by the loader: dca_decode_<D> in
// the build's activation dtype.
#define DCA_DECODE(D, BN, S)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) dca_decode_##D(                                         \
        const u16* q, const u16* kc, const u16* vc, const int* positions, const float* cos_t,                 \
        const float* sin_t, float* part_o, float* part_m, float* part_l, int n, int n_heads, int n_kv,        \
        int rope_dim, int chunk_len, int chunk_size, float scale_log2, int temp_len, int n_splits) {          \
        decode_body<D, BN, S, ACT_IS_BF16, false, false>(q, kc, nullptr, vc, nullptr, positions, cos_t, sin_t,  \
                                                         part_o, part_m, part_l, n, n_heads, n_kv, rope_dim,     \
                                                         chunk_len, chunk_size, scale_log2, temp_len, n_splits); \
    }

// The build reading a q8_0 K cache (KQ 1) and/or V cache (VQ 1): dca_decode_q8_<D>_<KQ><VQ>; a q8_0 operand is its
// int8 values and fp16 scales (kd / vd), a 16-bit one its rows (its scales pointer unused).
#define DCA_DECODE_Q8(D, BN, S, KQ, VQ)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) dca_decode_q8_##D##_##KQ##VQ(                           \
        const u16* q, const void* kc, const half_t* kd, const void* vc, const half_t* vd, const int* positions, \
        const float* cos_t, const float* sin_t, float* part_o, float* part_m, float* part_l, int n, int n_heads, \
        int n_kv, int rope_dim, int chunk_len, int chunk_size, float scale_log2, int temp_len, int n_splits) {  \
        decode_body<D, BN, S, ACT_IS_BF16, KQ, VQ>(q, kc, kd, vc, vd, positions, cos_t, sin_t, part_o, part_m,  \
                                                part_l, n, n_heads, n_kv, rope_dim, chunk_len, chunk_size,      \
                                                scale_log2, temp_len, n_splits);                               \
    }

// Any configuration (D, BN keys per warp tile, STAGES per warp, KQ / VQ q8_0 operands), as the q8_0 builds take their
// arguments: dca_decode_cfg_<D>_<BN>_<S>_<KQ><VQ>. Built by dev/cuda/attention.py's decode variants, never by production.
#define DCA_DECODE_CFG(D, BN, S, KQ, VQ)                                                                      \
    extern "C" __global__ void __launch_bounds__(128) dca_decode_cfg_##D##_##BN##_##S##_##KQ##VQ(             \
        const u16* q, const void* kc, const half_t* kd, const void* vc, const half_t* vd, const int* positions, \
        const float* cos_t, const float* sin_t, float* part_o, float* part_m, float* part_l, int n, int n_heads, \
        int n_kv, int rope_dim, int chunk_len, int chunk_size, float scale_log2, int temp_len, int n_splits) {  \
        decode_body<D, BN, S, ACT_IS_BF16, KQ, VQ>(q, kc, kd, vc, vd, positions, cos_t, sin_t, part_o, part_m,  \
                                                   part_l, n, n_heads, n_kv, rope_dim, chunk_len, chunk_size,   \
                                                   scale_log2, temp_len, n_splits);                            \
    }

// out (rows, D) = merged splits; one block of 8 warps per row: the warps share out the splits (lanes over dims), each
// loading PER_WARP splits' (m, l, o) at once before it merges them (one round trip to L2 for up to 64 splits, not a
// pass for the maximum and another for the sums), then add up through shared memory. D <= 128, a multiple of 32.
template <bool BF16>
__device__ __forceinline__ void combine_body(const float* __restrict__ part_o, const float* __restrict__ part_m,
                                             const float* __restrict__ part_l, u16* __restrict__ out,
                                             unsigned char* __restrict__ out_staged, int rows, int D, int n_splits) {
    constexpr int WARPS = 8, MAX_DPL = 4, PER_WARP = 8;
    __shared__ float w_o[WARPS][32 * MAX_DPL], w_m[WARPS], w_l[WARPS];
    const int row = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    pdl_wait();  // the partials come from the attention kernel before this one
    float M = NEG_INF, L = 0.0f, O[MAX_DPL] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int base = 0; base < n_splits; base += WARPS * PER_WARP) {
        float m_s[PER_WARP], l_s[PER_WARP], o_s[PER_WARP][MAX_DPL];
#pragma unroll
        for (int i = 0; i < PER_WARP; ++i) {  // this warp's splits base + warp + WARPS * i, loaded together
            const int s = base + warp + WARPS * i;
            const long long r = (long long)(s < n_splits ? s : 0) * rows + row;
            m_s[i] = s < n_splits ? part_m[r] : NEG_INF;
            l_s[i] = s < n_splits ? part_l[r] : 0.0f;
#pragma unroll
            for (int k = 0; k < MAX_DPL; ++k)
                o_s[i][k] = s < n_splits && lane + 32 * k < D ? part_o[r * D + lane + 32 * k] : 0.0f;
        }
        float m_new = M;
#pragma unroll
        for (int i = 0; i < PER_WARP; ++i) m_new = fmaxf(m_new, m_s[i]);
        if (m_new == NEG_INF) continue;  // no split of this warp yet
        const float corr = fast_exp2(M - m_new);  // 0 while M is -inf
        L *= corr;
#pragma unroll
        for (int k = 0; k < MAX_DPL; ++k) O[k] *= corr;
#pragma unroll
        for (int i = 0; i < PER_WARP; ++i) {
            const float w = fast_exp2(m_s[i] - m_new);  // 0 for a split past the last
            L += l_s[i] * w;
#pragma unroll
            for (int k = 0; k < MAX_DPL; ++k) O[k] += o_s[i][k] * w;
        }
        M = m_new;
    }
#pragma unroll
    for (int k = 0; k < MAX_DPL; ++k) w_o[warp][lane + 32 * k] = O[k];
    if (lane == 0) {
        w_m[warp] = M;
        w_l[warp] = L;
    }
    __syncthreads();
    float M_all = NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) M_all = fmaxf(M_all, w_m[w]);  // finite: the first split always holds key 0
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum_o = 0.0f, sum_l = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float wt = fast_exp2(w_m[w] - M_all);  // 0 for a warp without splits
            sum_o += w_o[w][d] * wt;
            sum_l += w_l[w] * wt;
        }
        const unsigned bits = Elt<BF16>::pack(sum_o / sum_l, 0.0f);
        out[(long long)row * D + d] = (u16)(bits & 0xffffu);
        // the output projection's input, quantized (whole warps: D % 32 == 0): block (row * D + d) / 32
        if (out_staged != nullptr) store_q8_block(Elt<BF16>::lo(bits), (int)(((long long)row * D + d) >> 5), rows * D,
                                                  out_staged);
    }
}

extern "C" __global__ void dca_combine(const float* part_o, const float* part_m, const float* part_l, u16* out,
                                       unsigned char* out_staged, int rows, int D, int n_splits) {
    combine_body<ACT_IS_BF16>(part_o, part_m, part_l, out, out_staged, rows, D, n_splits);
}
