// Fused DCA (and plain causal) flash-attention prefill on tensor cores: one kernel, online softmax,
// the query rotation chosen per key tile, no three-pass merge (design.md §3 and §5; engine/dca.py
// blockwise_attention is the algorithm this kernel follows).
//
// Layouts: q (n, Hq, D) UNROTATED fp16|bf16, its rows q_stride elements apart (a query's heads contiguous:
// Hq*D, or the row of a fused QKV product); K cache (capacity, Hkv, D) rotated at key positions
// (j mod chunk_len); V cache (capacity, Hkv, D); positions (n,) int32, increasing; cos/sin
// (n_positions, rope_dim/2) fp32; out (n, Hq, D) in q's dtype, or with n_splits > 1 unnormalized
// partials part_o (S, n*Hq, D) fp32 and part_m / part_l (S, n*Hq) fp32 in log2 units, merged by
// dca_decode.cu's dca_combine.
//
// Design.
// - GQA without copies: a block serves one KV head; its rows are (query, head of the group) packed
//   as R = qi*group + g, so every K/V tile loaded to shared memory serves the whole group.
// - 4 warps x 16*MT rows; key tiles of BN keys, double-buffered with cp.async (one barrier per tile;
//   zero-filled outside the block's visible keys, so stale cache rows never reach the math).
// - S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulate), operands by ldmatrix from
//   XOR-swizzled shared memory (16-byte chunk ^ (row & 7): conflict-free ldmatrix).
// - Rotation: each warp keeps ONE rotated copy of its rows in shared memory (Qr). Key tiles are
//   walked upwards, so the relation (2 inter, 1 successive, 0 intra; clamp(chunk(i)-chunk(j),0,2))
//   only decreases: the warp re-rotates from the unrotated q when
//   a tile needs another relation, about three times per query tile.
// - A tile whose (row, key) pairs share one relation costs one score pass. A tile straddling a chunk
//   boundary (for this warp's rows) is scored once per relation present and each element keeps the
//   score of its own relation; tiles crossing the causal diagonal mask key > pos per element. So
//   tiles need not divide chunk_len, queries may start anywhere (chunked prefill: positions
//   p0..p0+n-1 against cache keys 0..p0+n-1) and chunk_len = 0 is plain causal attention.
// - Softmax in log2 units: x = s * scale_log2 * temperature(row); running max/sum in fp32.
// - Split-K (blockIdx.z): the block's key tiles are cut into n_splits slices; each writes partials.
// Heaviest row blocks are scheduled first (causal work grows with the row block).
// - Position schemes without chunks (chunk_len 0: Self-Extend, StreamingLLM, engine/backends/cuda/extension.py)
//   run as passes of this kernel merged by dca_combine: rot_positions (n,) (or null) gives each query's rotation
//   position apart from its visible keys (positions, which may then be negative: no key), and window > 0 keeps
//   only the keys j > position - window (the tiles below the block's lowest window are never loaded).
// Limits: D in {64, 128}; rope_dim % 32 == 0 and <= D; Hq % Hkv == 0.

// Write the warp's ROWS rows of queries, rotated for relation `rel`, into its swizzled Qr tile.
// Row r is packed row R = w0 + r: query qi = R / group, head kvh*group + R % group; rows past
// rows_total are zero.
template <int D, bool BF16, int ROWS>
__device__ __forceinline__ void rotate_rows(unsigned char* qr, const u16* __restrict__ q,
                                            const int* __restrict__ positions, const int* __restrict__ rot_positions,
                                            const float* __restrict__ cos_t,
                                            const float* __restrict__ sin_t, int rel, int w0, int rows_total,
                                            int q_stride, int group, int kvh, int rope_dim, Dca dca, int lane) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    const int half = rope_dim >> 1, half_ch = half >> 3;
    for (int idx = lane; idx < ROWS * CH; idx += 32) {
        const int r = idx / CH, c = idx - r * CH;
        const bool rotary_pair = c < (rope_dim >> 3);
        if (rotary_pair && c >= half_ch) continue;  // written with its partner chunk c - half/8
        const int R = w0 + r;
        uint4 x1 = make_uint4(0u, 0u, 0u, 0u), x2 = x1;
        if (R < rows_total) {
            const int qi = R / group, head = kvh * group + R % group;
            const u16* src = q + (long long)qi * q_stride + head * D;
            x1 = *(const uint4*)(src + c * 8);
            if (rotary_pair) {
                x2 = *(const uint4*)(src + (c + half_ch) * 8);
                const int qpos = rot_positions != nullptr ? rot_positions[qi] : dca.query_position(positions[qi], rel);
                rotate_pairs8<BF16>(x1, x2, cos_t + (long long)qpos * half + c * 8, sin_t + (long long)qpos * half + c * 8);
            }
        }
        *(uint4*)(qr + swz<D>(r, c)) = x1;
        if (rotary_pair) *(uint4*)(qr + swz<D>(r, c + half_ch)) = x2;
    }
}

