// q8_0 KV cache rows (engine/backends/cuda/kv_q8.py): ggml's q8_0 values split into two arrays, int8 values
// (rows, Hkv, D) and one fp16 scale per 32 values (rows, Hkv, D/32), so the values are read 16 bytes at a time.
// Value = q * d, rounded to act_t where a kernel needs 16-bit operands (the decode kernel's tiles, the prefill
// scratch). Prepended after common.cuh to the files that read or write these rows (kv_q8.cu, dca_decode.cu).

#define Q8_BLOCK 32  // values per scale

// 8 int8 values (bytes of w, lowest first) times d -> 8 act_t values packed in 16 bytes
__device__ __forceinline__ uint4 q8_to_act8(uint2 w, float d) {
    const unsigned lo = w.x, hi = w.y;
    auto v = [&](unsigned word, int i) { return (float)(int)(signed char)((word >> (8 * i)) & 0xffu) * d; };
    return make_uint4(pack2(v(lo, 0), v(lo, 1)), pack2(v(lo, 2), v(lo, 3)), pack2(v(hi, 0), v(hi, 1)),
                      pack2(v(hi, 2), v(hi, 3)));
}
