"""A numpy emulation, on the CPU backend, of the two ways a one-token step can quantize an RMSNorm-fused GEMV's
input (tests/test_prenorm_emulation.py measures their difference; tests/test_cuda_model.py's fused-step tolerance
comes from it):
  composed   q8(act_t(x * inv * w)): the composed blocks' rmsnorm output, rounded to the activation type, then
             quantized per 32 by the GEMV (and the fused kernels' own staging)
  prenormed  q8(x * w) in fp32 with scales times inv = rsqrt(mean(x^2) + eps) (gemv.py prenorm_outputs /
             prenormed_q8: what gemv_add's prenorm epilogue and its consumer compute)
Every other product reads q8(act_t(a)) in both modes; the rest of the step is the CPU backend's float32 (the same in
both). Each GEMV is gemv.reference's arithmetic: x_hat @ W^T on the dequantized weights, where a type with per-block
offsets (Q4_1 m, Q4_K -dmin*m) takes them times the input's exact block sums, not x_hat's (the kernels' xs): in
prenormed mode sum(x * w) * inv in fp32, in composed mode the sums of the act_t values."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from engine.backends.cuda import gemv
from engine.weights.quant import GGMLType

# The fused decode step's distance from the composed one where the RMSNorm-fused products read prenormed inputs.
# Measured with this emulation (tests/test_prenorm_emulation.py; tiny models of test_cuda_model.py, DCA off and on,
# 100 / 300 prompt tokens, f16 and bf16): q4_0, q8_0, q6_k, tied q8_0: logits 1.2e-2 .. 2.3e-2, the new cache rows
# 1.4e-3 .. 1.1e-2; the q8_0 models of test_cuda_extensions (d64) and test_cuda_kv_q8 (d32, d64, d128; d_model
# 128-256): logits 1.2e-2 .. 2.2e-2, rows <= 1.1e-2. Types with per-block offsets (q4_1, q4_k) move more: logits
# 2.8e-2 .. 5.3e-2, rows 8.1e-3 .. 4.1e-2 (the offsets take the exact block sums, so a flipped int8 value acts on
# the offset-free part of the weights, about twice the centred weights' size). The GPU agrees (H100, session 11:
# q4_1 / q4_k logits 2.3e-2 .. 5.3e-2, rows up to 2.6e-2; the others 1.3e-2 .. 2.1e-2). Neither rounding is the
# better one: each mode's step is as far from the unquantized float step as the other's (the emulation's test). The
# int8 input's own error on these models is as large: with d = 64 one flipped int8 value moves its product by ~2.5e-3
# (a step of max|v|/127 against the vector's norm), and later layers carry it on. Tolerance: about 1.7x the largest
# measured, plus the fused step's own summation-order distance (test_cuda_model.py FUSED_TOL: 1e-3 / 3e-3).
PRENORMED_TOL = {"logits": 4e-2, "rows": 2e-2}
PRENORMED_TOL_OFFSETS = {"logits": 9e-2, "rows": 7e-2}  # models whose weights are Q4_1 / Q4_K


# A decode step's logits against the CPU's: the GPU's one-token GEMVs read their input quantized to int8 per 32
# (gemv.py, as llama.cpp's mmvq), the CPU's read floats. On the tiny test models that alone moves a step's logits by
# 1.2-2.4% from the CPU's (measured on the CPU: the numpy backend's one-row products fed their input quantized so, f16
# and q8_0 caches alike; the H100 gave 1.9-3.1% for test_cuda_kv_q8's q8_0 pairs, 1.4-1.9% for test_cuda_extensions'
# Self-Extend / StreamingLLM steps in f16), where a prefill's stay within test_cuda_model.py's LOGITS_TOL.
DECODE_STEP_TOL = {"f16": 4e-2, "bf16": 5e-2}


def prenormed_tol(ggml_type) -> dict[str, float]:
    """The tolerance of a model whose RMSNorm-fused products have weights of this type."""
    return PRENORMED_TOL_OFFSETS if GGMLType(ggml_type) in (GGMLType.Q4_1, GGMLType.Q4_K) else PRENORMED_TOL


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
        return self.q8()[0]

    def q8(self) -> tuple[np.ndarray, np.ndarray]:
        """(x_hat (n, d): the int8 values times their scales, exact block sums (n, d/32)) as the GEMV reads them."""
        inv = np.float32(1) / np.sqrt(np.mean(self.x * self.x, axis=-1, keepdims=True) + self.eps)
        if self.mode == "composed":
            q, d, sums = gemv.quantize_q8(rounded(self.x * inv * self.w, self.dtype))
            return dequantized_q8(q, d), sums
        q, d, sums = gemv.quantize_q8(self.x * self.w)
        return dequantized_q8(q, d * inv), sums * inv


def emulate(backend, mode: str, dtype: str) -> None:
    """Make the CPU `backend` (one instance) quantize GEMV inputs as the CUDA decode step in `mode` does."""
    def q8_act(a):
        q, d, sums = gemv.quantize_q8(rounded(a, dtype))
        return dequantized_q8(q, d), sums

    offsets_of: dict[int, np.ndarray | None] = {}  # id(host matrix) -> its block offsets, decoded once

    def product(q8, w):
        """gemv.reference's product of an input (x_hat, exact block sums) with the host matrix w."""
        x_hat, sums = q8
        out = w.matmul_t(x_hat)
        if id(w) not in offsets_of:
            offsets_of[id(w)] = block_offsets(w)
        offsets = offsets_of[id(w)]
        if offsets is None:
            return out
        hat_sums = x_hat.reshape(*x_hat.shape[:-1], -1, 32).sum(axis=-1, dtype=np.float64)
        return out + ((sums - hat_sums) @ offsets.T).astype(np.float32)

    def quantized(h):
        return h.q8() if isinstance(h, Normed) else q8_act(h)

    norms = iter(range(1 << 30))  # layer 0's attention norm reads the embedding: composed in both modes

    backend.rmsnorm = lambda x, w, eps: Normed(x, w, eps, mode if next(norms) else "composed", dtype)
    backend.linear = lambda h, w: product(quantized(h), w)
    backend.linear_group = lambda h, ws: [product(quantized(h), w) for w in ws]
    backend.add_linear = lambda x, a, w: x + product(q8_act(a), w)


