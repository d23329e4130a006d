"""The model's blocks for prompts (n > 1 tokens), the host work every layer shares done once a forward:
``CudaBackend.prefill_blocks``.

A short prompt of a small model is bound by the host, not the GPU (docs/results.md, session 25: a 512-token prompt
at Llama-3.2-1B shapes spent ~240 us of host time a layer, of which the 4 GEMMs and 5 kernels launched take ~80 and
the ops' wrappers the rest: allocations, views, checks, launch configurations). These blocks run the composed
blocks' ops -- the same kernels and GEMMs with the same arguments, so the same outputs bit for bit -- but what the
layers of one forward share is made once, at its first layer, in a ``Pass``: the work buffers (the normed inputs;
the q+k+v product and its q / k / v views, or with Q/K/V biases (qwen2) the biased copies; the attention output;
the gate+up product and its halves; the SwiGLU output), the attention launch (flash_attention.PrefillLaunch:
kernel, grid, key splits, scalars) and the other kernels' scalar arguments. A layer then launches with its own
weights, biases and cache rows.

A layer runs the model's own blocks where these do not apply: Q/K/V or gate/up not one fused matrix, a q8_0 K or V
cache (its rows are dequantized for attention: kv_q8.py), a Self-Extend / StreamingLLM scheme (extension.py), a
head shape the fused attention kernels lack (flash_attention.unsupported_reason), an fp32 output matrix, or GEMMs
without cuBLAS GemmEx. A pass ends with its forward's last layer: its buffers go back to CuPy's pool as the
composed blocks' would, and nothing holds the cache or the positions after it.
"""
from __future__ import annotations

import numpy as np

from . import ELEMENTWISE_THREADS, NORM_ROWS_PER_BLOCK
from . import flash_attention as flash
from .kernels import function
from .kv_q8 import is_q8
from .weights import DeviceMatrix, fused_whole


def _whole(parts):
    """The fused matrix the DeviceMatrix parts are the row ranges of, or None."""
    return fused_whole(parts) if all(isinstance(p, DeviceMatrix) for p in parts) else None


