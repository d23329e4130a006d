"""Golden logits of the tiny test models of each non-llama family, computed by HF transformers (torch, CPU,
float32, eager attention): the independent reference the engine's family support is tested against.

The model is tools/make_tiny_model.py's VARIANTS[family] (deterministic: seeded weights, a deterministically
trained tokenizer), written as an HF folder; transformers loads that folder with its own model class
(Qwen2ForCausalLM for qwen2) and scores PROMPT_IDS (token ids are stored, so no tokenizer is involved).

Stored in tests/golden/tiny_<family>_logits.npz: ids int32 (n,), logits float32 (n, vocab); and the versions
in tests/golden/tiny_<family>_logits.json.

Regenerate (seconds; needs torch and transformers, which the engine does not):
    python tools/golden_families.py [--family qwen2] [--out tests/golden]
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


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen2", choices=["qwen2"])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "golden")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_model(tmp, VARIANTS[args.family], gguf_types=(), hf=True)
        logits = hf_logits(paths["hf"], PROMPT_IDS)
    stem = args.out / f"tiny_{args.family}_logits"
    np.savez_compressed(stem.with_suffix(".npz"), ids=np.asarray(PROMPT_IDS, np.int32), logits=logits.astype(np.float32))
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "numpy", "tokenizers")}
    stem.with_suffix(".json").write_text(json.dumps({"family": args.family, "variant": args.family,
                                                     "n_tokens": len(PROMPT_IDS), "versions": versions}, indent=1) + "\n")
    print(f"wrote {stem}.npz: logits {logits.shape}, max |logit| {np.abs(logits).max():.3f}")


if __name__ == "__main__":
    main()
