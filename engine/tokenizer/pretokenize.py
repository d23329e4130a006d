"""The split regexes of llama.cpp's BPE pre-tokenizer families (``tokenizer.ggml.pre``).

Each family is a list of regexes applied in turn, every one splitting the pieces the previous
left (matches and the text between them both become pieces) -- llama.cpp's
``unicode_regex_split``, which is `tokenizers`' ``Split(behavior="isolated")`` in sequence.
Patterns are the original ``tokenizer.json`` ones where llama.cpp keeps an adapted copy
(the case-insensitive contractions of llama3/qwen2 are written ``(?i:...)`` here).
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PUNCTUATION_RUNS = r"[\p{P}\$\+<=>\^~\|]+"
# Letters of many scripts; code points that Unicode normalization would change are escaped.
_DEEPSEEK_LETTERS = (
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
)
_CJK_HANGUL = r"[一-龥ࠀ-一가-퟿]+"


@dataclass(frozen=True)
class PreTokenizerFamily:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token is taken whole (llama3)
    add_bos: bool = False        # llama.cpp's default when the file does not say


_LLAMA3 = PreTokenizerFamily((LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizerFamily((QWEN2,))
_GPT2 = PreTokenizerFamily((GPT2,))
_DIGITS_THEN_GPT2 = PreTokenizerFamily((r"\p{N}", GPT2))

FAMILIES: dict[str, PreTokenizerFamily] = {
    "default": PreTokenizerFamily((_PUNCTUATION_RUNS, GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizerFamily((LLAMA3,))),
    **dict.fromkeys(("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen"), _QWEN2),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_THEN_GPT2
    ),
    "falcon": PreTokenizerFamily((_PUNCTUATION_RUNS, GPT2, r"[0-9][0-9][0-9]")),
    "deepseek-llm": PreTokenizerFamily(
        (r"[\r\n]", _DEEPSEEK_LETTERS, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", _CJK_HANGUL, r"\p{N}+")
    ),
    "deepseek-coder": PreTokenizerFamily((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")),
}


def byte_level_pre_tokenizer(family: PreTokenizerFamily) -> pre_tokenizers.PreTokenizer:
    """The family's regex splits followed by the byte -> printable-character mapping."""
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in family.regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
