"""One decode step (a single token) through the fused kernels of kernels/gemv.cu (launched by gemv.py).

Per layer: qkv (RMSNorm + Q/K/V GEMV + key rotation + cache store), attention (the backend's:
split-K + combine, two launches), gemv_add (output projection + residual), gate_up (RMSNorm +
gate/up GEMV + SwiGLU), gemv_add (down projection + residual); then head (final RMSNorm +
output GEMV, fp32).
The arithmetic is the unfused op set's, in the same order (see gemv.cu), so ``Llama.compute`` and
``FusedStep.compute`` give the same logits; the fused form only cuts launches (6 per layer, not 16).
Activations (query, SwiGLU output, cache rows) are in the backend's dtype (gemv.cu's dtype build).
Used by the graph decoder when every layer's Q/K/V share one stored type and gate/up share one
(``FusedStep.supported``); otherwise the decoder captures ``Llama.compute`` itself.
"""
from __future__ import annotations

import numpy as np

from . import gemv
from .weights import DeviceMatrix


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
    return isinstance(model.output, DeviceMatrix)


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
        x = self.backend.embedding(w["token_embd"], token).reshape(-1)  # (d,) fp32 residual
        dtype = self.backend.dtype
        q = cp.empty(c.n_heads * c.head_dim, dtype=self.backend.act)
        gate_up = cp.empty(c.ffn_dim, dtype=self.backend.act)
        for layer in range(c.n_layers):
            p = f"blk.{layer}."
            wq, wk, wv = w[p + "attn_q"], w[p + "attn_k"], w[p + "attn_v"]
            gemv.qkv(x, w[p + "attn_norm"], eps, wq, wk, wv, q, cache.k[layer], cache.v[layer], position, cos_t, sin_t,
                     c.n_heads, c.n_kv_heads, c.head_dim, rope_dim, chunk_len, dtype)
            attn = self.backend.attention(q.reshape(1, c.n_heads, c.head_dim), cache, layer, position, model.rotary,
                                          model.dca, model.temperature_length)
            gemv.gemv_add(attn.reshape(-1), w[p + "attn_output"], x, dtype)
            wg, wu = w[p + "ffn_gate"], w[p + "ffn_up"]
            gemv.gate_up(x, w[p + "ffn_norm"], eps, wg, wu, gate_up, dtype)
            gemv.gemv_add(gate_up, w[p + "ffn_down"], x, dtype)
        head = model.output
        logits = cp.empty((1, head.rows), dtype=cp.float32)
        gemv.head(x, w["output_norm"], eps, head, logits.reshape(-1), dtype)
        return logits
