// Fused DCA (and plain causal) flash-attention prefill for Hopper (sm_90a): the algorithm of
// dca_flash_attn.cu (same arguments, same outputs, same split-K partials) on warpgroup MMAs. q's rows are
// q_stride elements apart (Hq*D, or the row of a fused QKV product).
//
// Design (FlashAttention-3's structure, with cp.async instead of TMA).
// - A block is WG consumer warpgroups x 64 packed rows (R = qi*group + g: GQA without copies, as in
//   dca_flash_attn.cu) plus one producer warpgroup. The producer copies key tiles of BN keys with cp.async
//   into STAGES buffers, in the 128-byte swizzled layout wgmma reads (wgmma.cuh), and signals each on an
//   mbarrier ("full") as its copies land; consumers free a buffer on another ("empty") once the last wgmma
//   reading it has completed. No block-wide barrier in the loop, so the consumer warpgroups drift apart and
//   one's softmax overlaps another's MMAs. The producer gives its registers to the consumers (setmaxnreg).
// - Each consumer keeps its 64 rows rotated for one relation in shared memory and re-rotates them (from
//   the unrotated q and the cos/sin tables) when a key tile needs another relation: relations only fall
//   as the keys rise, so about three times per row block.
// - A pass is one (key tile, relation): S = Q K^T by wgmma m64nBNk16 (both operands in shared memory,
//   fp32 accumulators in registers in mma.sync's C layout per 8 columns); a tile straddling a chunk
//   boundary is processed once per relation present, each pass masking the other relations' elements
//   (online softmax ignores -inf), so one score accumulator suffices; tiles crossing the causal diagonal
//   mask key > pos.
// - Online softmax in log2 units in registers. O += P V by wgmma m64nDk16, P from registers (the packed
//   scores are exactly the A fragments), V from shared memory MN-major. P V is deferred by one pass: it
//   runs on the tensor cores during the next pass's softmax (intra-warpgroup overlap).
// - Values a whole warp shares pass through a lane-0 shuffle, so that the compiler knows them uniform:
//   wgmma under a branch it cannot prove warp-uniform is serialized.
// Limits: D in {64, 128}; rope_dim % 32 == 0 and <= D; Hq % Hkv == 0.

