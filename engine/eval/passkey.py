"""Passkey retrieval: can the model find a 5-digit key hidden at some depth of a long prompt?

Two prompt styles (``style``), the same sentences joined differently:

- "landmark" (the standard prompt of Landmark Attention / LongLoRA), lines joined by newlines, default
  depths 0, 0.25, 0.5, 0.75, 1:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
    The pass key is 68301. Remember it. 68301 is the pass key.
    ... The sky is blue. The sun is yellow. Here we go. There and back again.
    What is the pass key? The pass key is

- "spaced": intro, filler, key line, filler and question all joined by single spaces (one paragraph), default
  depths 1/8, 3/8, 5/8, 7/8 (the middles of the prompt's quarters, never at its very start or end).
  On the default model at 16k-128k this style scores far above "landmark" (issue 16).

The filler is counted in sentences (cycling through its five), split before and after the key line.
The whole text is tokenized at once, as any user prompt is (BOS when the model adds one).
- length: the sentence count is searched so the prompt's token count is as close to the target as
  whole sentences allow (within 1% from a few hundred tokens up);
- depth: the key's token offset (its first digit) / prompt length; the key line goes after the number
  of sentences that puts it closest to the depth asked (0: right after the intro, 1: just before the
  question, as far as those lines allow).

Keys: uniform 5-digit numbers from numpy's default_rng(seed), one per (length, depth, trial), so every
method sees the same prompts. Answer: greedy decoding of a few tokens; correct when the first number
in the output is exactly the key.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..api import LLM, load
from ..default_model import default_model_path
from ..errors import ConfigError
from ..loader import LoadedModel, open_model
from ..options import LoadSettings
from ..sampling import SamplingParams
from .budget import check_memory, prefill_flops
from .methods import check_methods, method_settings, model_for_cell
from .progress import NoProgress

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (10000, 100000)  # 5-digit keys, upper bound exclusive
MAX_SEARCH_STEPS = 64
# style -> (what joins the prompt's parts, default depths)
STYLES = {"landmark": ("\n", (0.0, 0.25, 0.5, 0.75, 1.0)), "spaced": (" ", (0.125, 0.375, 0.625, 0.875))}


def filler_text(n_sentences: int, first: int = 0) -> str:
    """n_sentences filler sentences, starting at sentence `first` of the cycle, joined by spaces."""
    return " ".join(FILLER[(first + i) % len(FILLER)] for i in range(n_sentences))


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ConfigError(f"unknown passkey style {style!r} (choose from {', '.join(STYLES)})")
    return style


def prompt_text(key: int, n_before: int, n_after: int, style: str = "landmark") -> str:
    parts = [INTRO, filler_text(n_before), KEY_LINE.format(key=key), filler_text(n_after, first=n_before),
             QUESTION]
    return STYLES[check_style(style)][0].join(part for part in parts if part)


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: tuple[int, ...]
    key: int
    target_length: int
    depth: float
    key_offset: int  # index of the token holding the key's first digit

    @property
    def length(self) -> int:
        return len(self.ids)


def _token_offset(tokenizer, ids: Sequence[int], char_offset: int) -> int:
    """Index of the token that holds character `char_offset` of the decoded text (binary search)."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid + 1], skip_special=True)) > char_offset:
            hi = mid
        else:
            lo = mid + 1
    return lo


