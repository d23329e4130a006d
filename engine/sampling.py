"""Token sampling in llama.cpp's default order.

Chain: repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
temperature <= 0 is greedy (argmax after the penalty). top_k <= 0, top_p >= 1 and min_p <= 0
disable their stage. A given seed gives the same tokens for the same logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        for label, value in (("temperature", self.temperature), ("top-p", self.top_p), ("min-p", self.min_p),
                             ("repeat penalty", self.repeat_penalty)):
            if not math.isfinite(value):
                raise ConfigError(f"{label} must be a finite number, got {value}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"seed must be >= 0 (or none for a random one), got {self.seed}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ConfigError(f"repeat penalty must be positive, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ConfigError(f"repeat-last-n must be >= 0, got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """logits: (vocab,) float; history: token ids so far (prompt + generated)."""
        p = self.params
        logits = apply_repeat_penalty(np.asarray(logits, dtype=np.float64), history, p.repeat_penalty,
                                      p.repeat_last_n)
        if p.greedy:
            return int(np.argmax(logits))
        ids = np.arange(logits.shape[0])
        if 0 < p.top_k < logits.shape[0]:
            keep = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
            ids, logits = ids[keep], logits[keep]
        order = np.argsort(-logits, kind="stable")  # candidates, most likely first
        ids, logits = ids[order], logits[order]
        probs = _softmax(logits)
        if p.top_p < 1.0:
            # smallest prefix whose mass reaches top_p (at least one token)
            n_keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            ids, logits, probs = ids[:n_keep], logits[:n_keep], probs[:n_keep]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            ids, logits = ids[keep], logits[keep]
        probs = _softmax(logits / p.temperature)
        return int(ids[self.rng.choice(len(ids), p=probs)])


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's penalty on the last `last_n` distinct tokens: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or last_n == 0 or len(history) == 0:
        return logits
    recent = np.unique(np.asarray(history[-last_n:], dtype=np.int64))
    out = logits.copy()
    vals = out[recent]
    out[recent] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
