"""Golden logits of the tiny test models of each non-llama family, computed by HF transformers (torch, CPU,
float32, eager attention): the independent reference the engine's family support is tested against.

The model is tools/make_tiny_model.py's VARIANTS[family] (deterministic: seeded weights, a deterministically
trained tokenizer), written as an HF folder; transformers loads that folder with its own model class
(Qwen2ForCausalLM for qwen2,
MistralForCausalLM for mistral, LlamaForCausalLM with llama3 RoPE scaling for llama3) and scores PROMPT_IDS (token ids are stored, so no tokenizer is involved).

Stored in tests/golden/tiny_<family>_logits.npz: ids int32 (n,), logits float32 (n, vocab); and the versions
in tests/golden/tiny_<family>_logits.json.

Regenerate (seconds; needs torch and transformers, which the engine does not):
    python tools/golden_families.py [--family qwen2|mistral|llama3|all] [--out tests/golden]
It runs beside the engine's own code (it imports tools/make_tiny_model.py, hence engine): with torch and
transformers in a separate environment, put the repository on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from make_tiny_model import VARIANTS, make_tiny_model  # noqa: E402

# 48 ids spread over the tiny vocabulary (special ids 0..2 left out)
PROMPT_IDS = [(7 * i * i + 13 * i + 5) % 380 + 3 for i in range(48)]


FAMILIES = ("qwen2", "mistral", "llama3")


def hf_logits(folder: Path, ids: list[int]) -> tuple[np.ndarray, str]:
    """(logits (n, vocab) float32, the transformers class that computed them)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy(), type(model).__name__


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="all", choices=[*FAMILIES, "all"])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "golden")
    args = ap.parse_args(argv)
    for name in FAMILIES if args.family == "all" else [args.family]:
        write_golden(name, args.out)


def write_golden(name: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_model(tmp, VARIANTS[name], gguf_types=(), hf=True)
        architecture = json.loads((paths["hf"] / "config.json").read_text())["architectures"][0]
        logits, hf_class = hf_logits(paths["hf"], PROMPT_IDS)
    assert hf_class == architecture, (hf_class, architecture)  # transformers ran the family's own code
    stem = out / f"tiny_{name}_logits"
    np.savez_compressed(stem.with_suffix(".npz"), ids=np.asarray(PROMPT_IDS, np.int32), logits=logits.astype(np.float32))
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "numpy", "tokenizers")}
    stem.with_suffix(".json").write_text(json.dumps({"family": name, "variant": name, "hf_class": hf_class,
                                                     "n_tokens": len(PROMPT_IDS), "versions": versions}, indent=1) + "\n")
    print(f"wrote {stem}.npz ({hf_class}): logits {logits.shape}, max |logit| {np.abs(logits).max():.3f}")


if __name__ == "__main__":
    main()
