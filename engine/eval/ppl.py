"""Perplexity of fixed token windows under each context-extension method.

Windows: each text file is tokenized once (no BOS, special-token texts not parsed). Window w of a
file at length n is its tokens [w*n, (w+1)*n). When the model's tokenizer adds BOS, the first token
of every window is replaced by BOS (as llama.cpp's perplexity does); the scored tokens do not change.
Every method at a length scores exactly the same windows: tokens 1 .. n-1 of each window, each
predicted from the tokens before it in its window (``LLM.token_logprobs``).

NLL of a cell (method, length) is the mean over every scored token of every window of every file
(all windows have n - 1 targets, so it is also the mean of the windows' means); PPL = exp(NLL).

Everything that can be refused (unknown method, bad DCA settings, a file too short for the windows
asked, a length beyond memory) is refused by ``plan_ppl`` before any model work starts.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..api import LLM, load
from ..default_model import default_model_path
from ..errors import ConfigError
from ..loader import LoadedModel, open_model
from ..options import LoadSettings
from .budget import check_memory, prefill_flops
from .methods import check_methods, method_settings, model_for_cell
from .progress import NoProgress


@dataclass(frozen=True)
class TokenizedText:
    path: Path
    ids: np.ndarray  # (n_tokens,) int64


@dataclass
class PplCell:
    method: str
    length: int
    nll: float        # mean negative log-likelihood per scored token (nats)
    n_tokens: int     # scored tokens: windows * files * (length - 1)
    seconds: float    # scoring time (model loading excluded)
    load_seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@dataclass(frozen=True)
class PplPlan:
    model_path: Path
    model: LoadedModel
    texts: tuple[TokenizedText, ...]
    lengths: tuple[int, ...]
    methods: tuple[str, ...]
    n_windows: int
    settings: LoadSettings  # model, device, dtype, DCA chunk settings, attention temperature
    ntk_factor: float = 2.0  # of the dca+ntk method

    def cell_flops(self, length: int) -> float:
        return self.n_windows * len(self.texts) * prefill_flops(self.model, length)

    def total_flops(self) -> float:
        return len(self.methods) * sum(self.cell_flops(n) for n in self.lengths)


def expand_text_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its *.txt files (sorted)."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise ConfigError(f"text folder {path} holds no .txt file")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"text file {path} does not exist")
    if not out:
        raise ConfigError("no text file given (--text FILE)")
    return out


def tokenize_texts(tokenizer, paths: Sequence[Path]) -> tuple[TokenizedText, ...]:
    texts = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read text file {path}: {e}") from None
        ids = np.asarray(tokenizer.encode(text, add_bos=False, parse_special=False), dtype=np.int64)
        texts.append(TokenizedText(path, ids))
    return tuple(texts)


def check_texts_long_enough(texts: Sequence[TokenizedText], length: int, n_windows: int) -> None:
    need = length * n_windows
    for text in texts:
        if len(text.ids) < need:
            raise ConfigError(
                f"text file {text.path} has {len(text.ids)} tokens, too few for {n_windows} window(s) of "
                f"{length} tokens ({need} needed); use shorter --lengths, fewer --windows or a longer text"
            )


def windows(ids: np.ndarray, length: int, count: int, bos_id: int | None = None) -> np.ndarray:
    """(count, length) int64: window w = ids[w*length : (w+1)*length], first token replaced by bos_id if given."""
    if count < 1:
        raise ConfigError(f"the number of windows must be at least 1, got {count}")
    if len(ids) < length * count:
        raise ConfigError(f"{len(ids)} tokens are too few for {count} window(s) of {length} tokens")
    out = np.array(ids[:length * count], dtype=np.int64).reshape(count, length)
    if bos_id is not None:
        out[:, 0] = bos_id
    return out


def plan_ppl(settings: LoadSettings, text_paths: Sequence[str | Path], lengths: Sequence[int],
             methods: Sequence[str], n_windows: int = 1, ntk_factor: float = 2.0) -> PplPlan:
    """Validate everything and tokenize the texts; raises before any model work."""
    if n_windows < 1:
        raise ConfigError(f"--windows must be at least 1, got {n_windows}")
    model_path = Path(default_model_path() if settings.model is None else settings.model)
    loaded = open_model(model_path)
    methods, lengths = tuple(methods), tuple(lengths)
    check_methods(methods, settings, ntk_factor, loaded.config.context_length)
    check_memory(loaded, max(lengths), settings)
    texts = tokenize_texts(loaded.tokenizer, expand_text_paths(text_paths))
    check_texts_long_enough(texts, max(lengths), n_windows)
    settings = dataclasses.replace(settings, model=model_path, context=max(lengths))
    return PplPlan(model_path, loaded, texts, lengths, methods, n_windows, settings, ntk_factor)


def run_ppl(plan: PplPlan, progress=NoProgress(), loader: Callable[..., LLM] | None = None) -> Iterator[PplCell]:
    """Score every (length, method) cell, shortest lengths first; yields each cell when done.

    The model is loaded once, for the longest length, and laid out for each cell in place (model_for_cell).
    """
    tokenizer = plan.model.tokenizer
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    training_length = plan.model.config.context_length
    llm = None
    for length in plan.lengths:
        batches = [windows(text.ids, length, plan.n_windows, bos) for text in plan.texts]  # same for every method
        window_flops = prefill_flops(plan.model, length)
        for method in plan.methods:
            progress.start_cell(f"ppl {method} @ {length}", plan.cell_flops(length))
            t0 = time.perf_counter()
            cell = method_settings(method, length, training_length, plan.settings, plan.ntk_factor)
            llm = model_for_cell(llm, cell, length, loader or load)
            t1 = time.perf_counter()
            nll_sum, n_scored = 0.0, 0
            for batch in batches:
                for window in batch:
                    logprobs = llm.token_logprobs(window)  # (length - 1,)
                    nll_sum -= float(logprobs.sum())
                    n_scored += logprobs.size
                    progress.advance(window_flops)
            yield PplCell(method, length, nll_sum / n_scored, n_scored, time.perf_counter() - t1, t1 - t0)
