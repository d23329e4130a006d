"""The model families the engine runs and what their files hold: per family, the one table of its tensors (engine
names, HF names, shapes) and the names that identify it, shared by the config parser, the loader, the converters,
the synthetic weights of ``engine bench`` and the tiny test models. Their forward pass is models/llama.py.

Engine names are llama.cpp's GGUF tensor names without the ``.weight`` suffix: ``token_embd``, ``blk.3.attn_q``,
``blk.3.attn_q.bias`` (a bias keeps its suffix, as in GGUF files).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str  # engine name: blk.N.<name> in a layer, <name> globally
    hf: str  # HF name: model.layers.N.<hf> in a layer, <hf> globally
    shape: Callable[["ModelConfig"], tuple[int, ...]]  # numpy shape: (out, in) for matrices, (n,) for vectors

    @property
    def field(self) -> str:
        """The attribute of the typed weights (models/llama.py Layer) that holds this tensor."""
        return self.name.replace(".", "_")


LLAMA_LAYER = (
    TensorSpec("attn_norm", "input_layernorm.weight", lambda c: (c.d_model,)),
    TensorSpec("attn_q", "self_attn.q_proj.weight", lambda c: (c.n_heads * c.head_dim, c.d_model)),
    TensorSpec("attn_k", "self_attn.k_proj.weight", lambda c: (c.n_kv_heads * c.head_dim, c.d_model)),
    TensorSpec("attn_v", "self_attn.v_proj.weight", lambda c: (c.n_kv_heads * c.head_dim, c.d_model)),
    TensorSpec("attn_output", "self_attn.o_proj.weight", lambda c: (c.d_model, c.n_heads * c.head_dim)),
    TensorSpec("ffn_norm", "post_attention_layernorm.weight", lambda c: (c.d_model,)),
    TensorSpec("ffn_gate", "mlp.gate_proj.weight", lambda c: (c.ffn_dim, c.d_model)),
    TensorSpec("ffn_up", "mlp.up_proj.weight", lambda c: (c.ffn_dim, c.d_model)),
    TensorSpec("ffn_down", "mlp.down_proj.weight", lambda c: (c.d_model, c.ffn_dim)),
)
QKV_BIASES = (
    TensorSpec("attn_q.bias", "self_attn.q_proj.bias", lambda c: (c.n_heads * c.head_dim,)),
    TensorSpec("attn_k.bias", "self_attn.k_proj.bias", lambda c: (c.n_kv_heads * c.head_dim,)),
    TensorSpec("attn_v.bias", "self_attn.v_proj.bias", lambda c: (c.n_kv_heads * c.head_dim,)),
)
GLOBAL_TENSORS = (
    TensorSpec("token_embd", "model.embed_tokens.weight", lambda c: (c.vocab_size, c.d_model)),
    TensorSpec("output_norm", "model.norm.weight", lambda c: (c.d_model,)),
    TensorSpec("output", "lm_head.weight", lambda c: (c.vocab_size, c.d_model)),  # absent: tied to token_embd
)
# HF buffers that hold no weights (old checkpoints saved the RoPE inverse frequencies)
HF_BUFFER_SUFFIXES = (".rotary_emb.inv_freq",)
# matrices that read the same input: a backend may store each group as one matrix (one product)
INPUT_GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


@dataclass(frozen=True)
class Family:
    name: str  # GGUF general.architecture (metadata keys <name>.*) and ModelConfig.architecture
    hf_architectures: tuple[str, ...]  # HF config.json `architectures` values
    hf_model_types: tuple[str, ...]  # HF config.json `model_type` values
    layer_tensors: tuple[TensorSpec, ...]
    # llama.cpp's converter permutes Q/K rows for its adjacent-pair RoPE (llama) or keeps HF's rotate-half
    # order (NEOX-style families such as qwen2)
    gguf_qk_permuted: bool

    def tensor_shapes(self, config: "ModelConfig", with_output: bool) -> dict[str, tuple[int, ...]]:
        """Every tensor's engine name -> shape, in llama.cpp's file order (output last, when not tied)."""
        shapes = {"token_embd": GLOBAL_TENSORS[0].shape(config)}
        for i in range(config.n_layers):
            shapes.update({f"blk.{i}.{t.name}": t.shape(config) for t in self.layer_tensors})
        shapes["output_norm"] = GLOBAL_TENSORS[1].shape(config)
        if with_output:
            shapes["output"] = GLOBAL_TENSORS[2].shape(config)
        return shapes

    def hf_name(self, name: str) -> str:
        """Engine name -> HF tensor name (``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
        if name.startswith("blk."):
            _, layer, short = name.split(".", 2)
            return f"model.layers.{layer}.{self._to_hf[short]}"
        return _GLOBAL_TO_HF[name]

    def engine_name(self, hf: str) -> str | None:
        """HF tensor name -> engine name, or None for a tensor this family does not use."""
        if hf in _GLOBAL_FROM_HF:
            return _GLOBAL_FROM_HF[hf]
        parts = hf.split(".", 3)  # model, layers, N, rest
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in self._from_hf:
            return f"blk.{parts[2]}.{self._from_hf[parts[3]]}"
        return None

    @property
    def _to_hf(self) -> dict[str, str]:
        return {t.name: t.hf for t in self.layer_tensors}

    @property
    def _from_hf(self) -> dict[str, str]:
        return {t.hf: t.name for t in self.layer_tensors}


def gguf_tensor_name(name: str) -> str:
    """Engine name -> the tensor's name in a GGUF file (weights add ``.weight``; biases are named as they are)."""
    return name if name.endswith(".bias") else f"{name}.weight"


def engine_tensor_name(gguf_name: str) -> str:
    return gguf_name.removesuffix(".weight")


_GLOBAL_TO_HF = {t.name: t.hf for t in GLOBAL_TENSORS}
_GLOBAL_FROM_HF = {t.hf: t.name for t in GLOBAL_TENSORS}

LLAMA = Family("llama", hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
               hf_model_types=("llama", "mistral"), layer_tensors=LLAMA_LAYER, gguf_qk_permuted=True)
# Qwen2 / Qwen2.5: the Llama graph with Q/K/V biases; llama.cpp runs it with NEOX (rotate-half) RoPE, so its
# GGUF Q/K rows are in HF order
QWEN2 = Family("qwen2", hf_architectures=("Qwen2ForCausalLM",), hf_model_types=("qwen2",),
               layer_tensors=LLAMA_LAYER + QKV_BIASES, gguf_qk_permuted=False)
FAMILIES = {f.name: f for f in (LLAMA, QWEN2)}


def family(name: str) -> Family:
    """The family of a GGUF general.architecture / ModelConfig.architecture (ConfigError when unknown)."""
    if name not in FAMILIES:
        from ..errors import ConfigError

        raise ConfigError(f"unsupported architecture {name!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_hf(config: dict) -> Family | None:
    """The family of an HF config.json (its `architectures`, else its `model_type`), or None."""
    for f in FAMILIES.values():
        if any(a in f.hf_architectures for a in config.get("architectures") or []):
            return f
    return next((f for f in FAMILIES.values() if config.get("model_type") in f.hf_model_types), None)
