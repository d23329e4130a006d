"""`engine eval ruler`: RULER's synthetic tasks (ruler_tasks.py) at given lengths, per context-extension method.

Prompts: a task's user message, in the model's chat template when it has one (``chat``; RULER's "chat"
templates) or as plain text (RULER's "base" template), then the task's answer prefix (in chat mode after the
assistant header, without its leading space). Every sample is fitted to its target length the way RULER
fits it: the largest haystack for which the prompt's tokens plus the task's tokens to generate fit the
length (ruler_fit.py), so prompts are a little shorter than the length, never longer.

Samples: sample s of a task at a length comes from numpy's default_rng([seed, task id, length, s]), so every
method sees the same prompts and a task's prompts do not depend on the other tasks asked. Answers: greedy
decoding of the task's tokens_to_generate (stopping at the model's end-of-turn), scored with RULER's
string_match_all; a cell's score (method, length, task) is the mean over its samples, in [0, 1].
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..api import load
from ..default_model import default_model_path
from ..errors import ConfigError
from ..loader import LoadedModel, open_model
from ..options import LoadSettings
from ..sampling import SamplingParams
from .budget import check_memory, prefill_flops
from .methods import check_methods, method_settings, model_for_cell
from .progress import NoProgress
from .ruler_fit import largest_fitting
from .ruler_tasks import (TASK_IDS, TASKS, VT_ICL_TOKENS, TaskEnv, TaskText, VariableTracking, string_match_all,
                          vt_example)
from .ruler_words import essay_words

VT_ICL_SEED = 0  # the sample that sizes vt's in-context example (RULER sizes it once, too)


def parse_tasks(text: str) -> tuple[str, ...]:
    """'niah_single_1,vt' -> ('niah_single_1', 'vt'); 'all' -> every task; known names, no repeats."""
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if names == ("all",):
        return tuple(TASKS)
    if not names:
        raise ConfigError("no task given (choose from " + ", ".join(TASKS) + ", or all)")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r} (choose from {', '.join(TASKS)}, or all)")
    if len(set(names)) != len(names):
        raise ConfigError(f"task list {text!r} repeats a task")
    return names


def read_haystack(path: Path | None) -> list[str] | None:
    """The words of a haystack file (None: the generated essay)."""
    if path is None:
        return None
    try:
        words = Path(path).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read haystack file {path}: {e}") from None
    if not words:
        raise ConfigError(f"haystack file {path} holds no words")
    return words


@dataclass(frozen=True)
class RulerPrompt:
    task: str
    ids: tuple[int, ...]
    answers: tuple[str, ...]
    units: int  # haystack size found by the fit

    @property
    def length(self) -> int:
        return len(self.ids)


class PromptBuilder:
    """Renders and fits the prompts of one model's tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, chat: bool, haystack: list[str] | None, seed: int):
        self.tokenizer, self.chat, self.seed = tokenizer, chat, seed
        self._haystack = haystack
        self.env = TaskEnv(self._essay, self._vt_icl_noises)

    def _essay(self, n: int) -> list[str]:
        if self._haystack is None:
            return essay_words(n)
        repeats = -(-n // len(self._haystack))  # RULER repeats a short haystack
        return (self._haystack * repeats)[:n]

    def encode(self, text: TaskText) -> list[int]:
        if self.chat:
            header = self.tokenizer.apply_chat_template([{"role": "user", "content": text.body}])
            return self.tokenizer.encode(header + text.answer_prefix.lstrip(), add_bos=False)
        return self.tokenizer.encode(text.body + text.answer_prefix)

    @functools.cache
    def _vt_icl_noises(self) -> int:
        """Noise paragraphs of vt's in-context example: the most whose example prompt fits VT_ICL_TOKENS."""
        spec = TASKS["vt"].spec
        assert isinstance(spec, VariableTracking)

        def tokens(n: int) -> int:
            text, prefix, _ = vt_example(spec, np.random.default_rng(VT_ICL_SEED), n, letters=3)
            return len(self.tokenizer.encode(text + prefix))
        return largest_fitting(tokens, VT_ICL_TOKENS, spec.min_units()) or spec.min_units()

    def text(self, task: str, length: int, sample: int, units: int) -> TaskText:
        rng = np.random.default_rng([self.seed, TASK_IDS[task], length, sample])
        return TASKS[task].spec.make(rng, units, length, self.env)

    def prompt(self, task: str, length: int, sample: int, guess: int | None = None) -> RulerPrompt:
        """Sample `sample` of `task` fitted to `length` tokens (with its generation); ConfigError if it cannot fit."""
        spec, budget = TASKS[task].spec, length - TASKS[task].tokens_to_generate

        def tokens(n: int) -> int:
            return len(self.encode(self.text(task, length, sample, n)))
        units = largest_fitting(tokens, budget, spec.min_units(), guess)
        if units is None:
            need = tokens(spec.min_units()) + TASKS[task].tokens_to_generate
            raise ConfigError(f"length {length} is too short for task {task}: its smallest prompt and answer "
                              f"take {need} tokens")
        text = self.text(task, length, sample, units)
        return RulerPrompt(task, tuple(self.encode(text)), text.answers, units)

    def prompts(self, task: str, length: int, n_samples: int) -> list[RulerPrompt]:
        out: list[RulerPrompt] = []
        for s in range(n_samples):
            out.append(self.prompt(task, length, s, guess=out[-1].units if out else None))
        return out


@dataclass
class RulerResult:
    prompt_tokens: int
    expected: tuple[str, ...]
    output: str
    score: float


@dataclass
class RulerCell:
    method: str
    length: int
    task: str
    results: list[RulerResult] = field(default_factory=list)
    seconds: float = 0.0
    load_seconds: float = 0.0

    @property
    def score(self) -> float:
        return float(np.mean([r.score for r in self.results]))


@dataclass(frozen=True)
class RulerPlan:
    model_path: Path
    model: LoadedModel
    lengths: tuple[int, ...]
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    samples: int
    seed: int
    chat: bool
    haystack: Path | None
    settings: LoadSettings  # model, device, dtype, DCA chunk settings, attention temperature
    ntk_factor: float = 2.0  # of the dca+ntk method

    @functools.cached_property
    def builder(self) -> PromptBuilder:
        return PromptBuilder(self.model.tokenizer, self.chat, read_haystack(self.haystack), self.seed)

    def sample_flops(self, length: int, task: str) -> float:
        generated = TASKS[task].tokens_to_generate
        return prefill_flops(self.model, length - generated) + prefill_flops(self.model, generated,
                                                                              start=length - generated)

    def total_flops(self) -> float:
        return len(self.methods) * self.samples * sum(self.sample_flops(n, t) for n in self.lengths
                                                      for t in self.tasks)


def plan_ruler(settings: LoadSettings, lengths: Sequence[int], tasks: Sequence[str], methods: Sequence[str],
               samples: int = 4, seed: int = 42, chat: bool | None = None, haystack: Path | None = None,
               ntk_factor: float = 2.0) -> RulerPlan:
    """Validate everything (each task's first sample at the shortest length must fit); raises before model work.

    chat: None = the model's chat template when it has one."""
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    model_path = Path(default_model_path() if settings.model is None else settings.model)
    loaded = open_model(model_path)
    methods, lengths, tasks = tuple(methods), tuple(lengths), tuple(tasks)
    check_methods(methods, settings, ntk_factor, loaded.config.context_length)
    check_memory(loaded, max(lengths), settings, what=f"RULER prompts of {max(lengths)} tokens")
    chat = loaded.tokenizer.chat_template is not None if chat is None else chat
    plan = RulerPlan(model_path, loaded, lengths, tasks, methods, samples, seed, chat, haystack,
                     dataclasses.replace(settings, model=model_path), ntk_factor)
    for task in tasks:
        plan.builder.prompt(task, min(lengths), 0)  # too short a length fails here
    return plan


def run_ruler(plan: RulerPlan, progress=NoProgress()) -> Iterator[RulerCell]:
    """Every (length, method, task) cell, shortest lengths first; yields each cell when done.

    A length's prompts are built before its first cell; the model is loaded once (model_for_cell)."""
    training_length = plan.model.config.context_length
    greedy = SamplingParams(temperature=0.0)
    settings = dataclasses.replace(plan.settings, context=max(plan.lengths))
    llm = None
    for length in plan.lengths:
        progress.start_cell(f"ruler: building the prompts of {length} tokens", 0.0)
        prompts = {task: plan.builder.prompts(task, length, plan.samples) for task in plan.tasks}
        for method in plan.methods:
            t0 = time.perf_counter()
            llm = model_for_cell(llm, method_settings(method, length, training_length, settings, plan.ntk_factor),
                                 length, load)
            load_seconds = time.perf_counter() - t0
            for ti, task in enumerate(plan.tasks):
                generate = TASKS[task].tokens_to_generate
                progress.start_cell(f"ruler {method} @ {length}, {task}",
                                    plan.samples * plan.sample_flops(length, task))
                cell = RulerCell(method, length, task, load_seconds=load_seconds if ti == 0 else 0.0)
                t1 = time.perf_counter()
                for prompt in prompts[task]:
                    output = llm.detokenize(list(llm.generate_ids(prompt.ids, generate, greedy)))
                    cell.results.append(RulerResult(prompt.length, prompt.answers, output,
                                                    string_match_all(output, prompt.answers)))
                    progress.advance(plan.sample_flops(length, task))
                cell.seconds = time.perf_counter() - t1
                yield cell
