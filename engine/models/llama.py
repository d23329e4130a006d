"""The Llama graph: its typed weights and its forward pass, written once.

Per layer (x: (n, d) residual stream, n new tokens at positions start .. start+n-1):
    attention block   h = rmsnorm(x) ; q, k, v = h Wq^T, h Wk^T, h Wv^T   (n, Hq, hd), (n, Hkv, hd), (n, Hkv, hd)
                      cache <- rotate(k at the layout's cached key positions: DCA, Self-Extend, ...), v
                      x += attention(q, cache, positions) Wo^T            queries rotated inside attention
    MLP block         h = rmsnorm(x) ; x += (silu(h Wg^T) * h Wu^T) Wd^T
Then the head: logits = rmsnorm(x) Wout^T for the rows asked for (Wout = token_embd when tied).

Families that differ from it only by optional tensors (qwen2's Q/K/V biases: ``add_bias`` after the QKV
product) run this same class; every family's tensor table is in family.py.

The blocks below are the definition, composed from the backend's primitive ops (backends/__init__.py).
A backend may run a block fused: ``backend.decode_blocks(model)`` returns an object with the same three
block methods for one-token steps (the CUDA backend's fused decode kernels), or the model itself;
``backend.prefill_blocks(model)`` likewise for prompts (the CUDA backend's: the same ops, their shared host work
done once a forward).

Split by layer (engine/pipeline.py), the model runs as stages, each a backend with a contiguous range of layers
and its part of the cache: ``compute`` walks the layers once and hands x to the next stage's backend where one
begins; every block runs on its layer's backend. Unsplit, the model is one stage of every layer.

``forward`` does the host bookkeeping (room in the cache, positions, commit); ``compute`` is only
backend ops on backend arrays, so a GPU backend can capture it as a graph for a fixed shape.

Several sequences in one forward (``forward_batch``, vLLM's varlen batches; the server's batched decode
steps): the rows of x are the new tokens of several sequences one after another, each sequence a ``Segment``
(its cache, its first row, its positions in that cache). Norms, products and the MLP run over all rows at
once (the weights are read once for the whole batch); ``store_kv`` and ``attention`` run per segment, each
on its own cache. A backend declares the capability (``batched_decode``): the numpy backend's ops take any
rows; the CUDA backend's fused decode blocks and graphs serve one sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import ConfigError, ContextError
from ..pipeline import Stage
from .family import LLAMA, Family, family

if TYPE_CHECKING:
    from ..config import DCAConfig, ModelConfig
    from ..kvcache import KVCache
    from ..rope import RotaryTable
    from ..tiled_attention import PositionScheme

@dataclass(frozen=True)
class Segment:
    """One sequence's rows in a batch: x[first:first + len(positions)] are its new tokens, at `positions` of
    its own cache."""

    cache: "KVCache"
    first: int
    positions: Any  # (n,) backend int array

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + self.positions.shape[0])


@dataclass
class Layer:
    """One transformer layer's weights, as the backend prepared them (fields: the table's TensorSpec.field)."""

    attn_norm: Any  # (d,)
    attn_q: Any  # (Hq*hd, d)
    attn_k: Any  # (Hkv*hd, d)
    attn_v: Any  # (Hkv*hd, d)
    attn_output: Any  # (d, Hq*hd)
    ffn_norm: Any  # (d,)
    ffn_gate: Any  # (ffn, d)
    ffn_up: Any  # (ffn, d)
    ffn_down: Any  # (d, ffn)
    attn_q_bias: Any = None  # (Hq*hd,): families with Q/K/V biases (qwen2)
    attn_k_bias: Any = None  # (Hkv*hd,)
    attn_v_bias: Any = None  # (Hkv*hd,)


@dataclass
class Weights:
    token_embd: Any  # (vocab, d)
    layers: list[Layer]
    output_norm: Any  # (d,)
    output: Any  # (vocab, d): the head (token_embd itself when tied)

    @classmethod
    def from_named(cls, named: dict[str, Any], n_layers: int, family: Family = LLAMA) -> "Weights":
        """The backend's prepared weights, keyed by engine name -> typed weights."""
        layers = [Layer(**{t.field: named[f"blk.{i}.{t.name}"] for t in family.layer_tensors})
                  for i in range(n_layers)]
        return cls(named["token_embd"], layers, named["output_norm"], named.get("output", named["token_embd"]))


