"""Golden RoPE inverse frequencies and attention factors from HF transformers.

Writes tests/golden/rope_hf.npz, read by tests/test_rope.py:
  cases              JSON list of {"name", "rope": RopeConfig kwargs, "context": int | null}
  inv_freq/<name>    (dim/2,) float64, from transformers' ROPE_INIT_FUNCTIONS (float32 math there)
  attention/<name>   () float64, the factor multiplying cos and sin

Static NTK has no HF init function; its golden is HF's default RoPE with the base replaced by
theta * factor ** (dim/(dim-2)), the definition of static NTK-aware scaling.

Usage: python tools/golden_rope.py [--out tests/golden/rope_hf.npz]   (needs torch + transformers)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def hf_config(dim: int, theta: float, max_positions: int, rope_parameters: dict) -> LlamaConfig:
    n_heads = 4
    return LlamaConfig(
        hidden_size=dim * n_heads, num_attention_heads=n_heads, head_dim=dim,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": theta, **rope_parameters},
    )


def hf_rope(dim: int, theta: float, max_positions: int, rope_parameters: dict,
            seq_len: int | None = None) -> tuple[np.ndarray, float]:
    config = hf_config(dim, theta, max_positions, rope_parameters)
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        inv, attention = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv, attention = ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)
    return inv.double().numpy(), float(attention)


def build_cases() -> list[tuple[dict, np.ndarray, float]]:
    """(case description, inv_freq, attention factor) for every golden case."""
    cases = []

    def add(name, rope, hf_args, context=None):
        inv, attention = hf_rope(*hf_args, seq_len=context)
        cases.append(({"name": name, "rope": rope, "context": context}, inv, attention))

    for dim, theta in ((64, 10000.0), (128, 500000.0)):
        tag = f"d{dim}"
        add(f"none_{tag}", {"theta": theta, "dim": dim},
            (dim, theta, 2048, {"rope_type": "default"}))
        add(f"linear_{tag}", {"theta": theta, "dim": dim, "scaling": "linear", "factor": 4.0},
            (dim, theta, 2048, {"rope_type": "linear", "factor": 4.0}))
        ntk_theta = theta * 8.0 ** (dim / (dim - 2))
        add(f"ntk_{tag}", {"theta": theta, "dim": dim, "scaling": "ntk", "factor": 8.0},
            (dim, ntk_theta, 2048, {"rope_type": "default"}))
        for context in (1024, 2048, 4096, 9000, 32768):
            add(f"dynamic_{tag}_ctx{context}",
                {"theta": theta, "dim": dim, "scaling": "dynamic", "factor": 4.0, "original_context": 2048},
                (dim, theta, 2048, {"rope_type": "dynamic", "factor": 4.0}), context=context)
        add(f"yarn_{tag}",
            {"theta": theta, "dim": dim, "scaling": "yarn", "factor": 4.0, "original_context": 2048},
            (dim, theta, 8192, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}))
        add(f"yarn_betas_{tag}",
            {"theta": theta, "dim": dim, "scaling": "yarn", "factor": 16.0, "original_context": 4096,
             "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0, "yarn_attn_factor": 1.3},
            (dim, theta, 65536, {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3}))
        add(f"llama3_{tag}",
            {"theta": theta, "dim": dim, "scaling": "llama3", "factor": 8.0, "original_context": 8192,
             "llama3_low_freq_factor": 1.0, "llama3_high_freq_factor": 4.0},
            (dim, theta, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
        add(f"llama3_small_{tag}",
            {"theta": theta, "dim": dim, "scaling": "llama3", "factor": 4.0, "original_context": 2048,
             "llama3_low_freq_factor": 2.0, "llama3_high_freq_factor": 8.0},
            (dim, theta, 8192, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                "high_freq_factor": 8.0, "original_max_position_embeddings": 2048}))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/golden/rope_hf.npz")
    args = parser.parse_args()
    arrays = {}
    descriptions = []
    for description, inv, attention in build_cases():
        descriptions.append(description)
        arrays[f"inv_freq/{description['name']}"] = inv
        arrays[f"attention/{description['name']}"] = np.float64(attention)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, cases=np.array(json.dumps(descriptions)), **arrays)
    print(f"wrote {len(descriptions)} cases to {args.out}")


if __name__ == "__main__":
    main()