def block_offsets(w) -> np.ndarray | None:
    """(rows, cols/32) float64 per-block offsets of a host matrix (gemv._block_offsets), None for other types."""
    tensor = SimpleNamespace(raw=w._stored.reshape(-1), ggml_type=w.ggml_type, shape=w.shape)
    offsets = gemv._block_offsets(tensor)
    return None if offsets is None else offsets.astype(np.float64)


def decode_steps(path, dtype: str, dca: str, prompt_len: int, modes=("composed", "prenormed"),
                 token: int = 77) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """mode -> (logits, new cache rows) of a one-token step after the same float32 prefill of prompt_len tokens, on
    the GGUF model at `path`: "composed" / "prenormed" emulated, "float" the CPU backend's unquantized inputs."""
    import engine

    llm = engine.load(path, device="cpu", context=512, dca=dca)
    model, backend, c = llm.model, llm.backend, llm.config
    prompt = np.random.default_rng(6).integers(3, min(384, c.vocab_size), prompt_len)
    steps = {}
    for mode in modes:
        cache = backend.new_cache(c.n_layers, 512, c.n_kv_heads, c.head_dim)
        model.forward(prompt, cache, logits_for="none")
        if mode != "float":
            emulate(backend, mode, dtype)
        logits = model.forward(np.array([token]), cache, logits_for="last")
        steps[mode] = logits, np.concatenate([cache.k[:, prompt_len].ravel(), cache.v[:, prompt_len].ravel()])
        for name in ("rmsnorm", "linear", "linear_group", "add_linear"):
            backend.__dict__.pop(name, None)
    return steps


def decode_difference(path, dtype: str, dca: str, prompt_len: int) -> tuple[float, float]:
    """(logits, new cache rows) relative L2 difference between the prenormed and the composed one-token step."""
    steps = decode_steps(path, dtype, dca, prompt_len)
    return tuple(rel(got, ref) for got, ref in zip(steps["prenormed"], steps["composed"]))


def rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
