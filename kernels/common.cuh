// Shared device helpers, prepended to every .cu file by the loader (engine/backends/cuda/kernels.py).
//
// No CUDA headers are included anywhere: NVRTC from a pip wheel compiles these sources as they are.
// fp16 and bf16 values travel as raw 16-bit patterns (half_t, act_t) and convert through PTX `cvt`
// or shifts, so neither cuda_fp16.h / cuda_bf16.h nor the CUDA toolkit headers are needed.
//
// Activations. `act_t` is the 16-bit type of every activation that feeds a matrix product (normed
// rows, Q/K/V, the KV cache, attention outputs, SwiGLU outputs): fp16 by default, bf16 when the file
// is compiled with -DACT_BF16 (the loader builds the activation files both ways). a2f / f2a convert
// one value (round to nearest even), a2f_lo / a2f_hi unpack the two values of a 32-bit word, pack2
// packs two. Weights stored F16 stay fp16 (h2f) whatever the activation type.
typedef unsigned short half_t;        // IEEE binary16 bits
typedef unsigned char u8;
typedef signed char i8;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(half_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ half_t f2h(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }

#ifdef ACT_BF16
#define ACT_IS_BF16 true       // the template argument of kernels written for both 16-bit types
typedef unsigned short act_t;  // bfloat16 bits
__device__ __forceinline__ float a2f(act_t a) { return bf2f(a); }
__device__ __forceinline__ act_t f2a(float f) {
    act_t a;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(a) : "f"(f));  // sm_80+
    return a;
}
__device__ __forceinline__ float a2f_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
#else
#define ACT_IS_BF16 false
typedef half_t act_t;
__device__ __forceinline__ float a2f(act_t a) { return h2f(a); }
__device__ __forceinline__ act_t f2a(float f) { return f2h(f); }
__device__ __forceinline__ float a2f_hi(unsigned w) { return h2f((half_t)(w >> 16)); }
#endif
__device__ __forceinline__ float a2f_lo(unsigned w) { return a2f((act_t)(w & 0xffffu)); }
// two activations in one 32-bit word: lo in bits 0..15, hi in bits 16..31
__device__ __forceinline__ unsigned pack2(float lo, float hi) { return (unsigned)f2a(lo) | ((unsigned)f2a(hi) << 16); }

// fp16 field at any 2-byte aligned address
__device__ __forceinline__ float load_h(const u8* p) { return h2f(*(const half_t*)p); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The int8 input of the one-token GEMVs (gemv.cu), llama.cpp's q8_1: the calling warp quantizes block `block` of 32
// values (lane l holds value 32*block + l): d = max|v| / 127, q = rint(v / d) (0 where d == 0), s = the block's sum,
// each lane's and lane 0's as gemv.cu's stage computes them. Stored for the next GEMV in value order, "staged": int8
// q[n], then fp32 d[n/32], then fp32 s[n/32] (n + n/4 bytes; gemv.cu's copy_staged reads it instead of quantizing).
// A value's int8 and its block's scale from the block's max |v| (gemv.cu's stage and store_q8_block alike)
__device__ __forceinline__ float q8_scale(float amax) { return amax / 127.0f; }
__device__ __forceinline__ int q8_round(float v, float d) { return d > 0.0f ? __float2int_rn(v / d) : 0; }

__device__ __forceinline__ void store_q8_block(float v, int block, int n, unsigned char* __restrict__ q8) {
    float amax = fabsf(v), sum = v;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    const float d = q8_scale(amax);
    q8[32 * block + (threadIdx.x & 31)] = (unsigned char)(signed char)q8_round(v, d);
    if ((threadIdx.x & 31) == 0) {
        float* scales = (float*)(q8 + n);
        scales[block] = d;
        scales[n / 32 + block] = sum;
    }
}

// Sum over a whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch /* >= 32 floats */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Programmatic dependent launch (Hopper; engine/backends/cuda/pdl.py, dev/cuda/NOTES.md v20). A decode kernel launched
// with the programmatic stream serialization attribute is scheduled as soon as every block of the kernel before it has
// exited, without waiting for that kernel's completion (its memory flush) and the launch after it: the launch latency
// and this kernel's first weight loads overlap the previous kernel's tail. Before pdl_wait it may only read what no
// earlier kernel writes (weights) and use its own shared memory: no global store at all. pdl_wait returns once the
// kernel before it has completed and its writes are visible (and so, each kernel waiting in turn, every earlier one).
// Then a launch whose grid leaves SMs free releases its dependents (griddepcontrol.launch_dependents): they start on
// the free SMs. A grid as large as the SM count does not: measured on the H100, dependents scheduled while a GEMV's
// blocks still ran took their SM slots and slowed the 1B step by 7%, while SmolLM2's small grids gained 16.7% against
// 10.2% released at exit (v20; this rule: v21). Without the attribute (below sm_90, or pdl.ENABLED off) both do
// nothing.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    unsigned sms;
    asm("mov.u32 %0, %%nsmid;" : "=r"(sms));  // the SM ids' upper bound (132 SMs of an H100: 132 or more)
    if (gridDim.x * gridDim.y * gridDim.z < sms) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Thread block clusters (Hopper; engine/backends/cuda/gemv.py prenorm_cluster, dev/cuda/NOTES.md v22).
// cluster_ctas: the blocks of this block's cluster (1 in a launch without clusters, and below sm_90); cluster_rank:
// this block's rank in it (blockIdx.x % cluster_ctas() in a 1-D grid). cluster_sync: every thread of every block of
// the cluster arrives with release semantics (its global stores before it ordered at cluster scope) and waits with
// acquire semantics.
__device__ __forceinline__ unsigned cluster_ctas() {
#if __CUDA_ARCH__ >= 900
    unsigned n;
    asm("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
    return n;
#else
    return 1;
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
#if __CUDA_ARCH__ >= 900
    unsigned r;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
#else
    return 0;
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
#endif
}
