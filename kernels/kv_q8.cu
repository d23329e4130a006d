// The q8_0 KV cache (kv_q8.cuh: int8 values (rows, Hkv, D) + fp16 scales (rows, Hkv, D/32)): the row store, which
// rotates keys and quantizes, and the dequantization of a layer's used rows into a 16-bit scratch for the kernels
// that read 16-bit caches (the prefill flash kernels, the simple tiled kernel).
//
// Quantization is ggml's quantize_row_q8_0_ref (engine/convert/quantize.py, the CPU cache's encoder) on the value
// as the 16-bit cache would hold it (act_t, the key rotated first, exactly as store_kv rounds it):
//     d = max|x| / 127 (fp32; stored as fp16, round to nearest even), id = d ? 1/d : 0, q = roundf(x * id)
// in IEEE round-to-nearest arithmetic (__fdiv_rn, __fmul_rn), so a row's bytes equal the CPU encoder's for the
// same float values.

// Cache rows positions[t] <- k[t] rotated at its key position (positions[t] mod chunk_len under DCA; rotate-half over
// the first rope_dim dims, as store_kv) and v[t]. Each of K and V goes to a q8_0 cache (k_q, k_d non-null) or to a
// 16-bit one (k16). k, v rows are k_stride / v_stride elements apart, heads x head_dim each (head_dim % 32 == 0).
// One warp per (token, head, K or V, block of 32 dims): lane = dim within the block; the block's max through
// shuffles. Grid: ceil(n * heads * 2 * head_dim/32 / warps per block) blocks. Launched dependent (pdl.py) between the
// fused step's qkv and decode attention: it waits for qkv, and its few blocks release the attention early.
extern "C" __global__ void store_kv_q8(const act_t* __restrict__ k, long long k_stride, const act_t* __restrict__ v,
                                       long long v_stride, const int* __restrict__ positions,
                                       const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                       i8* __restrict__ k_q, half_t* __restrict__ k_d, act_t* __restrict__ k16,
                                       i8* __restrict__ v_q, half_t* __restrict__ v_d, act_t* __restrict__ v16,
                                       int n, int heads, int head_dim, int rope_dim, int chunk_len) {
    pdl_wait();  // k, v and positions come from the kernels before this one
    const int blocks = head_dim / Q8_BLOCK, lane = threadIdx.x & 31;
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (w >= (long long)n * heads * 2 * blocks) return;  // whole warps leave together
    const int b = (int)(w % blocks), is_v = (int)((w / blocks) & 1);
    const long long row = w / (2 * blocks);  // token * heads + head
    const int t = (int)(row / heads), h = (int)(row % heads);
    const int dim = b * Q8_BLOCK + lane, half_r = rope_dim >> 1;
    float x;
    if (is_v) {
        x = a2f(v[t * v_stride + (long long)h * head_dim + dim]);
    } else {
        const act_t* src = k + t * k_stride + (long long)h * head_dim;
        if (dim < rope_dim) {
            const int j = dim < half_r ? dim : dim - half_r;  // the rotary pair (j, j + half_r)
            const int p = Dca{chunk_len, 0}.key_position(positions[t]);
            const float c = cos_t[(long long)p * half_r + j], s = sin_t[(long long)p * half_r + j];
            const float x1 = a2f(src[j]), x2 = a2f(src[j + half_r]);
            x = a2f(dim < half_r ? f2a(x1 * c - x2 * s) : f2a(x2 * c + x1 * s));
        } else {
            x = a2f(src[dim]);
        }
    }
    const long long dst = ((long long)positions[t] * heads + h) * head_dim + dim;
    i8* q_out = is_v ? v_q : k_q;
    if (q_out == nullptr) {  // a 16-bit cache
        (is_v ? v16 : k16)[dst] = f2a(x);
        return;
    }
    const float d = __fdiv_rn(warp_max(fabsf(x)), 127.0f);
    const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
    q_out[dst] = (i8)(int)roundf(__fmul_rn(x, id));
    if (lane == 0) (is_v ? v_d : k_d)[dst / Q8_BLOCK] = f2h(d);
}

// out (rows, heads, head_dim) act_t <- the q8_0 rows 0 .. positions[last] (the keys the queries of a forward see);
// rows up to max_rows are covered by the grid, those past positions[last] left as they are. One thread per 8 values.
extern "C" __global__ void dequant_kv_q8(const i8* __restrict__ q, const half_t* __restrict__ d,
                                         act_t* __restrict__ out, const int* __restrict__ positions, int last,
                                         long long max_rows, int heads, int head_dim) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // 8-value group
    const long long per_row = (long long)heads * head_dim / 8;
    if (idx >= max_rows * per_row || idx / per_row > positions[last]) return;
    const uint2 w = *(const uint2*)(q + idx * 8);
    *(uint4*)(out + idx * 8) = q8_to_act8(w, d[idx * 8 / Q8_BLOCK]);
}

// q8_0 rows <- their ggml blocks as a session file holds them (kv_q8.join_blocks): raw is n_blocks blocks of 34 bytes
// (the fp16 scale d, then 32 int8 values); the values go to q (n_blocks x 32 bytes), the scales to d (n_blocks). Both
// are whole rows of a layer (contiguous); raw, q and d are 2-byte aligned. One thread per 2-byte word of raw (17 a
// block): coalesced reads, word 0 of a block is its scale.
extern "C" __global__ void split_kv_q8_blocks(const unsigned short* __restrict__ raw, unsigned short* __restrict__ q,
                                              unsigned short* __restrict__ d, long long n_blocks) {
    const long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    constexpr int WORDS = (2 + Q8_BLOCK) / 2;
    if (w >= n_blocks * WORDS) return;
    const long long block = w / WORDS;
    const int part = (int)(w % WORDS);
    const unsigned short word = raw[w];
    if (part == 0) d[block] = word;
    else q[block * (Q8_BLOCK / 2) + part - 1] = word;
}
