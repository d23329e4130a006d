"""The model's blocks for one-token steps, fused (kernels/gemv.cu, launched by gemv.py): ``CudaBackend.decode_blocks``.

``Llama.compute`` runs these instead of its own composed blocks when it steps one token:
  attention_block   qkv (RMSNorm + Q/K/V GEMV + key rotation + cache store), attention (the backend's:
                    split-K + combine, which also quantizes its output), gemv_add (output projection + residual,
                    in place, reading that quantized input)
  mlp_block         gate_up (RMSNorm + gate/up GEMV + SwiGLU, quantizing its output), gemv_add (down projection +
                    residual, reading it)
  head              head (final RMSNorm + output GEMV, fp32 logits)
The arithmetic is the composed blocks' (the one-token GEMVs of both read quantized weights against the
input quantized to int8 per 32, gemv.py), in the same order, so both give the same logits up to summation
order and the prenormed inputs' rounding (below); fusing cuts launches (6 per layer, not 16) and, where the
output and down projections read int8 input, their inputs are quantized once by the kernel that produces them,
not again in every block (gemv.py: staged inputs; the same values). The RMSNorm-fused products (qkv after the
first layer, gate_up, the head) read their int8 input from the gemv_add before them (gemv.py: prenormed inputs):
x times the norm weight quantized in fp32, not act_t(x * inv * w), so they differ from the composed blocks by that
rounding (tests/prenorm_emulation.py measures it). Activations (query, SwiGLU output, cache rows) are in the
backend's dtype (gemv.cu's dtype build); Q/K/V biases (qwen2) are added in the qkv kernel's
epilogue, rounded as the composed block's add_bias rounds them. A layer whose Q/K/V (or gate/up) are not
stored in one type, or a weight not kept on the device as a ``DeviceMatrix``, runs the composed block.
Self-Extend / StreamingLLM: the qkv kernel stores the key through the scheme's key tables and the attention is
the backend's for the scheme (extension.decode_attention, or its composed path: extension.py); the GEMVs are these.
With a q8_0 K or V cache (kv_q8.py) qkv stores the token's rows unrotated, in 16 bits, into a scratch (its
position slot pointing at row 0 and its rotation tables the identity: cos 1, sin 0), and the backend's store_kv
rotates, quantizes and writes them at the token's position (one launch more a layer), before attention reads them.
"""
from __future__ import annotations

import numpy as np

from . import gemv
from .extension import chunk_len_of, graph_ready
from .kv_q8 import is_q8
from .weights import DeviceMatrix


def _same_type(*matrices) -> bool:
    return all(isinstance(m, DeviceMatrix) for m in matrices) and len({m.ggml_type for m in matrices}) == 1