class Pass:
    """What the layers of one forward (n tokens at cache rows start ..) share: buffers, views and launch settings."""

    def __init__(self, blocks: "PrefillBlocks", n: int, start: int, positions, cache):
        backend, model, c = blocks.backend, blocks.model, blocks.model.config
        cp, act, dtype = backend.cp, backend.act, backend.dtype
        self.n, self.start, self.cache = n, start, cache
        d, q_cols, kv_cols, f = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim
        self.normed, self.normed_mlp = cp.empty((n, d), dtype=act), cp.empty((n, d), dtype=act)
        self.qkv = cp.empty((n, q_cols + 2 * kv_cols), dtype=act)
        columns = (self.qkv[:, :q_cols], self.qkv[:, q_cols:q_cols + kv_cols], self.qkv[:, q_cols + kv_cols:])
        self.biased = blocks.biases
        if self.biased:  # Q/K/V biases (qwen2): add_bias, each column range + its bias into a contiguous array
            self.bias_fn = function("elementwise", "add_bias", dtype)
            outputs = tuple(cp.empty((n, part.shape[1]), dtype=act) for part in columns)
            # per launch: its grid and the arguments before and after the bias (y, y's row stride | out, n, cols)
            self.bias_launches = [(((n * part.shape[1] + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS,),
                                   (part, np.int64(self.qkv.shape[1])), (out, np.int32(n), np.int32(part.shape[1])))
                                  for part, out in zip(columns, outputs)]
            columns = outputs
        self.q = columns[0].reshape(n, c.n_heads, c.head_dim)
        self.k = columns[1].reshape(n, c.n_kv_heads, c.head_dim)
        self.v = columns[2].reshape(n, c.n_kv_heads, c.head_dim)
        q_stride, kv_stride = self.q.strides[0] // 2, self.k.strides[0] // 2  # elements between rows
        self.attn = cp.empty((n, c.n_heads, c.head_dim), dtype=act)
        self.attn_rows = self.attn.reshape(n, q_cols)
        self.gate_up = cp.empty((n, 2 * f), dtype=act)
        self.swiglu = cp.empty((n, f), dtype=act)
        self.positions = positions
        # rmsnorm: (x, w, out, n, d, eps, x is activations, 16-byte rows) -- x is the fp32 residual
        self.norm = function("elementwise", "rmsnorm", dtype)
        self.norm_grid = ((n + NORM_ROWS_PER_BLOCK - 1) // NORM_ROWS_PER_BLOCK,)
        self.norm_scalars = (np.int32(n), np.int32(d), np.float32(c.norm_eps), np.int32(0))
        # store_kv_vec8 from the k / v views (rows of the q+k+v product or of the biased copies: 16-byte aligned)
        rope_dim = model.rotary.rope.dim
        self.tables = backend.rotary_tables(model.rotary)
        self.store = function("elementwise", "store_kv_vec8", dtype)
        per_head = (2 * c.head_dim - rope_dim // 2) // 8
        self.store_grid = ((n * c.n_kv_heads * per_head + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS,)
        dca = model.dca
        self.store_head = (self.k, np.int64(kv_stride), self.v, np.int64(kv_stride), positions, *self.tables)
        self.store_scalars = (np.int32(n), np.int32(c.n_kv_heads), np.int32(c.head_dim), np.int32(rope_dim),
                              np.int32(0 if dca is None else dca.chunk_len))
        self.attention = flash.prefill_launch(cp, n, c.n_heads, c.n_kv_heads, c.head_dim, q_stride,
                                              rope_dim, dca, model.temperature_length or 0, dtype,
                                              n_keys_hint=start + n)
        rows = n * c.n_heads
        self.partials = flash.split_partials(cp, self.attention.n_splits, rows, c.head_dim)
        # swiglu: (gate, up, out, n, f, stride, 16-byte vectors) over the halves of the gate+up product
        self.gate, self.up = self.gate_up[:, :f], self.gate_up[:, f:]
        vec8 = f % 8 == 0  # the halves start 16-byte aligned and their rows 2f elements apart
        self.swiglu_fn = function("elementwise", "swiglu", dtype)
        self.swiglu_grid = ((n * (f // 8 if vec8 else f) + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS,)
        self.swiglu_args = (self.gate, self.up, self.swiglu, np.int32(n), np.int32(f), np.int64(2 * f),
                            np.int32(vec8))


class PrefillBlocks:
    def __init__(self, backend, model):
        self.backend, self.model = backend, model
        self.cp = backend.cp
        c = model.config
        attention_fits = (model.extension is None and flash.unsupported_reason(
            c.head_dim, model.rotary.rope.dim, c.n_heads, c.n_kv_heads) is None)
        layers = model.weights.layers
        self.biases = bool(layers) and layers[0].attn_q_bias is not None  # the family's (qwen2: every layer)
        self.qkv_whole = [_whole([l.attn_q, l.attn_k, l.attn_v]) if attention_fits
                          and (l.attn_q_bias is not None) == self.biases and isinstance(l.attn_output, DeviceMatrix)
                          and not l.attn_output.f32_out else None for l in layers]
        self.gate_up_whole = [_whole([l.ffn_gate, l.ffn_up]) if isinstance(l.ffn_down, DeviceMatrix)
                              and not l.ffn_down.f32_out else None for l in layers]
        # the last layer of each stage this backend runs: its pass ends there (buffers back to the pool, no
        # reference to the cache or the positions kept past the forward)
        self.last_layers = {stage.layers[-1] for stage in model.stages if stage.backend is backend and stage.layers}
        self._pass: Pass | None = None

    def _runs(self, x) -> bool:
        """These blocks serve x: the fp32 residual of n > 1 rows, updated in place, and GEMMs through GemmEx."""
        return (x.dtype == self.cp.float32 and x.flags.c_contiguous and x.shape[0] > 1
                and self.backend.matrices.gemm_path == "cublasGemmEx")

    def _pass_for(self, n: int, positions, part) -> Pass:
        """The pass of this forward, made at its first layer: the kept one while the token count, the cache rows,
        the positions array and the cache part are the same (every layer of one forward)."""
        p = self._pass
        if p is None or p.n != n or p.start != part.length or p.positions is not positions or p.cache is not part:
            self._pass = None  # its buffers back to the pool before the next pass takes its own
            self._pass = p = Pass(self, n, part.length, positions, part)
        return p

    def attention_block(self, index: int, layer, x, positions, cache):
        """x (n, d) fp32 residual, updated in place; writes layer `index`'s cache rows at `positions`."""
        model = self.model
        whole = self.qkv_whole[index]
        part, local = cache.layer(index)
        if whole is None or is_q8(part.k) or is_q8(part.v) or not self._runs(x):
            return model.attention_block(index, layer, x, positions, cache)
        p = self._pass_for(x.shape[0], positions, part)
        matrices = self.backend.matrices
        p.norm(p.norm_grid, (NORM_ROWS_PER_BLOCK * 32,), (x, layer.attn_norm, p.normed) + p.norm_scalars
               + (np.int32(x.data.ptr % 16 == 0 and x.shape[1] % 4 == 0),))
        matrices.gemm_into(p.normed, whole, p.qkv)
        if p.biased:
            for (grid, head, tail), bias in zip(p.bias_launches, (layer.attn_q_bias, layer.attn_k_bias,
                                                                   layer.attn_v_bias)):
                p.bias_fn(grid, (ELEMENTWISE_THREADS,), head + (bias,) + tail)
        k_cache, v_cache = part.k[local], part.v[local]
        p.store(p.store_grid, (ELEMENTWISE_THREADS,), p.store_head + (k_cache, v_cache) + p.store_scalars)
        p.attention.launch(p.q, k_cache, v_cache, p.positions, *p.tables, p.attn, p.partials)
        if p.attention.n_splits > 1:
            c = model.config
            flash.combine(*p.partials, p.attn, x.shape[0] * c.n_heads, c.head_dim, p.attention.n_splits,
                          self.backend.dtype)
        matrices.gemm_into(p.attn_rows, layer.attn_output, x, accumulate=True)
        return x

    def mlp_block(self, index: int, layer, x):
        """x (n, d) fp32 residual, updated in place (gate+up, SwiGLU, down)."""
        p = self._pass
        if index in self.last_layers:
            self._pass = None  # the forward's last layer here (its buffers stay alive until this block returns)
        whole = self.gate_up_whole[index]
        if whole is None or not self._runs(x) or p is None or p.n != x.shape[0]:
            return self.model.mlp_block(index, layer, x)  # (the buffers depend on n only: this forward's pass serves)
        matrices = self.backend.matrices
        p.norm(p.norm_grid, (NORM_ROWS_PER_BLOCK * 32,), (x, layer.ffn_norm, p.normed_mlp) + p.norm_scalars
               + (np.int32(x.data.ptr % 16 == 0 and x.shape[1] % 4 == 0),))
        matrices.gemm_into(p.normed_mlp, whole, p.gate_up)
        p.swiglu_fn(p.swiglu_grid, (ELEMENTWISE_THREADS,), p.swiglu_args)
        matrices.gemm_into(p.swiglu, layer.ffn_down, x, accumulate=True)
        return x

    def head(self, rows):
        return self.model.head(rows)
