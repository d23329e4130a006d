"""The host decode loop: one forward per token, sampling on the host (the numpy backend's decoder).

Every backend offers ``decoder(model, cache, sampling, history)`` with this interface; the CUDA
backend's replays a captured graph and samples on the device (backends/cuda/graph.py).

    decoder = backend.decoder(model, cache, sampling, history)   # after the prompt's prefill
    token = decoder.first(last_logits)    # sample from the prefill's last logits
    token = decoder.start(last_prompt_id) # or: feed the prompt's last token itself (cache.length = len(history) - 1)
    token = decoder.step(token)           # feed token at cache.length, commit it, return the next id
    decoder.close()                       # the loop is over (the server's batched decoders leave their batcher)

Non-finite logits (an overflow upstream) raise ``non_finite_logits``' NumericsError instead of sampling.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import NumericsError
from .kvcache import KVCache
from .sampling import Sampler, SamplingParams


def non_finite_logits(step: int, dtype: str) -> NumericsError:
    """The error for non-finite logits at decode step `step` (0: the prompt's last position) with activations of
    `dtype` ("f32", "f16", "bf16")."""
    where = "the prompt's last position" if step == 0 else f"decode step {step}"
    hint = ("; fp16 activations overflow past 65,504: run with --dtype bf16" if dtype == "f16" else
            "; the weights or the input drive the activations out of range")
    return NumericsError(f"the model produced non-finite logits at {where}{hint}")


class HostDecoder:
    def __init__(self, backend: Any, model: Any, cache: KVCache, params: SamplingParams, history: Sequence[int]):
        self.backend, self.model, self.cache = backend, model, cache
        self.sampler = Sampler(params)
        self.history = list(history)  # prompt + generated, for the repetition penalty
        self.steps = 0

    def first(self, logits: Any) -> int:
        return self._pick(self.backend.to_numpy(logits).reshape(-1))

    def start(self, token: int) -> int:
        """The first generated token, from feeding the prompt's last token (already in the history): one decode
        step where a prefill of one token would run."""
        return self._pick(self.next_logits(token))

    def step(self, token: int) -> int:
        self.history.append(token)
        logits = self.next_logits(token)
        self.steps += 1
        return self._pick(logits)

    def close(self) -> None:
        """Nothing to release."""

    def next_logits(self, token: int) -> np.ndarray:
        """Feed token at cache.length (committed) -> its (vocab,) logits on the host."""
        logits = self.model.forward(np.array([token]), self.cache, logits_for="last")  # (1, vocab)
        return self.backend.to_numpy(logits)[0]

    def _pick(self, logits: np.ndarray) -> int:
        if not np.isfinite(logits).all():
            raise non_finite_logits(self.steps, "f32")
        return self.sampler(logits, self.history)
