// DCA (and plain causal) attention over the device KV cache: a tiled SIMT kernel with online softmax,
// split over the keys (flash-decoding) and a combine kernel. Serves prefill (many queries) and decode
// (one query) alike; no n_q x n_k buffer exists anywhere.
//
// Design (engine/dca.py blockwise_attention is the algorithm, design.md §3 the semantics).
// - Queries arrive UNROTATED: each warp owns one row = (query qi, query head h) and rotates its query
//   three ways (intra / successive / inter query positions) into shared memory, pre-scaled by
//   softmax_scale * log2(e) (and the optional attention temperature), so scores are in log2 units.
// - Keys are cached already rotated at their key positions (j mod chunk_len); values as they are.
// - GQA without copying K/V: a block serves the rows of ONE kv head (rows r = qi*group + g), loads a
//   32-key tile of that head's K and V into shared memory once and every warp of the block uses it.
// - Lane j of a warp scores key k0+j against the rotation its relation asks for; the relation is
//   chosen PER ELEMENT (clamp(chunk(i) - chunk(j), 0, 2)), so tiles straddling a chunk boundary or
//   the causal diagonal are exact without special cases. Then the usual online softmax: running max m,
//   running sum l, acc (lane owns dims lane, lane+32, ...) += p_j * v_j with p_j broadcast by shuffle.
// - Split-K: blockIdx.z takes one slice of the keys 0..max position of the block's rows (slices are
//   computed on the device from the positions, so a captured decode graph adapts to the length); each
//   split writes unnormalized (acc, m, l); dca_decode.cu's dca_combine merges the splits (act_t out).
// Layouts: q (n, Hq, D) act_t (fp16, or bf16 when built with -DACT_BF16; common.cuh); cache k/v of the
// layer (capacity, Hkv, D) act_t; positions (n,) int32, increasing; cos/sin (n_positions, R/2) fp32;
// part_o (S, n, Hq, D) fp32; part_m, part_l (S, n, Hq).
// Limits: D % 8 == 0 (16-byte K/V loads), D <= 32*DPL (DPL = 1, 2, 4 instantiated: D <= 128); rope_dim <= D.

#define LOAD_BATCH 4  // 16-byte K and V vectors per thread per tile