// byte offset of 16-byte chunk c (of D/8) of row r in a [ROWS][D] tile stored as D/64 swizzled [ROWS][64] sub-tiles
template <int ROWS>
__device__ __forceinline__ unsigned tile_offset(int r, int c) {
    return (unsigned)((c >> 3) * ROWS * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Write the warpgroup's 64 rows, rotated for relation `rel`, into its query tile (rows past rows_total
// are zero). Row r is packed row R = w0 + r: query R / group, head kvh*group + R % group.
template <int D, bool BF16>
__device__ __forceinline__ void rotate_into_tile(unsigned char* q_tile, const u16* __restrict__ q,
                                                 const int* __restrict__ positions, const float* __restrict__ cos_t,
                                                 const float* __restrict__ sin_t, int rel, int w0, int rows_total,
                                                 int q_stride, int group, int kvh, int rope_dim, Dca dca, int tid) {
    constexpr int CH = D / 8;
    const int half = rope_dim >> 1, half_ch = half >> 3, rot_ch = rope_dim >> 3;
    for (int idx = tid; idx < 64 * CH; idx += 128) {
        const int r = idx / CH, c = idx - r * CH;
        if (c >= half_ch && c < rot_ch) continue;  // written with its partner chunk c - half/8
        const bool pair = c < half_ch;
        uint4 x1 = make_uint4(0u, 0u, 0u, 0u), x2 = x1;
        const int R = w0 + r;
        if (R < rows_total) {
            const int qi = R / group;
            const u16* src = q + (long long)qi * q_stride + (kvh * group + R % group) * D;
            x1 = *(const uint4*)(src + c * 8);
            if (pair) {
                x2 = *(const uint4*)(src + (c + half_ch) * 8);
                const int qpos = dca.query_position(positions[qi], rel);
                rotate_pairs8<BF16>(x1, x2, cos_t + (long long)qpos * half + c * 8, sin_t + (long long)qpos * half + c * 8);
            }
        }
        *(uint4*)(q_tile + tile_offset<64>(r, c)) = x1;
        if (pair) *(uint4*)(q_tile + tile_offset<64>(r, c + half_ch)) = x2;
    }
}

template <int D, int BN, int WG, int STAGES, bool BF16>
__device__ __forceinline__ void flash_wg_body(const u16* __restrict__ q, const u16* __restrict__ kc,
                                              const u16* __restrict__ vc, const int* __restrict__ positions,
                                              const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                              u16* __restrict__ out, float* __restrict__ part_o,
                                              float* __restrict__ part_m, float* __restrict__ part_l, int n,
                                              int n_heads, int n_kv, int rope_dim, int chunk_len, int chunk_size,
                                              float scale_log2, int temp_len, int n_splits, int q_stride) {
    typedef Elt<BF16> E;
    // the producer keeps 24 registers a thread, the consumers share the rest (a multiple of 8, at most 240)
    constexpr int SHARE = (65536 - 128 * 24) / (128 * WG) / 8 * 8, CONSUMER_REGS = SHARE > 240 ? 240 : SHARE;
    constexpr int BM = 64 * WG, CH = D / 8, KSTEPS = D / 16;
    constexpr int NS = BN / 2, NO = D / 2, KK = BN / 16;
    constexpr unsigned Q_BYTES = 64 * D * 2, KV_BYTES = BN * D * 2;
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
    unsigned char* q_tiles = smem;                            // [WG][64 x D]
    unsigned char* k_tiles = smem + WG * Q_BYTES;             // [STAGES][BN x D]
    unsigned char* v_tiles = k_tiles + STAGES * KV_BYTES;     // [STAGES][BN x D]
    const unsigned full = smem_addr(v_tiles + STAGES * KV_BYTES), empty = full + 8 * STAGES;  // [STAGES] mbarriers
    if (threadIdx.x == 0)
        for (int stage = 0; stage < STAGES; ++stage) {
            mbar_init(full + 8 * stage, 128);      // the producer's 128 threads, as their copies land
            mbar_init(empty + 8 * stage, 4 * WG);  // every consumer warp, done with the stage
        }
    __syncthreads();

    const Dca dca{chunk_len, chunk_size};
    const auto uniform = [](int v) { return __shfl_sync(0xffffffffu, v, 0); };
    const int wg = uniform(threadIdx.x >> 7), tid = threadIdx.x & 127, warp = tid >> 5;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kvh = blockIdx.x, row_block = gridDim.y - 1 - blockIdx.y, split = blockIdx.z;
    const int group = n_heads / n_kv, rows_total = n * group;
    const int m0 = row_block * BM;

    const int n_keys = uniform(positions[(min(m0 + BM, rows_total) - 1) / group] + 1);
    const int n_tiles = (n_keys + BN - 1) / BN;
    const int per_split = (n_tiles + n_splits - 1) / n_splits;
    const int tile_begin = split * per_split, tile_end = min(n_tiles, tile_begin + per_split);

    const int w0 = m0 + wg * 64;
    const bool wg_active = w0 < rows_total;
    const int pos_first = uniform(wg_active ? positions[w0 / group] : 0);
    const int pos_last = uniform(wg_active ? positions[(min(w0 + 64, rows_total) - 1) / group] : -1);

    int row_pos[2], row_chunk[2];
    float row_scale[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int R = min(w0 + warp * 16 + g + 8 * hf, rows_total - 1);
        const int pos = positions[R / group];
        row_pos[hf] = pos;
        row_chunk[hf] = dca.chunk(pos);
        float sc = scale_log2;
        if (temp_len > 0 && pos + 1 > temp_len) sc *= 0.1f * logf((float)(pos + 1) / (float)temp_len) + 1.0f;
        row_scale[hf] = sc;
    }

    unsigned char* q_mine = q_tiles + wg * Q_BYTES;
    int cur_rel = -1;
    auto use_relation = [&](int rel) {  // rel is warp-uniform; the tile is read by no wgmma in flight
        if (rel == cur_rel) return;
        rotate_into_tile<D, BF16>(q_mine, q, positions, cos_t, sin_t, rel, w0, rows_total, q_stride, group, kvh,
                                  rope_dim, dca, tid);
        fence_async_shared();
        warpgroup_sync(1 + wg);
        cur_rel = rel;
    };

    auto load_kv = [&](int tile) {  // by the producer's 128 threads
        const int k0 = tile * BN, stage = (tile - tile_begin) % STAGES;
        unsigned char* ks = k_tiles + stage * KV_BYTES;
        unsigned char* vs = v_tiles + stage * KV_BYTES;
#pragma unroll
        for (int idx = tid; idx < BN * CH; idx += 128) {
            const int j = idx / CH, c = idx - j * CH, key = k0 + j;
            const bool ok = key < n_keys;
            const long long off = ((long long)(ok ? key : 0) * n_kv + kvh) * D + c * 8;
            cp_async16(smem_addr(ks + tile_offset<BN>(j, c)), kc + off, ok ? 16 : 0);
            cp_async16(smem_addr(vs + tile_offset<BN>(j, c)), vc + off, ok ? 16 : 0);
        }
    };

    const unsigned q_base = smem_addr(q_mine);
    float o[NO], m[2], l[2];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;
    m[0] = m[1] = NEG_INF;
    l[0] = l[1] = 0.0f;
    unsigned p_prev[KK][4];  // the previous pass's P (16-bit pairs), multiplied by V_prev in this pass
    unsigned v_prev = 0;     // its V tile (shared address); 0: no pass yet
    auto issue_pv = [&]() {
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) Wgmma<D, BF16>::rs(o, p_prev[kk], wgmma_desc(v_prev + kk * 16 * 128, BN * 128, 1024));
    };

    // the stage whose V the deferred P V reads: released to the producer once that P V has completed
    int pending_stage = -1;
    const auto release = [&](int stage) {
        if (lane == 0) mbar_arrive(empty + 8 * stage);  // one arrival per consumer warp
    };
    const auto flush = [&]() {  // run the deferred P V now (the warpgroup has no further pass)
        if (!v_prev) return;
        wgmma_fence();
        issue_pv();
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < NO; ++i) asm volatile("" : "+f"(o[i])::"memory");
        v_prev = 0;
        release(pending_stage);
        pending_stage = -1;
    };

    if (wg == WG) {  // the producer warpgroup: K/V tiles into free stages, their landing signalled on `full`
        regs_give<24>();
        for (int tile = tile_begin, i = 0; tile < tile_end; ++tile, ++i) {
            if (i >= STAGES) mbar_wait(empty + 8 * (i % STAGES), (i / STAGES - 1) & 1);
            load_kv(tile);
            cp_async_arrive(full + 8 * (i % STAGES));
        }
        cp_async_wait<0>();
        return;
    }
    regs_take<CONSUMER_REGS>();
    for (int tile = tile_begin, i = 0; tile < tile_end; ++tile, ++i) {
        const int stage = i % STAGES;
        mbar_wait(full + 8 * stage, (i / STAGES) & 1);  // the producer's copies of this tile landed
        fence_async_shared();                            // ... visible to wgmma

        const int k0 = tile * BN;
        if (!wg_active || k0 > pos_last) {  // no row of this warpgroup sees the tile (nor any later one)
            flush();
            release(stage);
            continue;
        }
        const unsigned k_base = smem_addr(k_tiles + stage * KV_BYTES);
        const unsigned v_base = smem_addr(v_tiles + stage * KV_BYTES);
        const int rel_hi = dca.relation(pos_last, k0), rel_lo = dca.relation(pos_first, k0 + BN - 1);
        const bool diagonal = k0 + BN - 1 > pos_first;
        for (int rel = rel_hi; rel >= rel_lo; --rel) {
            use_relation(rel);
            float s[NS];
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) {
                const unsigned step = (unsigned)((ks & 3) * 32);
                Wgmma<BN, BF16>::ss(s, wgmma_desc(q_base + (ks >> 2) * 64 * 128 + step, 16, 1024),
                                    wgmma_desc(k_base + (ks >> 2) * BN * 128 + step, 16, 1024), ks);
            }
            wgmma_commit();
            if (v_prev) {
                issue_pv();
                wgmma_commit();
                wgmma_wait<1>();  // the scores are ready; the previous P V still runs
            } else {
                wgmma_wait<0>();
            }
#pragma unroll
            for (int i = 0; i < NS; ++i) asm volatile("" : "+f"(s[i])::"memory");
            if (diagonal || rel_hi != rel_lo) {  // mask later keys, and elements of another relation
#pragma unroll
                for (int i = 0; i < NS; ++i) {
                    const int key = k0 + (i >> 2) * 8 + 2 * t + (i & 1), hf = (i >> 1) & 1;
                    const bool other_rel = rel_hi != rel_lo && dca.relation_in(row_chunk[hf], key) != rel;
                    if (key > row_pos[hf] || other_rel) s[i] = NEG_INF;
                }
            }
            float corr[2];
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float mx = NEG_INF;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * hf], s[4 * nt + 2 * hf + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float sc = row_scale[hf];
                const float m_new = fmaxf(m[hf], mx * sc);
                const float m_use = m_new == NEG_INF ? 0.0f : m_new;
                corr[hf] = fast_exp2(m[hf] - m_use);
                float sum = 0.0f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    const float p0 = fast_exp2(fmaf(s[4 * nt + 2 * hf], sc, -m_use));
                    const float p1 = fast_exp2(fmaf(s[4 * nt + 2 * hf + 1], sc, -m_use));
                    s[4 * nt + 2 * hf] = p0;
                    s[4 * nt + 2 * hf + 1] = p1;
                    sum += p0 + p1;
                }
                l[hf] = l[hf] * corr[hf] + sum;
                m[hf] = m_new;
            }
            wgmma_wait<0>();  // the previous P V is done: O may be rescaled, p_prev replaced