template <int D, int MT, int BN, bool BF16>
__device__ __forceinline__ void flash_body(const u16* __restrict__ q, const u16* __restrict__ kc,
                                           const u16* __restrict__ vc, const int* __restrict__ positions,
                                           const int* __restrict__ rot_positions,
                                           const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                           u16* __restrict__ out,
                                           float* __restrict__ part_o, float* __restrict__ part_m,
                                           float* __restrict__ part_l, int n, int n_heads, int n_kv, int rope_dim,
                                           int chunk_len, int chunk_size, float scale_log2, int temp_len,
                                           int n_splits, int window, int q_stride) {
    typedef Elt<BF16> E;
    constexpr int WARPS = 4, THREADS = 32 * WARPS, ROWS = 16 * MT, BM = WARPS * ROWS, CH = D / 8;
    constexpr int NT = BN / 8, KS = D / 16, DT = D / 8;
    constexpr int KS_UNROLL = MT == 1 ? KS : 1;  // full unrolling fits the registers of one m-tile only
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* qr_all = smem;                   // [BM][D]     rotated queries, one region per warp
    unsigned char* k_tiles = smem + BM * D * 2;     // [2][BN][D]  key tiles (2 stages)
    unsigned char* v_tiles = k_tiles + 2 * BN * D * 2;  // [2][BN][D] value tiles

    const Dca dca{chunk_len, chunk_size};
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kvh = blockIdx.x, row_block = gridDim.y - 1 - blockIdx.y, split = blockIdx.z;
    const int group = n_heads / n_kv, rows_total = n * group;
    const int m0 = row_block * BM;

    // keys (lowest window start of the block's rows) .. (position of its last row); positions increase with the
    // token index. Positions below 0 see no key (n_tiles <= 0).
    const int n_keys = positions[(min(m0 + BM, rows_total) - 1) / group] + 1;
    const int n_tiles = n_keys > 0 ? (n_keys + BN - 1) / BN : 0;
    const int key_lo = window > 0 ? max(0, positions[m0 / group] - window + 1) : 0;  // below: no row's key
    const int tile_first = key_lo / BN;
    const int per_split = (max(0, n_tiles - tile_first) + n_splits - 1) / n_splits;
    const int tile_begin = tile_first + split * per_split, tile_end = min(n_tiles, tile_begin + per_split);

    const int w0 = m0 + warp * ROWS;  // the warp's first packed row
    const bool warp_active = w0 < rows_total;
    const int pos_first = warp_active ? positions[w0 / group] : 0;
    const int pos_last = warp_active ? positions[(min(w0 + ROWS, rows_total) - 1) / group] : -1;

    // this thread's rows: mt*16 + g + 8*hf
    int row_pos[MT][2], row_chunk[MT][2];
    float row_scale[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int R = min(w0 + mt * 16 + g + 8 * hf, rows_total - 1);
            const int pos = positions[R / group];
            row_pos[mt][hf] = pos;
            row_chunk[mt][hf] = dca.chunk(pos);
            float sc = scale_log2;
            if (temp_len > 0 && pos + 1 > temp_len) sc *= 0.1f * logf((float)(pos + 1) / (float)temp_len) + 1.0f;
            row_scale[mt][hf] = sc;
        }

    auto load_kv = [&](int tile, int stage) {
        const int k0 = tile * BN;
        unsigned char* ks = k_tiles + stage * BN * D * 2;
        unsigned char* vs = v_tiles + stage * BN * D * 2;
#pragma unroll
        for (int idx = threadIdx.x; idx < BN * CH; idx += THREADS) {
            const int j = idx / CH, c = idx - j * CH, key = k0 + j;
            const bool ok = key < n_keys && key >= key_lo;
            const long long off = ((long long)(ok ? key : 0) * n_kv + kvh) * D + c * 8;
            cp_async16(smem_addr(ks + swz<D>(j, c)), kc + off, ok ? 16 : 0);
            cp_async16(smem_addr(vs + swz<D>(j, c)), vc + off, ok ? 16 : 0);
        }
    };

    unsigned char* qr = qr_all + warp * ROWS * D * 2;
    const unsigned qr_base = smem_addr(qr);
    int cur_rel = -1;
    float o[MT][DT][4], m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.0f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.0f;
    }

    auto use_relation = [&](int rel) {
        if (rel == cur_rel) return;
        __syncwarp();  // every lane is done reading the previous rotation
        rotate_rows<D, BF16, ROWS>(qr, q, positions, rot_positions, cos_t, sin_t, rel, w0, rows_total, q_stride,
                                   group, kvh, rope_dim, dca, lane);
        __syncwarp();
        cur_rel = rel;
    };
    // ldmatrix lane addresses: the row part is fixed per lane; the swizzle XOR of 16-byte chunk 2*ks + c
    // with (row & 7) == (lane & 7) is (ks * 32) ^ lane_xor, lane_xor = ((c ^ (lane & 7)) << 4)
    const unsigned xor_hi = (unsigned)((((lane >> 4) & 1) ^ (lane & 7)) << 4);   // c = lane bit 4
    const unsigned xor_mid = (unsigned)((((lane >> 3) & 1) ^ (lane & 7)) << 4);  // c = lane bit 3
    const unsigned a_row = (unsigned)(((lane & 7) + ((lane >> 3) & 1) * 8) * D * 2);
    const unsigned b_row = (unsigned)(((lane & 7) + (lane >> 4) * 8) * D * 2);
    const unsigned v_row = a_row;
    // A fragment (16 rows of m-tile mt, k-step ks) of the rotated queries
    auto load_a = [&](unsigned (&a)[4], int mt, int ks) {
        ldsm_x4(a, qr_base + a_row + mt * 16 * D * 2 + ((unsigned)(ks * 32) ^ xor_hi));
    };
    // B fragments of keys np*16 .. np*16+15 at k-step ks: {b0,b1} of n-tile 2np, {b2,b3} of 2np+1
    auto load_b = [&](unsigned (&b)[4], unsigned k_base, int np, int ks) {
        ldsm_x4(b, k_base + b_row + np * 16 * D * 2 + ((unsigned)(ks * 32) ^ xor_mid));
    };

    if (tile_begin < tile_end) load_kv(tile_begin, 0);
    cp_async_commit();
    for (int tile = tile_begin; tile < tile_end; ++tile) {
        const int stage = (tile - tile_begin) & 1;
        cp_async_wait<0>();  // this tile has landed (its loads ran during the previous tile's math)
        __syncthreads();     // ... for every thread, and every warp is done with the other stage
        if (tile + 1 < tile_end) load_kv(tile + 1, stage ^ 1);
        cp_async_commit();

        const int k0 = tile * BN;
        if (warp_active && k0 <= pos_last && (window == 0 || k0 + BN - 1 > pos_first - window)) {
            const unsigned k_base = smem_addr(k_tiles + stage * BN * D * 2);
            const unsigned v_base = smem_addr(v_tiles + stage * BN * D * 2);
            const int rel_hi = dca.relation(pos_last, k0), rel_lo = dca.relation(pos_first, k0 + BN - 1);
            float s[MT][NT][4];
            for (int rel = rel_hi; rel >= rel_lo; --rel) {
                use_relation(rel);
                if (rel_hi == rel_lo) {  // one relation for every (row, key) pair of the tile: one pass
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt)
                            s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll KS_UNROLL
                    for (int ks = 0; ks < KS; ++ks) {
                        unsigned a[MT][4];
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) load_a(a[mt], mt, ks);
#pragma unroll
                        for (int np = 0; np < NT / 2; ++np) {
                            unsigned b[4];
                            load_b(b, k_base, np, ks);
#pragma unroll
                            for (int mt = 0; mt < MT; ++mt) {
                                E::mma(s[mt][2 * np], a[mt], b[0], b[1]);
                                E::mma(s[mt][2 * np + 1], a[mt], b[2], b[3]);
                            }
                        }
                    }
                    continue;
                }
                // the tile straddles a chunk boundary: score once per relation present (highest first),
                // each element keeps the score of its own relation
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    float tmp[MT][2][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
                            tmp[mt][h][0] = tmp[mt][h][1] = tmp[mt][h][2] = tmp[mt][h][3] = 0.0f;
#pragma unroll 1
                    for (int ks = 0; ks < KS; ++ks) {
                        unsigned b[4];
                        load_b(b, k_base, np, ks);
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            unsigned a[4];
                            load_a(a, mt, ks);
                            E::mma(tmp[mt][0], a, b[0], b[1]);
                            E::mma(tmp[mt][1], a, b[2], b[3]);
                        }
                    }
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const int key = k0 + (2 * np + h) * 8 + 2 * t + (e & 1);
                                const int elem_rel = dca.relation_in(row_chunk[mt][e >> 1], key);
                                if (rel == rel_hi || elem_rel == rel) s[mt][2 * np + h][e] = tmp[mt][h][e];
                            }
                }
            }
            // the tile crosses the causal diagonal, or the lower edge of a window, for some row
            if (k0 + BN - 1 > pos_first || (window > 0 && k0 <= pos_last - window)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int key = k0 + nt * 8 + 2 * t + (e & 1), pos = row_pos[mt][e >> 1];
                            if (key > pos || (window > 0 && key <= pos - window)) s[mt][nt][e] = NEG_INF;
                        }
            }

            // online softmax (log2 units), rows (mt, hf); a row's keys are spread over the 4 lanes of a quad
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    float mx = NEG_INF;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float sc = row_scale[mt][hf];
                    const float m_new = fmaxf(m[mt][hf], mx * sc);
                    const float m_use = m_new == NEG_INF ? 0.0f : m_new;  // a row with no visible key yet
                    const float corr = fast_exp2(m[mt][hf] - m_use);
                    float sum = 0.0f;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const float p0 = fast_exp2(fmaf(s[mt][nt][2 * hf], sc, -m_use));
                        const float p1 = fast_exp2(fmaf(s[mt][nt][2 * hf + 1], sc, -m_use));
                        s[mt][nt][2 * hf] = p0;
                        s[mt][nt][2 * hf + 1] = p1;
                        sum += p0 + p1;
                    }
                    l[mt][hf] = l[mt][hf] * corr + sum;
                    m[mt][hf] = m_new;
