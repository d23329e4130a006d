"""The model's blocks for one-token steps, fused (kernels/decode.cu): ``CudaBackend.decode_blocks``.

``Llama.compute`` runs these instead of its own composed blocks when it steps one token:
  attention_block   dec_qkv (RMSNorm + Q/K/V GEMV + key rotation + cache store), attention (the backend's:
                    split-K + combine), dec_gemv_add (output projection + residual, in place)
  mlp_block         dec_gateup (RMSNorm + gate/up GEMV + SwiGLU), dec_gemv_add (down projection + residual)
  head              dec_head (final RMSNorm + output GEMV, fp32 logits)
The arithmetic is the composed blocks', in the same order (see decode.cu), so both give the same
logits; fusing only cuts launches (6 per layer, not 16). Activations (query, SwiGLU output, cache rows)
are in the backend's dtype (decode.cu's dtype build). A layer whose Q/K/V (or gate/up) are not stored
in one type, a layer with Q/K/V biases (qwen2), or a weight not kept on the device as a ``DeviceMatrix``, runs
the composed block.
"""
from __future__ import annotations

import numpy as np

from .kernels import function
from .weights import DeviceMatrix

THREADS = 256  # decode.cu DEC_THREADS
WARPS = THREADS // 32
STATIC_SHARED_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without opting in: the staged input's bound


def _same_type(*matrices) -> bool:
    return all(isinstance(m, DeviceMatrix) for m in matrices) and len({m.ggml_type for m in matrices}) == 1


class FusedBlocks:
    def __init__(self, backend, model):
        self.backend, self.model = backend, model
        self.cp = backend.cp
        c = model.config
        self.eps = np.float32(c.norm_eps)
        layers = model.weights.layers
        fits = 4 * max(c.d_model, c.ffn_dim, c.n_heads * c.head_dim) <= STATIC_SHARED_LIMIT  # staged fp32 inputs
        self.fused_attention = [fits and _same_type(l.attn_q, l.attn_k, l.attn_v) and l.attn_q_bias is None
                                and isinstance(l.attn_output, DeviceMatrix) for l in layers]
        self.fused_mlp = [fits and _same_type(l.ffn_gate, l.ffn_up) and isinstance(l.ffn_down, DeviceMatrix)
                          for l in layers]
        self.fused_head = fits and isinstance(model.weights.output, DeviceMatrix)

    def attention_block(self, index: int, layer, x, positions, cache):
        """x (1, d) fp32 residual, updated in place; positions (1,) int32 device slot."""
        model, c = self.model, self.model.config
        if not self.fused_attention[index]:
            return model.attention_block(index, layer, x, positions, cache)
        cos_t, sin_t = self.backend.rotary_tables(model.rotary)
        rope_dim = model.rotary.rope.dim
        chunk_len = model.dca.chunk_len if model.dca is not None else 0
        d = c.d_model
        q = self.cp.empty(c.n_heads * c.head_dim, dtype=self.backend.act)
        n_tasks = c.n_heads * c.head_dim + c.n_kv_heads * (2 * c.head_dim - rope_dim // 2)
        wq, wk, wv = layer.attn_q, layer.attn_k, layer.attn_v
        function("decode", f"dec_qkv_{wq.suffix}", self.backend.dtype)(
            (self._blocks(n_tasks),), (THREADS,),
            (x, layer.attn_norm, self.eps, np.int32(d), wq.data, wk.data, wv.data, np.int64(wq.data.shape[1]),
             q, cache.k[index], cache.v[index], positions, cos_t, sin_t, np.int32(c.n_heads),
             np.int32(c.n_kv_heads), np.int32(c.head_dim), np.int32(rope_dim), np.int32(chunk_len)),
            shared_mem=4 * d)
        attn = self.backend.attention(q.reshape(1, c.n_heads, c.head_dim), cache, index, positions, model.rotary,
                                      model.dca, model.temperature_length)
        self._gemv_add(attn.reshape(-1), layer.attn_output, x)
        return x

    def mlp_block(self, index: int, layer, x):
        c = self.model.config
        if not self.fused_mlp[index]:
            return self.model.mlp_block(index, layer, x)
        gate_up = self.cp.empty(c.ffn_dim, dtype=self.backend.act)
        wg, wu = layer.ffn_gate, layer.ffn_up
        function("decode", f"dec_gateup_{wg.suffix}", self.backend.dtype)(
            (self._blocks(c.ffn_dim),), (THREADS,),
            (x, layer.ffn_norm, self.eps, np.int32(c.d_model), wg.data, wu.data, np.int64(wg.data.shape[1]),
             np.int32(c.ffn_dim), gate_up),
            shared_mem=4 * c.d_model)
        self._gemv_add(gate_up, layer.ffn_down, x)
        return x

    def head(self, rows):
        """rows (1, d) fp32 -> (1, vocab) fp32 logits."""
        if not self.fused_head:
            return self.model.head(rows)
        w = self.model.weights
        out = w.output
        logits = self.cp.empty((1, out.rows), dtype=self.cp.float32)
        function("decode", f"dec_head_{out.suffix}", self.backend.dtype)(
            (self._blocks(out.rows),), (THREADS,),
            (rows, w.output_norm, self.eps, np.int32(out.cols), out.data, np.int64(out.data.shape[1]),
             np.int32(out.rows), logits),
            shared_mem=4 * out.cols)
        return logits

    def _gemv_add(self, a, m: DeviceMatrix, x) -> None:
        """x[r] += m[r] . a (x fp32, updated in place; a in the activation dtype)."""
        function("decode", f"dec_gemv_add_{m.suffix}", self.backend.dtype)(
            (self._blocks(m.rows),), (THREADS,),
            (a, m.data, np.int64(m.data.shape[1]), np.int32(m.rows), np.int32(m.cols), x),
            shared_mem=4 * m.cols)

    @staticmethod
    def _blocks(tasks: int) -> int:
        return (tasks + WARPS - 1) // WARPS