class Llama:
    def __init__(self, config: "ModelConfig", weights: dict[str, Any], backend: Any, rotary: "RotaryTable",
                 dca: "DCAConfig | None", temperature_length: int | None = None,
                 extension: "PositionScheme | None" = None, stages: Sequence[Stage] | None = None):
        """weights: the backend's prepared weights by engine name (``backend.prepare_weights``; split: every
        stage's, each prepared by its own backend). extension: Self-Extend or StreamingLLM attention instead of
        DCA (dca must then be None). stages: the layer split (None: one stage of every layer on `backend`,
        which is otherwise the first stage's: it takes the tokens)."""
        self.config = config
        self.weights = Weights.from_named(weights, config.n_layers, family(config.architecture))
        self.backend = backend
        self.rotary = rotary
        self.dca = dca
        self.extension = extension
        self.attention_layout = dca if extension is None else extension  # what store_kv and attention follow
        # L of the attention temperature: logits of queries past L are scaled by 0.1*ln(n/L)+1 when set
        self.temperature_length = temperature_length
        self.stages = list(stages) if stages is not None else [Stage(backend, range(config.n_layers))]
        self.layer_backends = [stage.backend for stage in self.stages for _ in stage.layers]  # per layer
        self.head_backend = self.stages[-1].backend  # where the logits are
        for stage in self.stages:
            stage.blocks = stage.backend.decode_blocks(self)  # the blocks for one-token steps (fused or these)
            stage.prompt_blocks = stage.backend.prefill_blocks(self)  # for prompts (these, or a backend's own)

    @property
    def decode_blocks(self) -> Any:
        """The one-token blocks of an unsplit model (its one stage's)."""
        return self.stages[0].blocks

    @decode_blocks.setter
    def decode_blocks(self, blocks: Any) -> None:
        self.stages[0].blocks = blocks

    def forward(self, tokens: np.ndarray, cache: "KVCache", logits_for: str = "all") -> Any:
        """Run n new tokens through the model, appending them to the cache.

        tokens: (n,) int ids; logits_for: "all" -> (n, vocab), "last" -> (1, vocab), "none" -> None,
        "hidden" -> the (n, d) final residual stream, for ``head`` to turn into logits a slab of rows at a time.
        """
        n = len(tokens)
        cache.check_room(n)
        ops = self.backend
        logits = self.compute(ops.tokens(tokens), ops.positions(cache.length, n), cache, logits_for)
        cache.commit(n)
        return logits

    def forward_batch(self, tokens: Sequence[Sequence[int]], caches: Sequence["KVCache"]) -> Any:
        """Run several sequences' new tokens as one batch, each appended to its own cache (all different).

        tokens[i]: (n_i,) ids of sequence i, at least one -> (B, vocab) logits of each sequence's last token.
        Every cache's room is checked before any work (a ContextError naming the sequence leaves all caches as
        they were). One sequence runs ``forward`` itself (the same path and results as alone).
        """
        if len(tokens) != len(caches) or not tokens:
            raise ConfigError(f"a batch needs one cache per sequence, got {len(tokens)} sequence(s) and "
                              f"{len(caches)} cache(s)")
        if len({id(cache) for cache in caches}) != len(caches):
            raise ConfigError("a batch holds each cache once: two sequences cannot append to the same cache")
        if any(len(ids) == 0 for ids in tokens):
            raise ConfigError("every sequence of a batch needs at least one new token")
        for i, (ids, cache) in enumerate(zip(tokens, caches)):
            try:
                cache.check_room(len(ids))
            except ContextError as e:
                raise ContextError(f"sequence {i} of the batch: {e}") from None
        if len(tokens) == 1:
            return self.forward(np.asarray(tokens[0]), caches[0], logits_for="last")
        ops = self.backend
        segments, first = [], 0
        for ids, cache in zip(tokens, caches):
            segments.append(Segment(cache, first, ops.positions(cache.length, len(ids))))
            first += len(ids)
        logits = self.compute_batch(ops.tokens(np.concatenate([np.asarray(ids) for ids in tokens])), segments)
        for ids, cache in zip(tokens, caches):
            cache.commit(len(ids))
        return logits

    def compute(self, tokens: Any, positions: Any, cache: "KVCache", logits_for: str) -> Any:
        """tokens, positions: (n,) int arrays of the first stage's backend; writes the cache rows at `positions`."""
        one_token = tokens.shape[0] == 1
        with self.stages[0].activate():
            x = self.backend.embedding(self.weights.token_embd, tokens)  # (n, d)
        for i, stage in enumerate(self.stages):
            with stage.activate():
                if i:  # the handover: x and positions onto this stage's backend
                    x, positions = stage.backend.receive(x), stage.backend.receive(positions)
                blocks = stage.blocks if one_token else stage.prompt_blocks
                for index in stage.layers:
                    layer = self.weights.layers[index]
                    x = blocks.attention_block(index, layer, x, positions, cache)
                    x = blocks.mlp_block(index, layer, x)
        if logits_for == "none":
            return None
        if logits_for == "hidden":
            return x
        with self.stages[-1].activate():
            return blocks.head(x[-1:] if logits_for == "last" else x)  # the last stage's blocks

    def compute_batch(self, tokens: Any, segments: Sequence[Segment]) -> Any:
        """tokens: (N,) backend int array, the segments' rows one after another -> (B, vocab) logits of each
        segment's last row; writes each segment's cache rows at its positions. On a backend with
        ``batched_decode`` (numpy), its stages sharing the host: x moves on as it is."""
        x = self.backend.embedding(self.weights.token_embd, tokens)  # (N, d)
        for index, layer in enumerate(self.weights.layers):
            x = self.attention_block(index, layer, x, None, segments)
            x = self.mlp_block(index, layer, x)
        return self.head(x[[s.rows.stop - 1 for s in segments]])  # (B, d) -> (B, vocab)

    # ------------------------------------------------------------------- the blocks, from primitive ops
    def attention_block(self, index: int, layer: Layer, x: Any, positions: Any,
                        cache: "KVCache | Sequence[Segment]") -> Any:
        """x (n, d) -> x + attention output; writes layer `index`'s cache rows at `positions`.
        Rows of several sequences (compute_batch): positions None, cache their segments."""
        c, ops = self.config, self.layer_backends[index]
        n = x.shape[0]
        h = ops.rmsnorm(x, layer.attn_norm, c.norm_eps)
        q, k, v = ops.linear_group(h, [layer.attn_q, layer.attn_k, layer.attn_v])
        if layer.attn_q_bias is not None:
            q, k, v = (ops.add_bias(y, b) for y, b in zip((q, k, v), (layer.attn_q_bias, layer.attn_k_bias,
                                                                      layer.attn_v_bias)))
        q = q.reshape(n, c.n_heads, c.head_dim)
        k = k.reshape(n, c.n_kv_heads, c.head_dim)
        v = v.reshape(n, c.n_kv_heads, c.head_dim)
        attn = self.cached_attention(index, q, k, v, positions, cache)  # (n, Hq, hd)
        return ops.add_linear(x, attn.reshape(n, c.n_heads * c.head_dim), layer.attn_output)

    def cached_attention(self, index: int, q: Any, k: Any, v: Any, positions: Any,
                         cache: "KVCache | Sequence[Segment]") -> Any:
        """Store layer `index`'s k, v (n, Hkv, hd) in the cache and attend q (n, Hq, hd) -> (n, Hq, hd).
        positions None: the rows are the segments' (several sequences), each stored and attended on its own cache."""
        ops = self.layer_backends[index]
        if positions is None:
            return ops.concat_rows([self.cached_attention(index, q[s.rows], k[s.rows], v[s.rows], s.positions,
                                                          s.cache) for s in cache])
        part, local = cache.layer(index)  # split: the stage's part of the cache and the layer's index there
        ops.store_kv(part, local, k, v, positions, self.rotary, self.attention_layout)
        return ops.attention(q, part, local, positions, self.rotary, self.attention_layout, self.temperature_length)

    def mlp_block(self, index: int, layer: Layer, x: Any) -> Any:
        """x (n, d) -> x + SwiGLU MLP output."""
        ops = self.layer_backends[index]
        h = ops.rmsnorm(x, layer.ffn_norm, self.config.norm_eps)
        gate, up = ops.linear_group(h, [layer.ffn_gate, layer.ffn_up])
        return ops.add_linear(x, ops.swiglu(gate, up), layer.ffn_down)

    def head(self, rows: Any) -> Any:
        """rows (m, d) of the residual stream -> (m, vocab) logits, on the last stage."""
        ops = self.head_backend
        with self.stages[-1].activate():
            return ops.linear(ops.rmsnorm(rows, self.weights.output_norm, self.config.norm_eps), self.weights.output)
