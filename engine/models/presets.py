"""Real models' shapes, for benchmarks and memory plans without downloading the models: ``engine bench --shape``
(random weights of these shapes) and ``engine bench --shape NAME --save-gguf FILE`` (the same weights as a GGUF
file that llama.cpp reads too). Values from the models' config.json files; every width is a multiple of 256
(Q4_K's super-block)."""
from __future__ import annotations

from ..config import ModelConfig, RopeConfig
from ..errors import ConfigError


def _preset(name: str, layers: int, d: int, heads: int, kv: int, ffn: int, vocab: int, context: int, theta: float,
            tied: bool = False, head_dim: int | None = None, architecture: str = "llama") -> ModelConfig:
    hd = head_dim or d // heads
    return ModelConfig(n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv, head_dim=hd, ffn_dim=ffn,
                       vocab_size=vocab, norm_eps=1e-5, context_length=context,
                       rope=RopeConfig(theta=theta, dim=hd, original_context=context), tied_embeddings=tied,
                       name=f"{name} shapes (random weights)", architecture=architecture)


PRESETS = {
    "llama3.2-1b": _preset("llama3.2-1b", 16, 2048, 32, 8, 8192, 128256, 131072, 500000.0, tied=True),
    "llama2-7b": _preset("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 10000.0),
    "llama3-8b": _preset("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0),
    "llama3-70b": _preset("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, 500000.0),
    "qwen2.5-7b": _preset("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, 32768, 1000000.0, architecture="qwen2"),
    "qwen2.5-14b": _preset("qwen2.5-14b", 48, 5120, 40, 8, 13824, 152064, 32768, 1000000.0, architecture="qwen2"),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown shape {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]
