"""The Llama family: its tensors, its typed weights, and its forward pass, each written once.

Per layer (x: (n, d) residual stream, n new tokens at positions start .. start+n-1):
    attention block   h = rmsnorm(x) ; q, k, v = h Wq^T, h Wk^T, h Wv^T   (n, Hq, hd), (n, Hkv, hd), (n, Hkv, hd)
                      cache <- rotate(k at DCA key positions), v
                      x += attention(q, cache, positions) Wo^T            queries rotated inside attention
    MLP block         h = rmsnorm(x) ; x += (silu(h Wg^T) * h Wu^T) Wd^T
Then the head: logits = rmsnorm(x) Wout^T for the rows asked for (Wout = token_embd when tied).

The blocks below are the definition, composed from the backend's primitive ops (backends/__init__.py).
A backend may run a block fused: ``backend.decode_blocks(model)`` returns an object with the same three
block methods for one-token steps (the CUDA backend's fused decode kernels), or the model itself.

``forward`` does the host bookkeeping (room in the cache, positions, commit); ``compute`` is only
backend ops on backend arrays, so a GPU backend can capture it as a graph for a fixed shape.

The tensor table (``LAYER_TENSORS``, ``GLOBAL_TENSORS``) is the one list of this family's weights: GGUF
short names (the engine's own names), HF names, shapes. The loader, the converters, the synthetic
weights of ``engine bench`` and the tiny test models all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    from ..config import DCAConfig, ModelConfig
    from ..kvcache import KVCache
    from ..rope import RotaryTable

GGUF_ARCHITECTURE = "llama"  # general.architecture; metadata keys are llama.*
# HF config.json `architectures` / `model_type` values whose weights are this graph
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
HF_MODEL_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class TensorSpec:
    name: str  # GGUF short name: blk.N.<name> in a layer, <name> globally (files add ".weight")
    hf: str  # HF name without ".weight": model.layers.N.<hf> in a layer, <hf> globally
    shape: Callable[["ModelConfig"], tuple[int, ...]]  # numpy shape: (out, in) for matrices, (n,) for vectors


LAYER_TENSORS = (
    TensorSpec("attn_norm", "input_layernorm", lambda c: (c.d_model,)),
    TensorSpec("attn_q", "self_attn.q_proj", lambda c: (c.n_heads * c.head_dim, c.d_model)),
    TensorSpec("attn_k", "self_attn.k_proj", lambda c: (c.n_kv_heads * c.head_dim, c.d_model)),
    TensorSpec("attn_v", "self_attn.v_proj", lambda c: (c.n_kv_heads * c.head_dim, c.d_model)),
    TensorSpec("attn_output", "self_attn.o_proj", lambda c: (c.d_model, c.n_heads * c.head_dim)),
    TensorSpec("ffn_norm", "post_attention_layernorm", lambda c: (c.d_model,)),
    TensorSpec("ffn_gate", "mlp.gate_proj", lambda c: (c.ffn_dim, c.d_model)),
    TensorSpec("ffn_up", "mlp.up_proj", lambda c: (c.ffn_dim, c.d_model)),
    TensorSpec("ffn_down", "mlp.down_proj", lambda c: (c.d_model, c.ffn_dim)),
)
GLOBAL_TENSORS = (
    TensorSpec("token_embd", "model.embed_tokens", lambda c: (c.vocab_size, c.d_model)),
    TensorSpec("output_norm", "model.norm", lambda c: (c.d_model,)),
    TensorSpec("output", "lm_head", lambda c: (c.vocab_size, c.d_model)),  # absent: tied to token_embd
)
# HF buffers that hold no weights (old checkpoints saved the RoPE inverse frequencies)
HF_BUFFER_SUFFIXES = (".rotary_emb.inv_freq",)
# matrices that read the same input: a backend may store each group as one matrix (one product)
INPUT_GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def tensor_shapes(config: "ModelConfig", with_output: bool) -> dict[str, tuple[int, ...]]:
    """Every weight's engine name -> shape, in llama.cpp's file order (output last, when not tied)."""
    shapes = {"token_embd": GLOBAL_TENSORS[0].shape(config)}
    for i in range(config.n_layers):
        shapes.update({f"blk.{i}.{t.name}": t.shape(config) for t in LAYER_TENSORS})
    shapes["output_norm"] = GLOBAL_TENSORS[1].shape(config)
    if with_output:
        shapes["output"] = GLOBAL_TENSORS[2].shape(config)
    return shapes


def hf_name(name: str) -> str:
    """Engine name -> HF tensor name (``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if name.startswith("blk."):
        _, layer, short = name.split(".")
        return f"model.layers.{layer}.{_HF_LAYER[short]}.weight"
    return f"{_HF_GLOBAL[name]}.weight"


def engine_name(hf: str) -> str | None:
    """HF tensor name -> engine name, or None for a tensor this family does not use."""
    stem = hf.removesuffix(".weight")
    if stem in _FROM_HF_GLOBAL:
        return _FROM_HF_GLOBAL[stem]
    parts = stem.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _FROM_HF_LAYER:
        return f"blk.{parts[2]}.{_FROM_HF_LAYER[parts[3]]}"
    return None


_HF_LAYER = {t.name: t.hf for t in LAYER_TENSORS}
_HF_GLOBAL = {t.name: t.hf for t in GLOBAL_TENSORS}
_FROM_HF_LAYER = {t.hf: t.name for t in LAYER_TENSORS}
_FROM_HF_GLOBAL = {t.hf: t.name for t in GLOBAL_TENSORS}


@dataclass
class Layer:
    """One transformer layer's weights, as the backend prepared them (fields named as LAYER_TENSORS)."""

    attn_norm: Any  # (d,)
    attn_q: Any  # (Hq*hd, d)
    attn_k: Any  # (Hkv*hd, d)
    attn_v: Any  # (Hkv*hd, d)
    attn_output: Any  # (d, Hq*hd)
    ffn_norm: Any  # (d,)
    ffn_gate: Any  # (ffn, d)
    ffn_up: Any  # (ffn, d)
    ffn_down: Any  # (d, ffn)


@dataclass
class Weights:
    token_embd: Any  # (vocab, d)
    layers: list[Layer]
    output_norm: Any  # (d,)
    output: Any  # (vocab, d): the head (token_embd itself when tied)

    @classmethod
    def from_named(cls, named: dict[str, Any], n_layers: int) -> "Weights":
        """The backend's prepared weights, keyed by engine name -> typed weights."""
        layers = [Layer(**{t.name: named[f"blk.{i}.{t.name}"] for t in LAYER_TENSORS}) for i in range(n_layers)]
        return cls(named["token_embd"], layers, named["output_norm"], named.get("output", named["token_embd"]))


class Llama:
    def __init__(self, config: "ModelConfig", weights: dict[str, Any], backend: Any, rotary: "RotaryTable",
                 dca: "DCAConfig | None", attention_temperature: bool = False):
        """weights: the backend's prepared weights by engine name (``backend.prepare_weights``)."""
        self.config = config
        self.weights = Weights.from_named(weights, config.n_layers)
        self.backend = backend
        self.rotary = rotary
        self.dca = dca
        # logits of queries past the training context are scaled by 0.1*ln(n/L)+1 when set
        self.temperature_length = config.context_length if attention_temperature else None
        self.decode_blocks = backend.decode_blocks(self)  # the blocks for one-token steps (fused or these)

    def forward(self, tokens: np.ndarray, cache: "KVCache", logits_for: str = "all") -> Any:
        """Run n new tokens through the model, appending them to the cache.

        tokens: (n,) int ids; logits_for: "all" -> (n, vocab), "last" -> (1, vocab), "none" -> None.
        """
        n = len(tokens)
        cache.check_room(n)
        ops = self.backend
        logits = self.compute(ops.tokens(tokens), ops.positions(cache.length, n), cache, logits_for)
        cache.commit(n)
        return logits

    def compute(self, tokens: Any, positions: Any, cache: "KVCache", logits_for: str) -> Any:
        """tokens, positions: (n,) backend int arrays; writes the cache rows at `positions`."""
        blocks = self.decode_blocks if tokens.shape[0] == 1 else self
        x = self.backend.embedding(self.weights.token_embd, tokens)  # (n, d)
        for index, layer in enumerate(self.weights.layers):
            x = blocks.attention_block(index, layer, x, positions, cache)
            x = blocks.mlp_block(index, layer, x)
        if logits_for == "none":
            return None
        return blocks.head(x[-1:] if logits_for == "last" else x)

    # ------------------------------------------------------------------- the blocks, from primitive ops
    def attention_block(self, index: int, layer: Layer, x: Any, positions: Any, cache: "KVCache") -> Any:
        """x (n, d) -> x + attention output; writes layer `index`'s cache rows at `positions`."""
        c, ops = self.config, self.backend
        n = x.shape[0]
        h = ops.rmsnorm(x, layer.attn_norm, c.norm_eps)
        q, k, v = ops.linear_group(h, [layer.attn_q, layer.attn_k, layer.attn_v])
        q = q.reshape(n, c.n_heads, c.head_dim)
        k = k.reshape(n, c.n_kv_heads, c.head_dim)
        v = v.reshape(n, c.n_kv_heads, c.head_dim)
        ops.store_kv(cache, index, k, v, positions, self.rotary, self.dca)
        attn = ops.attention(q, cache, index, positions, self.rotary, self.dca, self.temperature_length)
        return ops.add_linear(x, attn.reshape(n, c.n_heads * c.head_dim), layer.attn_output)

    def mlp_block(self, index: int, layer: Layer, x: Any) -> Any:
        """x (n, d) -> x + SwiGLU MLP output."""
        ops = self.backend
        h = ops.rmsnorm(x, layer.ffn_norm, self.config.norm_eps)
        gate, up = ops.linear_group(h, [layer.ffn_gate, layer.ffn_up])
        return ops.add_linear(x, ops.swiglu(gate, up), layer.ffn_down)

    def head(self, rows: Any) -> Any:
        """rows (m, d) of the residual stream -> (m, vocab) logits."""
        ops = self.backend
        return ops.linear(ops.rmsnorm(rows, self.weights.output_norm, self.config.norm_eps), self.weights.output)
