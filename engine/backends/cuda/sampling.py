"""Device-side sampling (kernels/sampling.cu): the same chain as engine/sampling.py, on the GPU.

``DeviceSampler`` owns the small device state the kernel needs: the ring of the last
``repeat_last_n`` tokens (repetition penalty), the random counter and the output token slot.
Greedy always runs on the device; stochastic sampling does when 1 <= top_k <= MAX_TOP_K (the
candidates are found by top_k rounds of a block argmax). Otherwise ``supported`` is False and the
caller samples on the host.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .kernels import function
from ...sampling import SamplingParams

MAX_TOP_K = 256  # kernels/sampling.cu MAX_TOP_K
NON_FINITE = -1  # the token the kernel writes for logits holding a NaN or an infinity
SAMPLE_THREADS = 1024


def device_supported(params: SamplingParams) -> bool:
    return params.greedy or 1 <= params.top_k <= MAX_TOP_K


class DeviceSampler:
    def __init__(self, cp, params: SamplingParams, history: Sequence[int]):
        self.cp = cp
        self.params = params
        self.ring_size = params.repeat_last_n if params.repeat_penalty != 1.0 else 0
        recent = np.asarray(list(history)[-self.ring_size:] if self.ring_size else [], dtype=np.int32)
        ring = np.zeros(max(self.ring_size, 1), dtype=np.int32)
        ring[:len(recent)] = recent
        self.ring = cp.asarray(ring)
        self.ring_count = cp.asarray(np.array([len(recent)], dtype=np.int32))
        self.counter = cp.zeros(1, dtype=cp.uint64)
        self.seed = np.uint64(np.random.SeedSequence(params.seed).generate_state(1, np.uint64)[0])
        self.token = cp.zeros(1, dtype=cp.int32)

    def launch(self, logits, position, advance: bool) -> None:
        """Sample from logits (1, vocab) fp32 (modified in place by the penalty) into self.token;
        with advance, position[0] += 1 on the device. Non-finite logits: token NON_FINITE, nothing advances."""
        p = self.params
        top_k = 0 if p.greedy else min(p.top_k, logits.shape[-1])
        function("sampling", "sample_token")(
            (1,), (SAMPLE_THREADS,),
            (logits, np.int32(logits.shape[-1]), self.ring, np.int32(self.ring_size), self.ring_count,
             np.float32(p.repeat_penalty), np.float32(p.temperature), np.int32(top_k), np.float32(p.top_p),
             np.float32(p.min_p), self.seed, self.counter, self.token, position, np.int32(advance)))
