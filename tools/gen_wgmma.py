"""Print the Wgmma<N, BF16> specializations at the end of kernels/wgmma.cuh.

wgmma.mma_async names each fp32 accumulator as its own asm operand (N/2 of them for m64nNk16), so the
wrappers are spelled out rather than written by hand:

    python tools/gen_wgmma.py > /tmp/w && (sed '/^template <> struct Wgmma</,$d' kernels/wgmma.cuh; cat /tmp/w)
"""
from __future__ import annotations

SHAPES = (64, 128)  # N of m64nNk16: BN of the score product, D of the P V product
TYPES = ((False, "f16"), (True, "bf16"))


def accumulators(n: int) -> str:
    return "{" + ", ".join(f"%{i}" for i in range(n)) + "}"


def outputs(n: int) -> str:
    return ", ".join(f'"+f"(d[{i}])' for i in range(n))


def specialization(n: int, bf16: bool, ptx_type: str) -> str:
    acc = n // 2
    return f'''template <> struct Wgmma<{n}, {'true' if bf16 else 'false'}> {{
    // D[64x{n}] (+)= A[64x16] B[16x{n}], A and B K-major in shared memory; scale_d 0 overwrites D
    static __device__ __forceinline__ void ss(float (&d)[{acc}], u64 a, u64 b, int scale_d) {{
        asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{acc + 2}, 0;\\n"
                     "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ptx_type}.{ptx_type} {accumulators(acc)}, %{acc}, %{acc + 1}, p, 1, 1, 0, 0; }}"
                     : {outputs(acc)}
                     : "l"(a), "l"(b), "r"(scale_d) : "memory");
    }}
    // D[64x{n}] += A[64x16] (registers) B[16x{n}], B MN-major in shared memory
    static __device__ __forceinline__ void rs(float (&d)[{acc}], const unsigned (&a)[4], u64 b) {{
        asm volatile("{{ .reg .pred p; setp.ne.b32 p, %{acc + 5}, 0;\\n"
                     "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ptx_type}.{ptx_type} {accumulators(acc)}, {{%{acc}, %{acc + 1}, %{acc + 2}, %{acc + 3}}}, %{acc + 4}, p, 1, 1, 1; }}"
                     : {outputs(acc)}
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(1) : "memory");
    }}
}};
'''


if __name__ == "__main__":
    print("\n".join(specialization(n, bf16, ptx_type) for n in SHAPES for bf16, ptx_type in TYPES), end="")