#pragma unroll
            for (int i = 0; i < NO; ++i) asm volatile("" : "+f"(o[i])::"memory");
            if (pending_stage != stage) {  // that P V read the previous tile's V: its stage is free
                if (pending_stage >= 0) release(pending_stage);
                pending_stage = stage;
            }
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[4 * dt] *= corr[0];
                o[4 * dt + 1] *= corr[0];
                o[4 * dt + 2] *= corr[1];
                o[4 * dt + 3] *= corr[1];
            }
#pragma unroll
            for (int kk = 0; kk < KK; ++kk)
#pragma unroll
                for (int r = 0; r < 4; ++r) p_prev[kk][r] = E::pack(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
            v_prev = v_base;
        }
    }
    flush();  // the last pass's P V

#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
        store_row<D, BF16>([&](int dt, int e) { return o[4 * dt + 2 * hf + e]; }, m[hf], l[hf],
                           w0 + warp * 16 + g + 8 * hf, rows_total, group, kvh, n, n_heads, t, split, n_splits, out,
                           part_o, part_m, part_l);
}

// One configuration per build (D, BN keys per tile, WG consumer warpgroups, STAGES K/V buffers), instantiated
// by the loader: dca_flash_wg_<D>_<BN>_<WG>_<STAGES> in the build's activation dtype.
#define DCA_FLASH_WG(D, BN, WG, STAGES)                                                                         \
    extern "C" __global__ void __launch_bounds__(128 * (WG + 1), 1) dca_flash_wg_##D##_##BN##_##WG##_##STAGES(  \
        const u16* q, const u16* kc, const u16* vc, const int* positions, const float* cos_t,                   \
        const float* sin_t, u16* out, float* part_o, float* part_m, float* part_l, int n, int n_heads,          \
        int n_kv, int rope_dim, int chunk_len, int chunk_size, float scale_log2, int temp_len, int n_splits,     \
        int q_stride) {                                                                                         \
        flash_wg_body<D, BN, WG, STAGES, ACT_IS_BF16>(q, kc, vc, positions, cos_t, sin_t, out, part_o, part_m,   \
                                                      part_l, n, n_heads, n_kv, rope_dim, chunk_len, chunk_size, \
                                                      scale_log2, temp_len, n_splits, q_stride);                \
    }
