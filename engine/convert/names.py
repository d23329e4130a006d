"""Tensor names of a Llama checkpoint: GGUF (llama.cpp) and HF (LlamaForCausalLM), in file order.

GGUF short names are the engine's weight names (``blk.N.attn_q``); files add ``.weight``.
"""
from __future__ import annotations

from ..loader import HF_GLOBAL_NAMES, HF_LAYER_NAMES

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_GGUF_TO_HF = {**{gguf: hf for hf, gguf in HF_GLOBAL_NAMES.items()},
               **{gguf: hf for hf, gguf in HF_LAYER_NAMES.items()}}
# HF buffers that hold no weights (old checkpoints saved the RoPE inverse frequencies)
HF_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def gguf_short_names(n_layers: int, has_output: bool) -> list[str]:
    """token_embd, the layers' tensors, output_norm and (unless tied) output, as llama.cpp orders them."""
    names = ["token_embd"]
    names += [f"blk.{layer}.{kind}" for layer in range(n_layers) for kind in LAYER_TENSORS]
    return names + ["output_norm"] + (["output"] if has_output else [])


def hf_name(short: str) -> str:
    """GGUF short name -> HF tensor name (``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if short.startswith("blk."):
        _, layer, kind = short.split(".")
        return f"model.layers.{layer}.{_GGUF_TO_HF[kind]}.weight"
    return f"{_GGUF_TO_HF[short]}.weight"
