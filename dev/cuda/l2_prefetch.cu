// dev/cuda/prefetch_attention.py's side kernel (a measurement variant; production never builds it): the grid's threads
// ask L2 for `bytes` bytes from `src` (cp.async.bulk.prefetch.L2, 64 KiB pieces, whole 16-byte units) and exit;
// nothing waits for the lines. src is 16-byte aligned. Hopper only (a no-op below sm_90).
extern "C" __global__ void l2_prefetch(const unsigned char* src, long long bytes) {
#if __CUDA_ARCH__ >= 900
    const long long threads = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long off = first * 65536; off < bytes; off += threads * 65536) {
        const unsigned piece = (unsigned)(min(65536LL, bytes - off) & ~15LL);
        if (piece) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src + off), "r"(piece) : "memory");
    }
#endif
}
