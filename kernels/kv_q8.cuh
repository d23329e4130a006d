// q8_0 KV cache rows (engine/backends/cuda/kv_q8.py): ggml's q8_0 values split into two arrays, int8 values
// (rows, Hkv, D) and one fp16 scale per 32 values (rows, Hkv, D/32), so the values are read 16 bytes at a time.
// Value = q * d, rounded to act_t where a kernel needs 16-bit operands (the prefill scratch; the decode kernel reads
// the rows into its mma fragments: keys as integers, values in fp16). Prepended after common.cuh to the files that
// read or write these rows (kv_q8.cu, dca_decode.cu).

#define Q8_BLOCK 32  // values per scale

// bytes 2i, 2i + 1 of word (already ^ 0x80; sel: 0x4140 for bytes 0, 1; 0x4342 for 2, 3) as two exact integers q in
// fp16, unscaled (the decode kernel's q8_0 K fragments: the scales multiply the scores): 1024 + q + 128 in each half
// of an fp16 pair, minus 1152
__device__ __forceinline__ unsigned q8_pair_to_int_f16x2(unsigned word, unsigned sel) {
    unsigned r = __byte_perm(word, 0x64646464u, sel);
    asm("sub.rn.f16x2 %0, %0, %1;" : "+r"(r) : "r"(0x64806480u));
    return r;
}

// q8_pair_to_int_f16x2 times d2 (an fp16 pair: the low half scales the first byte), one fp16 multiply (.rn: not
// contracted into an fma). Used by both builds (the decode kernel's q8_0 V fragments).
__device__ __forceinline__ unsigned q8_pair_to_f16x2(unsigned word, unsigned sel, unsigned d2) {
    unsigned r = q8_pair_to_int_f16x2(word, sel);
    asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(r) : "r"(d2));
    return r;
}

// 8 int8 values (bytes of w, lowest first) times the fp16 scale d -> 8 act_t values packed in 16 bytes, each q * d
// rounded once to act_t (as rounding the exact fp32 product would), with no integer-to-float conversion: Hopper issues
// those at 16 a clock an SM against 128 for an add (dev/cuda/NOTES.md v24). A byte's q + 128 (= byte ^ 0x80) becomes
// the low mantissa bits of a float whose unit is its last place, 2^23 + q + 128 (fp16: 1024 + q + 128), and one
// subtraction leaves q exactly.
#ifdef ACT_BF16
__device__ __forceinline__ uint4 q8_to_act8(uint2 w, half_t d_bits) {
    const float d = h2f(d_bits);
    const unsigned lo = w.x ^ 0x80808080u, hi = w.y ^ 0x80808080u;
    // byte i of word, as bits 0..7 of 0x4b000000 = 2^23: the product q * d is exact in fp32 (8 + 11 bits)
    auto v = [&](unsigned word, int i) {
        return (__uint_as_float(__byte_perm(word, 0x4b000000u, 0x7440u | i)) - 8388736.0f) * d;
    };
    return make_uint4(pack2(v(lo, 0), v(lo, 1)), pack2(v(lo, 2), v(lo, 3)), pack2(v(hi, 0), v(hi, 1)),
                      pack2(v(hi, 2), v(hi, 3)));
}
#else
__device__ __forceinline__ uint4 q8_to_act8(uint2 w, half_t d_bits) {
    const unsigned d2 = (unsigned)d_bits * 0x10001u, lo = w.x ^ 0x80808080u, hi = w.y ^ 0x80808080u;
    return make_uint4(q8_pair_to_f16x2(lo, 0x4140u, d2), q8_pair_to_f16x2(lo, 0x4342u, d2),
                      q8_pair_to_f16x2(hi, 0x4140u, d2), q8_pair_to_f16x2(hi, 0x4342u, d2));
}
#endif
