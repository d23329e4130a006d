"""One decode step (a single token) through the fused kernels of kernels/decode.cu.

Per layer: dec_qkv (RMSNorm + Q/K/V GEMV + key rotation + cache store), attention (the backend's:
split-K + combine, two launches), dec_gemv_add (output projection + residual), dec_gateup (RMSNorm +
gate/up GEMV + SwiGLU), dec_gemv_add (down projection + residual); then dec_head (final RMSNorm +
output GEMV, fp32).
The arithmetic is the unfused op set's, in the same order (see decode.cu), so ``Llama.compute`` and
``FusedStep.compute`` give the same logits; the fused form only cuts launches (6 per layer, not 16).
Activations (query, SwiGLU output, cache rows) are in the backend's dtype (decode.cu's dtype build).
Used by the graph decoder when every layer's Q/K/V share one stored type and gate/up share one
(``FusedStep.supported``); otherwise the decoder captures ``Llama.compute`` itself.
"""
from __future__ import annotations

import numpy as np

from .kernels import function
from .weights import DeviceMatrix

THREADS = 256  # decode.cu DEC_THREADS
WARPS = THREADS // 32


def supported(model) -> bool:
    w, c = model.w, model.config
    for layer in range(c.n_layers):
        p = f"blk.{layer}."
        mats = [w.get(p + s) for s in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
        if not all(isinstance(m, DeviceMatrix) for m in mats):
            return False
        q, k, v, _, gate, up, _ = mats
        if len({q.ggml_type, k.ggml_type, v.ggml_type}) != 1 or gate.ggml_type != up.ggml_type:
            return False
    return isinstance(model.output, DeviceMatrix) and 4 * max(c.d_model, c.ffn_dim) <= 48 * 1024


class FusedStep:
    def __init__(self, backend, model):
        self.backend, self.model = backend, model
        self.cp = backend.cp

    def compute(self, token, position, cache):
        """token, position: (1,) int32 device slots -> logits (1, vocab) fp32; writes the cache row."""
        cp, model, c = self.cp, self.model, self.model.config
        w = model.w
        cos_t, sin_t = self.backend.rotary_tables(model.rotary)
        rope_dim = model.rotary.rope.dim
        chunk_len = model.dca.chunk_len if model.dca is not None else 0
        eps = np.float32(c.norm_eps)
        d = c.d_model
        x = self.backend.embedding(w["token_embd"], token).reshape(-1)  # (d,) fp32 residual
        dtype = self.backend.dtype
        q = cp.empty(c.n_heads * c.head_dim, dtype=self.backend.act)
        gate_up = cp.empty(c.ffn_dim, dtype=self.backend.act)
        n_tasks = c.n_heads * c.head_dim + c.n_kv_heads * (2 * c.head_dim - rope_dim // 2)
        for layer in range(c.n_layers):
            p = f"blk.{layer}."
            wq, wk, wv = w[p + "attn_q"], w[p + "attn_k"], w[p + "attn_v"]
            function("decode", f"dec_qkv_{wq.suffix}", dtype)(
                (self._blocks(n_tasks),), (THREADS,),
                (x, w[p + "attn_norm"], eps, np.int32(d), wq.data, wk.data, wv.data, np.int64(wq.data.shape[1]),
                 q, cache.k[layer], cache.v[layer], position, cos_t, sin_t, np.int32(c.n_heads),
                 np.int32(c.n_kv_heads), np.int32(c.head_dim), np.int32(rope_dim), np.int32(chunk_len)),
                shared_mem=4 * d)
            attn = self.backend.attention(q.reshape(1, c.n_heads, c.head_dim), cache, layer, position, model.rotary,
                                          model.dca, model.temperature_length)
            self._gemv_add(attn.reshape(-1), w[p + "attn_output"], x)
            wg, wu = w[p + "ffn_gate"], w[p + "ffn_up"]
            function("decode", f"dec_gateup_{wg.suffix}", dtype)(
                (self._blocks(c.ffn_dim),), (THREADS,),
                (x, w[p + "ffn_norm"], eps, np.int32(d), wg.data, wu.data, np.int64(wg.data.shape[1]),
                 np.int32(c.ffn_dim), gate_up),
                shared_mem=4 * d)
            self._gemv_add(gate_up, w[p + "ffn_down"], x)
        head = model.output
        logits = cp.empty((1, head.rows), dtype=cp.float32)
        function("decode", f"dec_head_{head.suffix}", dtype)(
            (self._blocks(head.rows),), (THREADS,),
            (x, w["output_norm"], eps, np.int32(d), head.data, np.int64(head.data.shape[1]), np.int32(head.rows),
             logits),
            shared_mem=4 * d)
        return logits

    def _gemv_add(self, a, m: DeviceMatrix, x) -> None:
        function("decode", f"dec_gemv_add_{m.suffix}", self.backend.dtype)(
            (self._blocks(m.rows),), (THREADS,),
            (a, m.data, np.int64(m.data.shape[1]), np.int32(m.rows), np.int32(m.cols), x),
            shared_mem=4 * m.cols)

    @staticmethod
    def _blocks(tasks: int) -> int:
        return (tasks + WARPS - 1) // WARPS