template <int DPL>
__device__ __forceinline__ void attn_partial_body(
    const act_t* __restrict__ q, const act_t* __restrict__ kc, const act_t* __restrict__ vc,
    const int* __restrict__ positions, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
    float* __restrict__ part_o, float* __restrict__ part_m, float* __restrict__ part_l, int n, int n_heads,
    int n_kv, int D, int rope_dim, int chunk_len, int chunk_size, float scale_log2, int temp_len, int n_splits) {
    const int group = n_heads / n_kv;
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvh = blockIdx.y, split = blockIdx.z;
    const int rows_total = n * group;
    const int row = blockIdx.x * warps + warp;
    const bool active = row < rows_total;
    const int qi = active ? row / group : 0;
    const int head = kvh * group + (active ? row % group : 0);
    const int kstride = D + 2;  // padded K rows: lanes reading different keys hit different banks

    extern __shared__ float smem[];
    float* qw = smem + warp * 3 * D;                                      // [3][D] this warp's rotations
    act_t* ks = (act_t*)(smem + warps * 3 * D);                           // [32][D+2]
    act_t* vs = ks + 32 * kstride;                                        // [32][D]

    // keys 0 .. (largest position among the block's rows); positions increase with the token index
    const int last_row = min(rows_total, (int)(blockIdx.x + 1) * warps) - 1;
    const int n_keys = positions[last_row / group] + 1;
    const int per_split = (((n_keys + n_splits - 1) / n_splits) + 31) & ~31;
    const int k_begin = split * per_split;
    const int k_end = min(n_keys, k_begin + per_split);

    const int pos = positions[qi];
    const Dca dca{chunk_len, chunk_size};
    const int my_chunk = dca.chunk(pos);
    const int qpos[3] = {dca.query_position(pos, 0), dca.query_position(pos, 1), dca.query_position(pos, 2)};
    float row_scale = scale_log2;
    if (temp_len > 0 && pos + 1 > temp_len) row_scale *= 0.1f * logf((float)(pos + 1) / (float)temp_len) + 1.0f;

    const act_t* qrow = q + ((long long)qi * n_heads + head) * D;
    const int half_r = rope_dim >> 1;
    if (active) {
        float qv[DPL], qp[DPL];  // this lane's query values and their rotary partners
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const int d = lane + 32 * i;
            qv[i] = d < D ? a2f(qrow[d]) : 0.0f;
            qp[i] = d < rope_dim ? a2f(qrow[d < half_r ? d + half_r : d - half_r]) : 0.0f;
        }
#pragma unroll
        for (int rel = 0; rel < 3; ++rel) {
            const float* c_row = cos_t + (long long)qpos[rel] * half_r;
            const float* s_row = sin_t + (long long)qpos[rel] * half_r;
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int d = lane + 32 * i;
                if (d >= D) continue;
                float val = qv[i];
                if (d < rope_dim) {
                    const int t = d < half_r ? d : d - half_r;
                    const float c = c_row[t], sn = s_row[t];
                    val = d < half_r ? qv[i] * c - qp[i] * sn : qv[i] * c + qp[i] * sn;
                }
                qw[rel * D + d] = val * row_scale;
            }
        }
    }

    float m = NEG_INF, l = 0.0f, acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[i] = 0.0f;
    const int pairs = D >> 1;

    // K/V tiles: 32 keys x D, as 16-byte vectors; one batch of LOAD_BATCH per thread covers a tile
    // (the host launches >= 4 warps, so 32*D/8 <= LOAD_BATCH*blockDim.x for D <= 128). The next tile's
    // loads are issued before the current tile is used (register double buffering).
    const int vecs = D >> 3;
    uint4 kv[LOAD_BATCH], vv[LOAD_BATCH];
    auto load_tile = [&](int t0) {
#pragma unroll
        for (int u = 0; u < LOAD_BATCH; ++u) {
            const int i = u * blockDim.x + threadIdx.x;
            const int j = i / vecs, key = t0 + j;
            kv[u] = make_uint4(0u, 0u, 0u, 0u);
            vv[u] = kv[u];
            if (i < 32 * vecs && key < k_end) {
                const long long off = ((long long)key * n_kv + kvh) * D;
                kv[u] = ((const uint4*)(kc + off))[i - j * vecs];
                vv[u] = ((const uint4*)(vc + off))[i - j * vecs];
            }
        }
    };
    if (k_begin < k_end) load_tile(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += 32) {
        __syncthreads();  // the previous tile is consumed (and the query rotations are visible)
#pragma unroll
        for (int u = 0; u < LOAD_BATCH; ++u) {
            const int i = u * blockDim.x + threadIdx.x;
            if (i < 32 * vecs) {
                const int j = i / vecs, c = i - j * vecs;
                unsigned int* kd = (unsigned int*)(ks + j * kstride) + 4 * c;  // 4-byte aligned rows
                kd[0] = kv[u].x; kd[1] = kv[u].y; kd[2] = kv[u].z; kd[3] = kv[u].w;
                *(uint4*)(vs + j * D + 8 * c) = vv[u];
            }
        }
        __syncthreads();
        if (k0 + 32 < k_end) load_tile(k0 + 32);
        if (!active) continue;

        const int key = k0 + lane;
        float s = NEG_INF;
        if (key < k_end && key <= pos) {
            const float* qr = qw + dca.relation_in(my_chunk, key) * D;
            const unsigned int* kr = (const unsigned int*)(ks + lane * kstride);
            float dot0 = 0.0f, dot1 = 0.0f;  // two chains: half the dependent-FMA latency
#pragma unroll 8
            for (int dd = 0; dd < pairs; ++dd) {
                const unsigned int w2 = kr[dd];
                dot0 += qr[2 * dd] * a2f_lo(w2);
                dot1 += qr[2 * dd + 1] * a2f_hi(w2);
            }
            s = dot0 + dot1;
        }
        const float tile_max = warp_max(s);
        if (tile_max == NEG_INF) continue;  // every key of the tile is in this row's future
        const float m_new = fmaxf(m, tile_max);
        const float corr = exp2f(m - m_new);
        const float p = exp2f(s - m_new);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[i] *= corr;
#pragma unroll 8
        for (int j = 0; j < 32; ++j) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
            const act_t* vr = vs + j * D;
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int d = lane + 32 * i;
                if (d < D) acc[i] += pj * a2f(vr[d]);
            }
        }
        m = m_new;
    }
    if (!active) return;
    const long long idx = ((long long)split * n + qi) * n_heads + head;
    if (lane == 0) {
        part_m[idx] = m;
        part_l[idx] = l;
    }
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) part_o[idx * D + d] = acc[i];
    }
}

#define ATTN_PARTIAL(DPL)                                                                                 \
    extern "C" __global__ void attn_partial_##DPL(                                                        \
        const act_t* q, const act_t* kc, const act_t* vc, const int* positions, const float* cos_t,       \
        const float* sin_t, float* part_o, float* part_m, float* part_l, int n, int n_heads, int n_kv,    \
        int D, int rope_dim, int chunk_len, int chunk_size, float scale_log2, int temp_len, int n_splits) { \
        attn_partial_body<DPL>(q, kc, vc, positions, cos_t, sin_t, part_o, part_m, part_l, n, n_heads,    \
                               n_kv, D, rope_dim, chunk_len, chunk_size, scale_log2, temp_len, n_splits); \
    }

ATTN_PARTIAL(1)
ATTN_PARTIAL(2)
ATTN_PARTIAL(4)
