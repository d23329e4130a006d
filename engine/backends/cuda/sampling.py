"""Device-side sampling (kernels/sampling.cu): the same chain as engine/sampling.py, on the GPU.

``DeviceSampler`` owns the small device state the kernels need: the ring of the last
``repeat_last_n`` tokens (repetition penalty), the random counter, the output token slot, and the
workspace of the split (the G blocks' partials, the candidate pool and its counters), all allocated once
so that ``launch`` allocates nothing and reads nothing back (a CUDA graph captures it as it is).
A launch is ``sample_scan`` on G blocks (penalty, non-finite flag, each slice's best), for temperature > 0
``sample_pool`` on G blocks (the tokens near the top into the pool) and ``sample_narrow`` on G blocks (when
the pool overflowed: the tokens above a tighter threshold that still holds the top_k), then ``sample_token``
on one block (``partition`` picks G and the slice each block owns). Greedy always runs on the device;
stochastic sampling does when 1 <= top_k <= MAX_TOP_K (the candidates are found by top_k rounds of an
argmax). Otherwise ``device_supported`` is False and the caller samples on the host.
The settings reach the kernels as by-value scalars (``Scalars``: a captured graph freezes them) except the seed, which
sample_token reads from a device buffer like the counter: ``reset`` readies the sampler for another generation with
the same scalars (graph.py keeps a cache's captured step across generations).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .kernels import function
from ...sampling import SamplingParams

MAX_TOP_K = 256  # kernels/sampling.cu MAX_TOP_K
POOL_CAP = 1024  # kernels/sampling.cu POOL_CAP
NON_FINITE = -1  # the token the kernel writes for logits holding a NaN or an infinity
SAMPLE_THREADS = 1024  # sample_token's one block
SCAN_THREADS = 256  # the blocks of sample_scan, sample_pool and sample_narrow
SLICE = 1024  # logits a scan block owns (at most), until MAX_BLOCKS blocks cover the vocabulary
MAX_BLOCKS = 1024  # partials in the workspace
N_RUNGS = 12  # kernels/sampling.cu N_RUNGS (sample_narrow's thresholds)
POOL_COUNTS = 2 + N_RUNGS  # pool_count: the pool's count, sample_narrow's, the rungs'


def device_supported(params: SamplingParams) -> bool:
    return params.greedy or 1 <= params.top_k <= MAX_TOP_K


def partition(vocab: int) -> tuple[int, int]:
    """(blocks, slice): scan block b owns the logits [b*slice, min((b+1)*slice, vocab)); every block owns at
    least one, blocks <= MAX_BLOCKS (slices grow past SLICE only beyond MAX_BLOCKS * SLICE logits)."""
    if vocab < 1:
        raise ValueError(f"sampling needs at least one logit, got a vocabulary of {vocab}")
    blocks = min(-(-vocab // SLICE), MAX_BLOCKS)
    size = -(-vocab // blocks)
    return -(-vocab // size), size


class Scalars(NamedTuple):
    """The sampling settings the kernels take by value (a captured graph freezes them)."""
    greedy: bool
    ring_size: int  # tokens the repetition penalty looks back on (0: no penalty)
    penalty: float
    temperature: float
    top_k: int  # the launch takes min(top_k, vocab)
    top_p: float
    min_p: float


def scalars(params: SamplingParams) -> Scalars:
    """params as the kernels take them. Greedy reads neither temperature, top_k, top_p nor min_p (fixed here, so
    that greedy settings differing only in those are equal); a penalty of 1 or over no tokens is none."""
    ring_size = params.repeat_last_n if params.repeat_penalty != 1.0 else 0
    penalty = params.repeat_penalty if ring_size else 1.0
    if params.greedy:
        return Scalars(True, ring_size, penalty, 0.0, 0, 1.0, 0.0)
    return Scalars(False, ring_size, penalty, params.temperature, params.top_k, params.top_p, params.min_p)


def seed_state(params: SamplingParams) -> np.uint64:
    """The 64-bit seed of the device's random numbers (params.seed None: a fresh one)."""
    return np.uint64(np.random.SeedSequence(params.seed).generate_state(1, np.uint64)[0])


