"""The host decode loop: one forward per token, sampling on the host (the numpy backend's decoder).

Every backend offers ``decoder(model, cache, sampling, history)`` with this interface; the CUDA
backend's replays a captured graph and samples on the device (backends/cuda/graph.py).

    decoder = backend.decoder(model, cache, sampling, history)   # after the prompt's prefill
    token = decoder.first(last_logits)    # sample from the prefill's last logits
    token = decoder.step(token)           # feed token at cache.length, commit it, return the next id
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .kvcache import KVCache
from .sampling import Sampler, SamplingParams


class HostDecoder:
    def __init__(self, backend: Any, model: Any, cache: KVCache, params: SamplingParams, history: Sequence[int]):
        self.backend, self.model, self.cache = backend, model, cache
        self.sampler = Sampler(params)
        self.history = list(history)  # prompt + generated, for the repetition penalty

    def first(self, logits: Any) -> int:
        return self.sampler(self.backend.to_numpy(logits).reshape(-1), self.history)

    def step(self, token: int) -> int:
        self.history.append(token)
        logits = self.model.forward(np.array([token]), self.cache, logits_for="last")  # (1, vocab)
        return self.sampler(self.backend.to_numpy(logits)[0], self.history)
