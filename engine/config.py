"""Model, RoPE and DCA configuration, built from GGUF metadata or an HF config.json.

All three are plain dataclasses; every constructor validates and raises ``ConfigError``
(or ``ModelFormatError`` for a model file that lacks a key) with a message naming the
offending value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import ConfigError, ModelFormatError
from .models.family import FAMILIES, LLAMA, family_of_hf

ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")



@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the model, with an optional context-extension scaling.

    scaling: none | linear (position interpolation) | ntk (static NTK-aware base change) |
             dynamic (NTK base recomputed from the context in use) | yarn | llama3
    factor:  context extension factor (new context / original_context)
    freq_factors: per-frequency divisors (llama3 `rope_freqs` tensor), shape (dim/2,)
    """

    theta: float = 10000.0
    dim: int = 128
    scaling: str = "none"
    factor: float = 1.0
    original_context: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attn_factor: float | None = None  # None: 0.1*ln(factor)+1, as in the YaRN paper
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    freq_factors: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.scaling not in ROPE_SCALINGS:
            raise ConfigError(f"unknown RoPE scaling {self.scaling!r} (choose from {', '.join(ROPE_SCALINGS)})")
        if not self.theta > 0:
            raise ConfigError(f"RoPE base must be positive, got {self.theta}")
        if self.dim <= 0 or self.dim % 2:
            raise ConfigError(f"RoPE dimension must be a positive even number, got {self.dim}")
        if not self.factor > 0:
            raise ConfigError(f"RoPE scale factor must be positive, got {self.factor}")
        if self.original_context <= 0:
            raise ConfigError(f"RoPE original context must be positive, got {self.original_context}")
        if self.freq_factors is not None and np.shape(self.freq_factors) != (self.dim // 2,):
            raise ConfigError(
                f"rope_freqs has shape {np.shape(self.freq_factors)}, expected ({self.dim // 2},)"
            )

    def with_scaling(self, scaling: str, factor: float | None = None) -> "RopeConfig":
        """The same rotary embedding with another scaling (CLI `--rope-scaling/--rope-scale`)."""
        return dataclasses.replace(self, scaling=scaling, factor=self.factor if factor is None else factor)


@dataclass(frozen=True)
class DCAConfig:
    """Dual Chunk Attention parameters (design.md §3).

    chunk_size (cs):    the largest relative position ever used; default 3L/4
    local_window (w):   default L/8
    chunk_len (cl):     cs - w; chunk(p) = p // cl
    temperature:        scale logits by 0.1*ln(n/L)+1 for n > L (off by default)
    """

    chunk_size: int
    local_window: int
    temperature: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.local_window < self.chunk_size:
            raise ConfigError(
                f"DCA needs 0 < local_window < chunk_size, got local_window={self.local_window}, "
                f"chunk_size={self.chunk_size}"
            )

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_window

    @classmethod
    def for_training_length(
        cls, training_length: int, chunk_size: int | None = None, local_window: int | None = None,
        temperature: bool = False,
    ) -> "DCAConfig":
        """Defaults from the training length L (cs = 3L/4, w = L/8), validated against L."""
        cfg = cls(
            chunk_size=3 * training_length // 4 if chunk_size is None else chunk_size,
            local_window=training_length // 8 if local_window is None else local_window,
            temperature=temperature,
        )
        cfg.check_against(training_length)
        return cfg

    def check_against(self, training_length: int) -> None:
        if self.chunk_size > training_length:
            raise ConfigError(
                f"DCA chunk_size {self.chunk_size} exceeds the model's training context {training_length}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family model. Weight matrices are (out, in) row-major inside the engine."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    context_length: int  # the training context L
    rope: RopeConfig
    tied_embeddings: bool = False
    name: str = ""
    architecture: str = LLAMA.name  # the family (models/family.py)
    # the model's own DCA settings (Qwen2.5-1M's config.json dual_chunk_attention_config; GGUF engine.dca.*): used
    # by --dca auto, and then context_length (max_position_embeddings) bounds the context
    dca: DCAConfig | None = None
    # the model's own L of the attention temperature 0.1*ln(n/L)+1 (dual_chunk_attention_config's
    # original_max_position_embeddings; GGUF engine.dca.original_context): with its DCA in use the temperature is
    # on by default, as vLLM's DCA backend applies it
    temperature_length: int | None = None
    # DCA settings chosen for this model by `engine eval tune-dca` (GGUF engine.dca.tuned_*): DCA's defaults in
    # place of 3L/4, L/8 -- used where DCA is on without explicit sizes; unlike `dca`, they do not turn DCA on
    tuned_dca: DCAConfig | None = None
    # sliding-window attention (Mistral 7B v0.1's sliding_window): not implemented, so contexts beyond it are refused
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                    "context_length"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.rope.dim > self.head_dim:
            raise ConfigError(f"model config: RoPE dimension {self.rope.dim} exceeds head_dim {self.head_dim}")

    @property
    def n_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any], source: str = "GGUF file") -> "ModelConfig":
        arch = md.get("general.architecture")
        if arch not in FAMILIES:
            raise ModelFormatError(f"{source}: unsupported architecture {arch!r} (supported: {', '.join(FAMILIES)})")

        def get(key: str, default: Any = None, required: bool = True) -> Any:
            full = f"{arch}.{key}"
            if full in md:
                return md[full]
            if required and default is None:
                raise ModelFormatError(f"{source}: missing metadata key {full!r}")
            return default

        d_model = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        if n_heads <= 0 or d_model % n_heads:
            raise ModelFormatError(f"{source}: embedding_length {d_model} is not divisible by head_count {n_heads}")
        head_dim = int(get("attention.key_length", d_model // n_heads))
        scaling_type = str(get("rope.scaling.type", "none"))
        if scaling_type not in ("none", "linear", "yarn"):
            raise ModelFormatError(f"{source}: unsupported rope.scaling.type {scaling_type!r}")
        context_length = int(get("context_length"))
        rope = RopeConfig(
            theta=float(get("rope.freq_base", 10000.0)),
            dim=int(get("rope.dimension_count", head_dim)),
            scaling=scaling_type,
            factor=float(get("rope.scaling.factor", 1.0)),
            original_context=int(get("rope.scaling.original_context_length", context_length)),
        )
        vocab = md.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelFormatError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
            vocab = len(tokens)
        return cls(
            n_layers=int(get("block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")),
            vocab_size=int(vocab),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=context_length,
            rope=rope,
            name=str(md.get("general.name", "")),
            architecture=arch,
            dca=_dca_from_gguf(md, source),
            temperature_length=_positive_or_none(md.get(GGUF_DCA_ORIGINAL_CONTEXT), GGUF_DCA_ORIGINAL_CONTEXT, source),
            tuned_dca=_tuned_dca_from_gguf(md, source),
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        fam = family_of_hf(cfg)
        if fam is None:
            supported = [a for f in FAMILIES.values() for a in f.hf_architectures]
            raise ModelFormatError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r} "
                f"(supported: {', '.join(supported)})"
            )

        def get(key: str, default: Any = None) -> Any:
            if key in cfg and cfg[key] is not None:
                return cfg[key]
            if default is None:
                raise ModelFormatError(f"{source}: missing key {key!r}")
            return default

        d_model = int(get("hidden_size"))
        n_heads = int(get("num_attention_heads"))
        if n_heads <= 0 or d_model % n_heads:
            raise ModelFormatError(f"{source}: hidden_size {d_model} is not divisible by num_attention_heads {n_heads}")
        head_dim = int(get("head_dim", d_model // n_heads))
        context_length = int(get("max_position_embeddings"))
        rope = _rope_from_hf(cfg, head_dim, context_length, source)
        return cls(
            n_layers=int(get("num_hidden_layers")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(get("num_key_value_heads", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
            norm_eps=float(get("rms_norm_eps", 1e-6)),
            context_length=context_length,
            rope=rope,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            name=str(cfg.get("_name_or_path", "")),
            architecture=fam.name,
            dca=_dca_from_hf(cfg.get("dual_chunk_attention_config"), source),
            temperature_length=_positive_or_none((cfg.get("dual_chunk_attention_config") or {}).get(
                "original_max_position_embeddings"), "dual_chunk_attention_config.original_max_position_embeddings",
                source),
            sliding_window=_sliding_window_from_hf(cfg),
        )


def _sliding_window_from_hf(cfg: dict) -> int | None:
    """config.json's sliding_window where the model's own code applies it: Mistral always (its code has no switch),
    Qwen2 only with use_sliding_window (false by default in Qwen2Config)."""
    if not cfg.get("sliding_window"):
        return None
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return int(cfg["sliding_window"])


# GGUF metadata keys of this engine for a model's own DCA settings (llama.cpp has none)
GGUF_DCA_CHUNK_SIZE = "engine.dca.chunk_size"
GGUF_DCA_LOCAL_WINDOW = "engine.dca.local_window"
GGUF_DCA_ORIGINAL_CONTEXT = "engine.dca.original_context"
GGUF_DCA_TUNED_CHUNK_SIZE = "engine.dca.tuned_chunk_size"
GGUF_DCA_TUNED_LOCAL_WINDOW = "engine.dca.tuned_local_window"


def _positive_or_none(value: Any, key: str, source: str) -> int | None:
    """A positive whole number, or None for absent / 0 (vLLM reads 0 as "no temperature")."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or int(value) != value:
        raise ModelFormatError(f"{source}: {key} must be a positive whole number, got {value!r}")
    return int(value)


def _dca_from_hf(dca: Any, source: str) -> DCAConfig | None:
    """config.json's dual_chunk_attention_config -> DCAConfig. Its chunk_size and local_size follow ChunkLlama's
    convention, as vLLM's DCA backend reads them (chunk_len = chunk_size - local_size): chunk_size is our
    chunk_size, local_size our local_window."""
    if not dca:
        return None
    if not isinstance(dca, Mapping) or "chunk_size" not in dca or "local_size" not in dca:
        raise ModelFormatError(f"{source}: dual_chunk_attention_config needs chunk_size and local_size, got {dca!r}")
    try:
        return DCAConfig(chunk_size=int(dca["chunk_size"]), local_window=int(dca["local_size"]))
    except ConfigError as exc:
        raise ModelFormatError(f"{source}: dual_chunk_attention_config: {exc}") from exc


def _tuned_dca_from_gguf(md: Mapping[str, Any], source: str) -> DCAConfig | None:
    if GGUF_DCA_TUNED_CHUNK_SIZE not in md and GGUF_DCA_TUNED_LOCAL_WINDOW not in md:
        return None
    try:
        return DCAConfig(chunk_size=int(md[GGUF_DCA_TUNED_CHUNK_SIZE]), local_window=int(md[GGUF_DCA_TUNED_LOCAL_WINDOW]))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ModelFormatError(f"{source}: bad tuned DCA settings ({GGUF_DCA_TUNED_CHUNK_SIZE}, "
                               f"{GGUF_DCA_TUNED_LOCAL_WINDOW}): {exc}") from None


def _dca_from_gguf(md: Mapping[str, Any], source: str) -> DCAConfig | None:
    if GGUF_DCA_CHUNK_SIZE not in md:
        return None
    return _dca_from_hf({"chunk_size": md[GGUF_DCA_CHUNK_SIZE], "local_size": md.get(GGUF_DCA_LOCAL_WINDOW)}, source)


def _rope_from_hf(cfg: Mapping[str, Any], head_dim: int, context_length: int, source: str) -> RopeConfig:
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "none")) if scaling else "none"
    kinds = {"default": "none", "none": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
             "llama3": "llama3"}
    if kind not in kinds:
        raise ModelFormatError(f"{source}: unsupported rope_scaling type {kind!r}")
    kind = kinds[kind]
    factor = float(scaling.get("factor", 1.0))
    original = int(scaling.get("original_max_position_embeddings",
                               context_length if kind in ("none", "linear", "dynamic") else 0) or 0)
    if kind == "yarn" and not original:
        original = int(context_length / factor)
    if not original:
        original = context_length
    return RopeConfig(
        theta=theta,
        dim=head_dim,
        scaling=kind,
        factor=factor,
        original_context=original,
        yarn_beta_fast=float(scaling.get("beta_fast", 32.0)),
        yarn_beta_slow=float(scaling.get("beta_slow", 1.0)),
        yarn_attn_factor=scaling.get("attention_factor"),
        llama3_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        llama3_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
    )
