"""A numpy emulation, on the CPU backend, of the two ways a one-token step can quantize an RMSNorm-fused GEMV's
input (tests/test_prenorm_emulation.py measures their difference; tests/test_cuda_model.py's fused-step tolerance
comes from it):
  composed   q8(act_t(x * inv * w)): the composed blocks' rmsnorm output, rounded to the activation type, then
             quantized per 32 by the GEMV (and the fused kernels' own staging)
  prenormed  q8(x * w) in fp32 with scales times inv = rsqrt(mean(x^2) + eps) (gemv.py prenorm_outputs /
             prenormed_q8: what gemv_add's prenorm epilogue and its consumer compute)
Every other product reads q8(act_t(a)) in both modes; the rest of the step is the CPU backend's float32 (the same in
both), and each GEMV is x_hat @ W^T on the dequantized weights (the Q4_1 / Q4_K block offsets are applied to x_hat's
sums, not the exact ones: equal in both modes)."""
from __future__ import annotations

import numpy as np

from engine.backends.cuda import gemv

# The fused decode step's distance from the composed one where the RMSNorm-fused products read prenormed inputs.
# Measured with this emulation (tests/test_prenorm_emulation.py; tiny q4_1, q4_k, q6_k, tied q8_0 models of
# test_cuda_model.py, DCA off and on, 100 / 300 prompt tokens): logits 1.0e-2 .. 1.8e-2 (f16), 1.4e-2 .. 2.3e-2
# (bf16); the new cache rows 2.8e-4 .. 8.0e-3 (f16), 6.5e-3 .. 1.2e-2 (bf16); the q8_0 models of test_cuda_extensions
# (d64) and test_cuda_kv_q8 (d32, d64, d128; d_model 128-256): logits 1.2e-2 .. 2.2e-2, rows <= 1.1e-2. The int8
# input's own error on these models is as large (composed q8 against float: 1.2e-2 .. 2.3e-2): with d = 64 one
# flipped int8 value moves its product by ~2.5e-3 (a step of max|v|/127 against the vector's norm), and later layers
# carry it on. Tolerance: about 1.7x the largest measured, plus the fused step's own summation-order distance
# (test_cuda_model.py FUSED_TOL: 1e-3 / 3e-3).
PRENORMED_TOL = {"logits": 4e-2, "rows": 2e-2}


def staging_only(blocks) -> None:
    """Make fused decode blocks (fused.FusedBlocks) stage every RMSNorm-fused product's input (no prenormed ones):
    the fused step then equals the composed one but for summation order."""
    n = len(blocks.normed_qkv)
    blocks.normed_qkv, blocks.normed_gate_up, blocks.normed_head = [False] * n, [False] * n, False


def rounded(x, dtype: str) -> np.ndarray:
    """x rounded to the activation dtype (nearest even), as float32."""
    x = np.asarray(x, np.float32)
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    u = x.view(np.uint32)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def dequantized_q8(q, d) -> np.ndarray:
    return (q.astype(np.float32).reshape(*d.shape, 32) * d[..., None]).reshape(q.shape)


class Normed:
    """An rmsnorm output the GEMV after it quantizes in `mode` (x (n, d) fp32 residual, w (d,) the norm weight)."""

    def __init__(self, x, w, eps, mode: str, dtype: str):
        self.x, self.w, self.eps, self.mode, self.dtype = np.asarray(x, np.float32), np.asarray(w, np.float32), \
            np.float32(eps), mode, dtype

    def quantized(self) -> np.ndarray:
        inv = np.float32(1) / np.sqrt(np.mean(self.x * self.x, axis=-1, keepdims=True) + self.eps)
        if self.mode == "composed":
            q, d, _ = gemv.quantize_q8(rounded(self.x * inv * self.w, self.dtype))
            return dequantized_q8(q, d)
        q, d, _ = gemv.quantize_q8(self.x * self.w)
        return dequantized_q8(q, d * inv)


def emulate(backend, mode: str, dtype: str) -> None:
    """Make the CPU `backend` (one instance) quantize GEMV inputs as the CUDA decode step in `mode` does."""
    def q8_act(a):
        q, d, _ = gemv.quantize_q8(rounded(a, dtype))
        return dequantized_q8(q, d)

    def quantized(h):
        return h.quantized() if isinstance(h, Normed) else q8_act(h)

    norms = iter(range(1 << 30))  # layer 0's attention norm reads the embedding: composed in both modes

    backend.rmsnorm = lambda x, w, eps: Normed(x, w, eps, mode if next(norms) else "composed", dtype)
    backend.linear = lambda h, w: w.matmul_t(quantized(h))
    backend.linear_group = lambda h, ws: [w.matmul_t(quantized(h)) for w in ws]
    backend.add_linear = lambda x, a, w: x + w.matmul_t(q8_act(a))


def decode_difference(path, dtype: str, dca: str, prompt_len: int, token: int = 77) -> tuple[float, float]:
    """(logits, new cache rows) relative L2 difference between a one-token step in the two modes, after the same
    float32 prefill of prompt_len tokens, on the GGUF model at `path`."""
    import engine

    llm = engine.load(path, device="cpu", context=512, dca=dca)
    model, backend, c = llm.model, llm.backend, llm.config
    prompt = np.random.default_rng(6).integers(3, min(384, c.vocab_size), prompt_len)
    caches = [backend.new_cache(c.n_layers, 512, c.n_kv_heads, c.head_dim) for _ in range(2)]
    for cache in caches:
        model.forward(prompt, cache, logits_for="none")
    logits, rows = [], []
    for mode, cache in zip(("composed", "prenormed"), caches):
        emulate(backend, mode, dtype)
        logits.append(model.forward(np.array([token]), cache, logits_for="last"))
        rows.append(np.concatenate([cache.k[:, prompt_len].ravel(), cache.v[:, prompt_len].ravel()]))
        for name in ("rmsnorm", "linear", "linear_group", "add_linear"):
            del backend.__dict__[name]
    return rel(logits[1], logits[0]), rel(rows[1], rows[0])


def rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