class DeviceSampler:
    def __init__(self, cp, params: SamplingParams, history: Sequence[int]):
        self.cp = cp
        self.scalars = scalars(params)
        self.ring = cp.zeros(max(self.scalars.ring_size, 1), dtype=cp.int32)  # the last ring_size tokens, cyclic
        self.ring_count = cp.zeros(1, dtype=cp.int32)  # tokens ever put in the ring
        self.counter = cp.zeros(1, dtype=cp.uint64)  # random numbers drawn
        self.seed = cp.zeros(1, dtype=cp.uint64)
        self.token = cp.zeros(1, dtype=cp.int32)
        # the split's workspace: per scan block its best (value, id) and non-finite flag; the candidate pool
        self.partial_v = cp.zeros(MAX_BLOCKS, dtype=cp.float32)
        self.partial_i = cp.zeros(MAX_BLOCKS, dtype=cp.int32)
        self.partial_bad = cp.zeros(MAX_BLOCKS, dtype=cp.int32)
        self.pool_v = cp.zeros(POOL_CAP, dtype=cp.float32)
        self.pool_i = cp.zeros(POOL_CAP, dtype=cp.int32)
        self.pool_count = cp.zeros(POOL_COUNTS, dtype=cp.int32)  # reset by sample_scan, on the device
        self.reset(params, history)

    def reset(self, params: SamplingParams, history: Sequence[int]) -> None:
        """Start a generation after `history` with params (whose scalars must be this sampler's): the ring holds
        the history's last ring_size tokens, the counter 0, the seed params'. Uploads on the current stream."""
        if scalars(params) != self.scalars:
            raise ValueError(f"sampling settings {scalars(params)} differ from the sampler's {self.scalars}")
        size = self.scalars.ring_size
        recent = np.asarray(list(history)[-size:] if size else [], dtype=np.int32)
        ring = np.zeros(max(size, 1), dtype=np.int32)
        ring[:len(recent)] = recent
        cp = self.cp
        self.ring[...] = cp.asarray(ring)
        self.ring_count[...] = cp.asarray(np.array([len(recent)], dtype=np.int32))
        self.counter[...] = 0
        self.seed[...] = cp.asarray(np.array([seed_state(params)], dtype=np.uint64))

    def launch(self, logits, position, advance: bool) -> None:
        """Sample from logits (1, vocab) fp32 (modified in place by the penalty) into self.token;
        with advance, position[0] += 1 on the device. Non-finite logits: token NON_FINITE, nothing advances."""
        s = self.scalars
        vocab = logits.shape[-1]
        blocks, size = partition(vocab)
        top_k = 0 if s.greedy else min(s.top_k, vocab)
        function("sampling", "sample_scan")(
            (blocks,), (SCAN_THREADS,),
            (logits, np.int32(vocab), np.int32(size), self.ring, np.int32(s.ring_size), self.ring_count,
             np.float32(s.penalty), self.partial_v, self.partial_i, self.partial_bad, self.pool_count))
        if not s.greedy:
            function("sampling", "sample_pool")(
                (blocks,), (SCAN_THREADS,),
                (logits, np.int32(vocab), np.int32(size), np.float32(s.temperature), self.partial_v,
                 self.partial_bad, self.pool_v, self.pool_i, self.pool_count))
            function("sampling", "sample_narrow")(
                (blocks,), (SCAN_THREADS,),
                (logits, np.int32(vocab), np.int32(size), np.int32(top_k), self.partial_v, self.partial_bad,
                 self.pool_v, self.pool_i, self.pool_count))
        function("sampling", "sample_token")(
            (1,), (SAMPLE_THREADS,),
            (logits, np.int32(vocab), self.partial_v, self.partial_i, self.partial_bad, np.int32(blocks),
             self.pool_v, self.pool_i, self.pool_count, self.ring, np.int32(s.ring_size), self.ring_count,
             np.float32(s.temperature), np.int32(top_k), np.float32(s.top_p), np.float32(s.min_p), self.seed,
             self.counter, self.token, position, np.int32(advance)))
