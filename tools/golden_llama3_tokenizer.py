"""A tiny tokenizer built like Llama 3's, and its golden ids from HF transformers.

Writes tests/golden/llama3_tokenizer/: tokenizer.json, tokenizer_config.json (the files a Llama 3 HF folder
holds) and golden.json (transformers' ids). The tokenizer is a byte-level BPE trained deterministically (the
`tokenizers` library) on tools/make_tiny_model.py's training text, with Llama 3's layout: the `llama-bpe`
pre-tokenizer (its split regex, then ByteLevel without GPT-2's regex), ignore_merges, Llama 3's special tokens
(<|begin_of_text|> ... <|eot_id|>), a post-processor that puts <|begin_of_text|> before every text (how Llama 3
adds BOS: its tokenizer_config.json has no add_bos_token), and Meta-Llama-3-Instruct's chat template, which
writes bos_token itself. 384 tokens, so it fits make_tiny_model's tiny models.

golden.json: for each text, transformers' `tokenizer(text)["input_ids"]` (BOS added by the post-processor) and
for each conversation `apply_chat_template(..., tokenize=True, add_generation_prompt=True)` (one BOS, from the
template), plus the versions used.

Regenerate (needs transformers; seconds):  python tools/golden_llama3_tokenizer.py [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from make_tiny_model import TRAINING_TEXT  # noqa: E402

VOCAB_SIZE = 384
SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEXTS = [
    "Hello world", " leading space", "The lighthouse keeper's log, 1887: 14 shillings and 6 pence.",
    "I'm sure they'll say it's fine; we've seen 1234567 of them.", "tabs\tand\n\nnewlines  \n end",
    "Ünïcödé café 🙂 ½", "<|eot_id|> inside text, and <|begin_of_text|> too", "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Where is the lighthouse?"}],
    [{"role": "system", "content": "  You answer briefly.  "}, {"role": "user", "content": "Name a ship."},
     {"role": "assistant", "content": "The Sea Lark."}, {"role": "user", "content": "Another one?\n"}],
]


def train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    bos = SPECIAL[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "llama3_tokenizer")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train().save(str(args.out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL[0], "eos_token": SPECIAL[4],
              "model_max_length": 131072, "clean_up_tokenization_spaces": True,
              "chat_template": LLAMA3_CHAT_TEMPLATE}
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(args.out)
    golden = {
        "texts": TEXTS, "ids": [hf(text)["input_ids"] for text in TEXTS],
        "conversations": CONVERSATIONS,
        "chat_ids": [list(hf.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False))
                     for c in CONVERSATIONS],
        "versions": {p: importlib.metadata.version(p) for p in ("transformers", "tokenizers")},
    }
    (args.out / "golden.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {args.out}: {len(TEXTS)} texts, {len(CONVERSATIONS)} conversations")


if __name__ == "__main__":
    main()