#pragma unroll
                    for (int dt = 0; dt < DT; ++dt) {
                        o[mt][dt][2 * hf] *= corr;
                        o[mt][dt][2 * hf + 1] *= corr;
                    }
                }

            // O += P V: P from the score registers (two n-tiles = one 16-key A fragment), V by ldmatrix.trans
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                unsigned p[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    p[mt][0] = E::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    p[mt][1] = E::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    p[mt][2] = E::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    p[mt][3] = E::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < DT / 2; ++dp) {
                    unsigned b[4];  // keys kk*16.. (+8 for lanes 8-15, 24-31), dims dp*16.. (+8 for lanes 16-31)
                    ldsm_x4_trans(b, v_base + v_row + kk * 16 * D * 2 + ((unsigned)(dp * 32) ^ xor_hi));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        E::mma(o[mt][2 * dp], p[mt], b[0], b[1]);
                        E::mma(o[mt][2 * dp + 1], p[mt], b[2], b[3]);
                    }
                }
            }
        }
    }

    // epilogue: normalized output or split partials
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
            store_row<D, BF16>([&](int dt, int e) { return o[mt][dt][2 * hf + e]; }, m[mt][hf], l[mt][hf],
                               w0 + mt * 16 + g + 8 * hf, rows_total, group, kvh, n, n_heads, t, split, n_splits,
                               out, part_o, part_m, part_l);
}

// One configuration per build (D, MT m-tiles per warp, BN keys per tile), instantiated by the loader:
// dca_flash_<D>_<MT>_<BN> in the build's activation dtype.
#define DCA_FLASH(D, MT, BN)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) dca_flash_##D##_##MT##_##BN(                            \
        const u16* q, const u16* kc, const u16* vc, const int* positions, const int* rot_positions,           \
        const float* cos_t, const float* sin_t, u16* out, float* part_o, float* part_m, float* part_l, int n, \
        int n_heads, int n_kv, int rope_dim, int chunk_len, int chunk_size, float scale_log2, int temp_len,   \
        int n_splits, int window, int q_stride) {                                                             \
        flash_body<D, MT, BN, ACT_IS_BF16>(q, kc, vc, positions, rot_positions, cos_t, sin_t, out, part_o,    \
                                           part_m, part_l, n, n_heads, n_kv, rope_dim, chunk_len, chunk_size, \
                                           scale_log2, temp_len, n_splits, window, q_stride);                 \
    }
