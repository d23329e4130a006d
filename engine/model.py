"""The Llama forward pass, written once against a backend's op set.

Per layer (x: (n, d) residual stream, n new tokens at positions start .. start+n-1):
    h = rmsnorm(x) ; q, k, v = h Wq^T, h Wk^T, h Wv^T        (n, Hq, hd), (n, Hkv, hd), (n, Hkv, hd)
                                                              (one linear_group: a backend may fuse them)
    cache <- rotate(k at DCA key positions), v
    x += attention(q, cache, positions) Wo^T                  queries rotated inside attention, per relation
    h = rmsnorm(x) ; x += (silu(h Wg^T) * h Wu^T) Wd^T
Then logits = rmsnorm(x) Wout^T for the rows asked for (Wout = token_embd when tied).

``forward`` does the host bookkeeping (room in the cache, positions, commit); ``compute`` is only
backend ops on backend arrays, so a GPU backend can capture it as a graph for a fixed shape.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .config import DCAConfig, ModelConfig
from .kvcache import KVCache
from .rope import RotaryTable


class Llama:
    def __init__(self, config: ModelConfig, weights: dict[str, Any], backend: Any, rotary: RotaryTable,
                 dca: DCAConfig | None, attention_temperature: bool = False):
        self.config = config
        self.w = weights
        self.backend = backend
        self.rotary = rotary
        self.dca = dca
        # logits of queries past the training context are scaled by 0.1*ln(n/L)+1 when set
        self.temperature_length = config.context_length if attention_temperature else None
        self.output = weights["token_embd"] if config.tied_embeddings else weights["output"]

    def forward(self, tokens: np.ndarray, cache: KVCache, logits_for: str = "all") -> Any:
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

    def compute(self, tokens: Any, positions: Any, cache: KVCache, logits_for: str) -> Any:
        """tokens, positions: (n,) backend int arrays; writes the cache rows at `positions`."""
        c, ops = self.config, self.backend
        n = tokens.shape[0]
        x = ops.embedding(self.w["token_embd"], tokens)  # (n, d)
        for layer in range(c.n_layers):
            p = f"blk.{layer}."
            h = ops.rmsnorm(x, self.w[p + "attn_norm"], c.norm_eps)
            q, k, v = ops.linear_group(h, [self.w[p + "attn_q"], self.w[p + "attn_k"], self.w[p + "attn_v"]])
            q = q.reshape(n, c.n_heads, c.head_dim)
            k = k.reshape(n, c.n_kv_heads, c.head_dim)
            v = v.reshape(n, c.n_kv_heads, c.head_dim)
            ops.store_kv(cache, layer, k, v, positions, self.rotary, self.dca)
            attn = ops.attention(q, cache, layer, positions, self.rotary, self.dca,
                                 self.temperature_length)  # (n, Hq, hd)
            x = ops.add_linear(x, attn.reshape(n, c.n_heads * c.head_dim), self.w[p + "attn_output"])
            h = ops.rmsnorm(x, self.w[p + "ffn_norm"], c.norm_eps)
            gate, up = ops.linear_group(h, [self.w[p + "ffn_gate"], self.w[p + "ffn_up"]])
            x = ops.add_linear(x, ops.swiglu(gate, up), self.w[p + "ffn_down"])
        if logits_for == "none":
            return None
        if logits_for == "hidden":
            return x
        return self.head(x[-1:] if logits_for == "last" else x)

    def head(self, x: Any) -> Any:
        """Final norm and output head: (n, d) residual rows -> (n, vocab) logits."""
        return self.backend.linear(self.backend.rmsnorm(x, self.w["output_norm"], self.config.norm_eps), self.output)
