"""`engine eval tune-dca`: choose a model's DCA chunk size and local window from measurements.

For a model trained on L tokens, each candidate (chunk_size cs, local_window w) with w < cs <= L runs the `dca`
method of `eval ppl` (perplexity on the given text) and of `eval passkey` (retrieval; the `spaced` prompt style by
default, which issue 16 found the more reliable) at every evaluation length.
Per candidate:

    ppl        exp(mean over lengths of the mean NLL per token)
    retrieval  passkey accuracy over every length, depth and trial
    score      retrieval - (ppl / best ppl among the candidates - 1)

so a candidate pays for a perplexity 10% above the best one as for 10 points of retrieval accuracy. The Pareto
front holds the candidates no other beats on both ppl (lower) and retrieval (higher); the choice is the front's
highest score (ties: the default 3L/4, L/8 first, then the smaller chunk). `--write-gguf OUT` copies the model's
GGUF with the choice as `engine.dca.tuned_chunk_size` / `engine.dca.tuned_local_window`, which DCA then uses
wherever it is on without explicit sizes (`--dca auto` past L, `--dca on`, the eval methods).

Default grid: cs in {L/2, 5L/8, 3L/4, 7L/8, L}, w in {L/16, L/8, L/4}, every pair with w < cs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import gguf

from ..api import LLM, load
from ..config import GGUF_DCA_TUNED_CHUNK_SIZE, GGUF_DCA_TUNED_LOCAL_WINDOW, DCAConfig
from ..errors import ConfigError
from ..options import LoadSettings
from .passkey import STYLES, PasskeyCell, PasskeyPlan, check_style, plan_passkey, run_passkey
from .ppl import PplCell, PplPlan, plan_ppl, run_ppl
from .progress import NoProgress

DEFAULT_CHUNK_FRACTIONS = (Fraction(1, 2), Fraction(5, 8), Fraction(3, 4), Fraction(7, 8), Fraction(1))
DEFAULT_WINDOW_FRACTIONS = (Fraction(1, 16), Fraction(1, 8), Fraction(1, 4))


def parse_sizes(text: str | None, training_length: int, defaults: Sequence[Fraction], what: str) -> tuple[int, ...]:
    """'3/4,7/8,6144,6k' -> token counts: fractions of the training length L or whole token counts ('k' = 1024);
    None -> the default fractions of L."""
    if text is None:
        return tuple(sorted({int(f * training_length) for f in defaults}))
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "/" in part:
                size = Fraction(part) * training_length
            elif part[-1] in "kK":
                size = Fraction(int(part[:-1]) * 1024)
            else:
                size = Fraction(int(part))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{what} {part!r} is neither a token count (6144, 6k) nor a fraction of L (3/4)") from None
        if size.denominator != 1 or size <= 0:
            raise ConfigError(f"{what} {part!r} is not a positive whole number of tokens (L = {training_length})")
        sizes.append(int(size))
    if not sizes:
        raise ConfigError(f"no {what} given")
    return tuple(sorted(set(sizes)))


def candidates(chunk_sizes: Sequence[int], local_windows: Sequence[int], training_length: int) -> list[DCAConfig]:
    """Every valid (chunk_size, local_window) pair: w < cs <= L."""
    too_big = [cs for cs in chunk_sizes if cs > training_length]
    if too_big:
        raise ConfigError(f"chunk size {too_big[0]} exceeds the model's training context {training_length}")
    found = [DCAConfig(chunk_size=cs, local_window=w) for cs in chunk_sizes for w in local_windows if w < cs]
    if not found:
        raise ConfigError("no candidate: every local window is at least as large as every chunk size")
    return found


@dataclass(frozen=True)
class TunePlan:
    dca_default: DCAConfig  # 3L/4, L/8: what DCA runs with untuned
    candidates: tuple[DCAConfig, ...]
    ppl: PplPlan  # method dca, the run's lengths and texts (settings: the candidate's sizes set per run)
    passkey: PasskeyPlan

    def total_flops(self) -> float:
        return len(self.candidates) * (self.ppl.total_flops() + self.passkey.total_flops())


@dataclass
class CandidateResult:
    dca: DCAConfig
    ppl_cells: list[PplCell] = field(default_factory=list)
    passkey_cells: list[PasskeyCell] = field(default_factory=list)

    @property
    def nll(self) -> float:
        return sum(c.nll for c in self.ppl_cells) / len(self.ppl_cells)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def retrieval(self) -> float:
        trials = [t for c in self.passkey_cells for t in c.trials]
        return sum(t.correct for t in trials) / len(trials)


def plan_tune(settings: LoadSettings, text_paths: Sequence[str | Path], lengths: Sequence[int],
              chunk_sizes: str | None = None, local_windows: str | None = None, windows: int = 1,
              depths: Sequence[float] | None = None, trials: int = 1, seed: int = 0, max_new_tokens: int = 8,
              style: str = "spaced") -> TunePlan:
    """Validate everything (model, texts, memory, candidates) before any model work. depths: of the passkey
    (default: the style's)."""
    if settings.dca_chunk_size is not None or settings.dca_local_window is not None:
        raise ConfigError("tune-dca chooses the chunk size and local window: give the candidates with "
                          "--chunk-sizes / --local-windows instead of --dca-chunk-size / --dca-local-window")
    ppl = plan_ppl(settings, text_paths, lengths, ("dca",), windows)
    depths = STYLES[check_style(style)][1] if depths is None else depths
    passkey = plan_passkey(settings, lengths, depths, ("dca",), trials, seed, max_new_tokens, style=style)
    L = ppl.model.config.context_length
    grid = candidates(parse_sizes(chunk_sizes, L, DEFAULT_CHUNK_FRACTIONS, "chunk size"),
                      parse_sizes(local_windows, L, DEFAULT_WINDOW_FRACTIONS, "local window"), L)
    return TunePlan(DCAConfig.for_training_length(L), tuple(grid), ppl, passkey)


def _with_sizes(settings: LoadSettings, dca: DCAConfig) -> LoadSettings:
    return dataclasses.replace(settings, dca_chunk_size=dca.chunk_size, dca_local_window=dca.local_window)


class SharedModel:
    """A loader that keeps one loaded model for every run of the tuning: it loads again only when a run needs a
    larger context (the passkey runs need a little more than the perplexity runs), dropping the old model first.
    Each run lays the model out for its cells itself (LLM.relayout), so the other load settings are the same."""

    def __init__(self):
        self.llm: LLM | None = None

    def __call__(self, **load_kwargs) -> LLM:
        if self.llm is None or self.llm.context < load_kwargs["context"]:
            self.llm = None  # free the smaller model before allocating the larger one
            self.llm = load(**load_kwargs)
        return self.llm


def run_tune(plan: TunePlan, progress=NoProgress()) -> Iterator[CandidateResult]:
    """Measure every candidate (ppl, then passkey) on one loaded model; yields each when done."""
    shared = SharedModel()
    for dca in plan.candidates:
        result = CandidateResult(dca)
        result.ppl_cells = list(run_ppl(dataclasses.replace(plan.ppl, settings=_with_sizes(plan.ppl.settings, dca)),
                                        progress, loader=shared))
        result.passkey_cells = list(run_passkey(
            dataclasses.replace(plan.passkey, settings=_with_sizes(plan.passkey.settings, dca)), progress,
            loader=shared))
        yield result


def scores(results: Sequence[CandidateResult]) -> list[float]:
    """retrieval - (ppl / best ppl - 1) per result."""
    best = min(r.ppl for r in results)
    return [r.retrieval - (r.ppl / best - 1.0) for r in results]


def pareto_front(results: Sequence[CandidateResult]) -> list[bool]:
    """True for each result that no other has at least as good on both ppl and retrieval, better on one."""
    def beats(a: CandidateResult, b: CandidateResult) -> bool:
        return a.ppl <= b.ppl and a.retrieval >= b.retrieval and (a.ppl < b.ppl or a.retrieval > b.retrieval)
    return [not any(beats(other, r) for other in results if other is not r) for r in results]


def choose(results: Sequence[CandidateResult], default: DCAConfig) -> CandidateResult:
    """The front's highest score; ties: the default settings first, then the smaller chunk, the smaller window."""
    front, score = pareto_front(results), scores(results)
    ranked = sorted((i for i in range(len(results)) if front[i]),
                    key=lambda i: (-score[i], results[i].dca != default, results[i].dca.chunk_size,
                                   results[i].dca.local_window))
    return results[ranked[0]]


def tuned_metadata(dca: DCAConfig) -> dict[str, tuple[int, gguf.GGUFValueType]]:
    """The GGUF keys `--write-gguf` sets."""
    return {GGUF_DCA_TUNED_CHUNK_SIZE: (dca.chunk_size, gguf.GGUFValueType.UINT32),
            GGUF_DCA_TUNED_LOCAL_WINDOW: (dca.local_window, gguf.GGUFValueType.UINT32)}