class FusedBlocks:
    def __init__(self, backend, model):
        self.backend, self.model = backend, model
        self.cp = backend.cp
        c = model.config
        self.eps = np.float32(c.norm_eps)
        layers = model.weights.layers
        self.fused_attention = [_same_type(l.attn_q, l.attn_k, l.attn_v) and isinstance(l.attn_output, DeviceMatrix)
                                for l in layers]
        self.fused_mlp = [_same_type(l.ffn_gate, l.ffn_up) and isinstance(l.ffn_down, DeviceMatrix) for l in layers]
        self.fused_head = isinstance(model.weights.output, DeviceMatrix)
        # the output / down projections' inputs quantized by their producers (dca_combine, gate_up): one buffer, used
        # in turn (staged_bytes of the wider input); not where a Self-Extend / StreamingLLM attention runs its
        # composed path (extension.graph_ready), which writes no staged output
        self.staged_o = [isinstance(l.attn_output, DeviceMatrix) and l.attn_output.ggml_type in gemv.INT8_TYPES
                         and c.head_dim % 32 == 0 and graph_ready(model) for l in layers]
        self.staged_down = [isinstance(l.ffn_down, DeviceMatrix) and l.ffn_down.ggml_type in gemv.INT8_TYPES
                            and c.ffn_dim % 32 == 0 for l in layers]
        self.staged = None
        if any(self.staged_o) or any(self.staged_down):
            with backend.activate():
                self.staged = self.cp.empty(gemv.staged_bytes(max(c.n_heads * c.head_dim, c.ffn_dim)), self.cp.uint8)
        # prenormed inputs (gemv.py Prenorm): where an RMSNorm-fused product reads int8 input (d % 32 == 0) and the
        # gemv_add before it runs fused in the same pipeline stage (these blocks' buffers), that gemv_add writes the
        # product's input, x times its norm weight quantized, and the partial sums of squares. normed_qkv[i]: layer
        # i's qkv reads it from layer i-1's down product (layer 0, and a stage's first layer, read x from elsewhere:
        # they stage); normed_gate_up[i]: layer i's gate_up from its output product; normed_head: the head from the
        # last layer's down product. Self-Extend / StreamingLLM change neither gemv_add nor qkv's input: these
        # apply there too.
        int8_input = c.d_model % 32 == 0
        stage_of = {i: s for s, stage in enumerate(model.stages) for i in stage.layers}
        self.normed_qkv = [i > 0 and self.fused_attention[i] and self.fused_mlp[i - 1]
                           and stage_of[i - 1] == stage_of[i] and l.attn_q.ggml_type in gemv.INT8_TYPES
                           and int8_input for i, l in enumerate(layers)]
        self.normed_gate_up = [self.fused_attention[i] and self.fused_mlp[i] and l.ffn_gate.ggml_type in gemv.INT8_TYPES
                               and int8_input for i, l in enumerate(layers)]
        self.normed_head = (self.fused_head and bool(layers) and self.fused_mlp[-1]
                            and stage_of[len(layers) - 1] == len(model.stages) - 1
                            and model.weights.output.ggml_type in gemv.INT8_TYPES and int8_input)
        # the prenorm buffers: staged (staged_bytes(d)) and partials (one a gemv_add block: at most one per 8 rows),
        # and gemv_add's counts of the 32-row groups that span blocks (zero between launches)
        self.normed = self.arrivals = None
        if any(self.normed_qkv) or any(self.normed_gate_up) or self.normed_head:
            with backend.activate():
                self.normed = (self.cp.empty(gemv.staged_bytes(c.d_model), self.cp.uint8),
                               self.cp.empty(-(-c.d_model // gemv.WARPS), self.cp.float32))
                self.arrivals = self.cp.zeros(-(-c.d_model // 32), self.cp.uint32)
        self._unrotated_store = None  # (position slot 0, cos 1, sin 0): qkv's store into the q8_0 scratch

    def prenorm(self, next_norm) -> gemv.Prenorm:
        """gemv_add's prenorm outputs into the buffers, for the product whose RMSNorm weight is next_norm."""
        return gemv.Prenorm(next_norm, *self.normed, self.arrivals)

    def prenormed(self) -> gemv.Prenormed:
        """The input those buffers hold, as its consumer reads it."""
        return gemv.Prenormed(*self.normed, gemv.prenorm_blocks(self.model.config.d_model))

    def attention_block(self, index: int, layer, x, positions, cache):
        """x (1, d) fp32 residual, updated in place; positions (1,) int32 device slot."""
        model, c = self.model, self.model.config
        if not self.fused_attention[index]:
            return model.attention_block(index, layer, x, positions, cache)
        layout = model.attention_layout  # DCA, a Self-Extend / StreamingLLM scheme, or None
        cos_t, sin_t = self.backend.key_tables(model.rotary, layout)
        rope_dim = model.rotary.rope.dim
        chunk_len = chunk_len_of(layout)
        dtype = self.backend.dtype
        q = self.cp.empty(c.n_heads * c.head_dim, dtype=self.backend.act)
        biases = None if layer.attn_q_bias is None else (layer.attn_q_bias, layer.attn_k_bias, layer.attn_v_bias)
        part, local = cache.layer(index)  # split: the stage's part of the cache and the layer's index there
        prenormed = self.prenormed() if self.normed_qkv[index] else None
        if is_q8(part.k) or is_q8(part.v):
            k_new, v_new = (self.cp.empty((1, c.n_kv_heads, c.head_dim), dtype=self.backend.act) for _ in range(2))
            gemv.qkv(x, layer.attn_norm, self.eps, layer.attn_q, layer.attn_k, layer.attn_v, biases, q, k_new, v_new,
                     *self.unrotated_store(), c.n_heads, c.n_kv_heads, c.head_dim, rope_dim, 0, dtype,
                     prenormed=prenormed)
            self.backend.store_kv(part, local, k_new, v_new, positions, model.rotary, layout)
        else:
            gemv.qkv(x, layer.attn_norm, self.eps, layer.attn_q, layer.attn_k, layer.attn_v, biases, q,
                     part.k[local], part.v[local], positions, cos_t, sin_t, c.n_heads, c.n_kv_heads, c.head_dim,
                     rope_dim, chunk_len, dtype, prenormed=prenormed)
        staged = self.staged if self.staged_o[index] else None
        attn = self.backend.attention(q.reshape(1, c.n_heads, c.head_dim), part, local, positions, model.rotary,
                                      layout, model.temperature_length, out_staged=staged)
        prenorm = self.prenorm(layer.ffn_norm) if self.normed_gate_up[index] else None
        gemv.gemv_add(attn.reshape(-1), layer.attn_output, x, dtype, staged=staged, prenorm=prenorm)
        return x

    def unrotated_store(self):
        """qkv's position slot and rotation tables that store the token's rows at row 0 as computed: (1,) int32 0,
        cos (1, head_dim/2) ones, sin zeros; made on the first q8_0 step (an eager one: graph.py)."""
        if self._unrotated_store is None:
            cp, half = self.cp, self.model.config.head_dim // 2
            self._unrotated_store = (cp.zeros(1, dtype=cp.int32), cp.ones((1, half), dtype=cp.float32),
                                     cp.zeros((1, half), dtype=cp.float32))
        return self._unrotated_store

    def mlp_block(self, index: int, layer, x):
        c = self.model.config
        if not self.fused_mlp[index]:
            return self.model.mlp_block(index, layer, x)
        dtype = self.backend.dtype
        gate_up = self.cp.empty(c.ffn_dim, dtype=self.backend.act)
        staged = self.staged if self.staged_down[index] else None
        gemv.gate_up(x, layer.ffn_norm, self.eps, layer.ffn_gate, layer.ffn_up, gate_up, dtype, out_staged=staged,
                     prenormed=self.prenormed() if self.normed_gate_up[index] else None)
        gemv.gemv_add(gate_up, layer.ffn_down, x, dtype, staged=staged, prenorm=self.next_prenorm(index))
        return x

    def next_prenorm(self, index: int) -> gemv.Prenorm | None:
        """The prenorm outputs of layer index's down product: the next layer's qkv input, or the head's after the
        last layer (None where that consumer stages its own)."""
        w = self.model.weights
        if index + 1 < len(w.layers):
            return self.prenorm(w.layers[index + 1].attn_norm) if self.normed_qkv[index + 1] else None
        return self.prenorm(w.output_norm) if self.normed_head else None

    def head(self, rows):
        """rows (1, d) fp32 -> (1, vocab) fp32 logits."""
        if not self.fused_head:
            return self.model.head(rows)
        w = self.model.weights
        logits = self.cp.empty((1, w.output.rows), dtype=self.cp.float32)
        gemv.head(rows, w.output_norm, self.eps, w.output, logits.reshape(-1), self.backend.dtype,
                  prenormed=self.prenormed() if self.normed_head else None)
        return logits