def build_prompt(tokenizer, length: int, depth: float, key: int, style: str = "landmark") -> PasskeyPrompt:
    """The passkey prompt of about `length` tokens with `key` at `depth` in `style` (see the module docstring)."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth {depth} is outside [0, 1]")

    def encode(n_before: int, n_after: int) -> list[int]:
        return tokenizer.encode(prompt_text(key, n_before, n_after, style))

    fixed = len(encode(0, 0))
    if length <= fixed:
        raise ConfigError(
            f"passkey length {length} is too short: the intro, key line and question alone take {fixed} tokens")
    cycle = len(encode(0, 2 * len(FILLER))) - len(encode(0, len(FILLER)))  # tokens per filler cycle
    per_sentence = max(cycle / len(FILLER), 1.0)
    key_char = prompt_text(key, 0, 0, style).index(KEY_LINE.format(key=key)) + len("The pass key is ")
    key_offset_at_start = _token_offset(tokenizer, encode(0, 0), key_char)

    def split(total: int) -> int:
        """Sentences before the key line that put the key closest to depth * length."""
        return int(np.clip(round((depth * length - key_offset_at_start) / per_sentence), 0, total))

    errors: dict[int, int] = {}  # sentence count -> prompt tokens - target

    def error(total: int) -> int:
        if total not in errors:
            before = split(total)
            errors[total] = len(encode(before, total - before)) - length
        return errors[total]

    total = max(round((length - fixed) / per_sentence), 0)
    for _ in range(MAX_SEARCH_STEPS):  # Newton-like steps on the sentence count, until a count repeats
        step = round(error(total) / per_sentence)
        if step == 0 or total - step < 0 or total - step in errors:
            break
        total -= step
    total = min((t for t in (total - 1, total, total + 1) if t >= 0), key=lambda t: abs(error(t)))
    before = split(total)
    ids = encode(before, total - before)
    text = prompt_text(key, before, total - before, style)
    char = text.index(KEY_LINE.format(key=key)) + len("The pass key is ")
    return PasskeyPrompt(tuple(ids), key, length, depth, _token_offset(tokenizer, ids, char))


def make_keys(seed: int, n_lengths: int, n_depths: int, trials: int) -> np.ndarray:
    """(n_lengths, n_depths, trials) int64 5-digit keys, fixed by the seed."""
    return np.random.default_rng(seed).integers(*KEY_RANGE, size=(n_lengths, n_depths, trials))


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group() if match else None


def is_correct(output: str, key: int) -> bool:
    """Exact match: the first number in the output is the key (so '123456' does not count for 12345)."""
    return first_number(output) == str(key)


@dataclass
class PasskeyTrial:
    key: int
    output: str
    correct: bool
    prompt_tokens: int
    key_offset: int


@dataclass
class PasskeyCell:
    method: str
    length: int
    depth: float
    trials: list[PasskeyTrial] = field(default_factory=list)
    seconds: float = 0.0
    load_seconds: float = 0.0

    @property
    def n_correct(self) -> int:
        return sum(t.correct for t in self.trials)

    @property
    def accuracy(self) -> float:
        return self.n_correct / len(self.trials)


@dataclass(frozen=True)
class PasskeyPlan:
    model_path: Path
    model: LoadedModel
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    methods: tuple[str, ...]
    trials: int
    seed: int
    max_new_tokens: int
    settings: LoadSettings  # model, device, dtype, DCA chunk settings, attention temperature
    ntk_factor: float = 2.0  # of the dca+ntk method
    style: str = "landmark"

    def keys(self) -> np.ndarray:
        return make_keys(self.seed, len(self.lengths), len(self.depths), self.trials)

    def trial_flops(self, length: int) -> float:
        return (prefill_flops(self.model, length)
                + prefill_flops(self.model, self.max_new_tokens, start=length))  # decode steps

    def total_flops(self) -> float:
        per_method = sum(len(self.depths) * self.trials * self.trial_flops(n) for n in self.lengths)
        return len(self.methods) * per_method


def plan_passkey(settings: LoadSettings, lengths: Sequence[int], depths: Sequence[float], methods: Sequence[str],
                 trials: int = 1, seed: int = 0, max_new_tokens: int = 8, ntk_factor: float = 2.0,
                 style: str = "landmark") -> PasskeyPlan:
    """Validate everything; raises before any model work."""
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if max_new_tokens < 1:
        raise ConfigError(f"the answer needs at least 1 generated token, got {max_new_tokens}")
    model_path = Path(default_model_path() if settings.model is None else settings.model)
    loaded = open_model(model_path)
    methods, lengths, depths = tuple(methods), tuple(lengths), tuple(depths)
    check_methods(methods, settings, ntk_factor, loaded.config.context_length)
    context = int(max(lengths) * 1.01) + max_new_tokens  # the longest prompt (+1%) and its answer
    check_memory(loaded, context, settings, what=f"passkey prompts of {max(lengths)} tokens (+1%, "
                 f"+{max_new_tokens} generated: {context} tokens)")
    build_prompt(loaded.tokenizer, min(lengths), 0.0, KEY_RANGE[0], check_style(style))  # too short fails here
    return PasskeyPlan(model_path, loaded, lengths, depths, methods, trials, seed, max_new_tokens,
                       dataclasses.replace(settings, model=model_path), ntk_factor, style)


def run_passkey(plan: PasskeyPlan, progress=NoProgress(), loader: Callable[..., LLM] | None = None) -> Iterator[PasskeyCell]:
    """Every (length, method, depth) cell, shortest lengths first; yields each cell when done.

    Every prompt is built first; the model is loaded once, for the longest prompt and its answer, and laid
    out for each (method, length) in place (model_for_cell).
    """
    keys = plan.keys()
    tokenizer = plan.model.tokenizer
    training_length = plan.model.config.context_length
    greedy = SamplingParams(temperature=0.0)
    prompts = [[[build_prompt(tokenizer, length, depth, int(keys[li, di, t]), plan.style)
                 for t in range(plan.trials)] for di, depth in enumerate(plan.depths)]
               for li, length in enumerate(plan.lengths)]
    # (length, depth, trial), the same prompts for every method; per length, the context its longest prompt needs
    contexts = [max(p.length for row in by_depth for p in row) + plan.max_new_tokens for by_depth in prompts]
    settings = dataclasses.replace(plan.settings, context=max(contexts))
    llm = None
    for length, by_depth, context in zip(plan.lengths, prompts, contexts):
        for method in plan.methods:
            t0 = time.perf_counter()
            llm = model_for_cell(llm, method_settings(method, length, training_length, settings, plan.ntk_factor),
                                 context, loader or load)
            load_seconds = time.perf_counter() - t0
            for di, depth in enumerate(plan.depths):
                progress.start_cell(f"passkey {method} @ {length}, depth {depth:g}",
                                    plan.trials * plan.trial_flops(length))
                cell = PasskeyCell(method, length, depth, load_seconds=load_seconds if di == 0 else 0.0)
                t1 = time.perf_counter()
                for prompt in by_depth[di]:
                    out = list(llm.generate_ids(prompt.ids, plan.max_new_tokens, greedy))
                    output = llm.detokenize(out)
                    cell.trials.append(PasskeyTrial(prompt.key, output, is_correct(output, prompt.key),
                                                    prompt.length, prompt.key_offset))
                    progress.advance(plan.trial_flops(length))
                cell.seconds = time.perf_counter() - t1
                yield cell
