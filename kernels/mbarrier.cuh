// Shared-memory mbarriers and the copies that complete on them (sm_80 cp.async; sm_90 bulk copies), inline PTX.
// Prepended after mma.cuh (smem_addr) to the files whose kernels pipeline their loads: dca_flash_attn_sm90.cu (cp.async
// tiles, warp-specialized) and gemv.cu (the Q6_K head's rows streamed by the bulk copy engine on Hopper).
// Barrier addresses are shared-memory addresses (smem_addr), 8-byte aligned.

// init with the number of arrivals that complete a phase; waits name the phase by its parity (0 for the first)
__device__ __forceinline__ void mbar_init(unsigned bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("{ .reg .b64 state; mbarrier.arrive.shared::cta.b64 state, [%0]; }" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, int parity) {
    asm volatile("{ .reg .pred done;\n"
                 "WAIT: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT; }" ::"r"(bar), "r"(parity) : "memory");
}
// one arrival on `bar` once all of this thread's cp.async copies so far have landed
__device__ __forceinline__ void cp_async_arrive(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
// The initializations visible to the async proxy (bulk copies) before any copy completes on the barriers
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// sm_90: one arrival that also expects `bytes` of bulk copies to complete on the barrier in this phase
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// sm_90: `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory by the bulk copy
// engine, completing on `bar`
__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
