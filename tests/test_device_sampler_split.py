"""The device sampler's split (kernels/sampling.cu: sample_scan and sample_pool on G blocks, sample_token on one),
on the CPU: the partition of the vocabulary into the scan blocks' slices, each launch's arguments against the
kernels' parameter lists (kinds from the PTX, names from the .cu signatures), and a numpy model of the partials
and their merge (the reasoning behind "the split picks what one block over the whole vocabulary picks")."""
from __future__ import annotations

import re

import numpy as np
import pytest

from engine.backends.cuda import kernels, sampling
from engine.backends.cuda.sampling import MAX_BLOCKS, POOL_CAP, SLICE, DeviceSampler, partition
from engine.sampling import SamplingParams, apply_repeat_penalty

VOCABS = (1, 7, 1023, 1024, 1025, 2047, 2048, 2049, 32000, 128256, 152064, 256000, MAX_BLOCKS * SLICE,
          MAX_BLOCKS * SLICE + 1, 3_000_001)


@pytest.mark.parametrize("vocab", VOCABS)
def test_partition_covers_the_vocabulary_with_nonempty_disjoint_slices(vocab):
    blocks, size = partition(vocab)
    assert 1 <= blocks <= MAX_BLOCKS
    assert size <= SLICE or blocks == MAX_BLOCKS
    starts = np.arange(blocks) * size
    ends = np.minimum(starts + size, vocab)
    assert starts[0] == 0 and ends[-1] == vocab
    assert (ends[:-1] == starts[1:]).all() and (ends > starts).all()


def test_partition_refuses_an_empty_vocabulary():
    with pytest.raises(ValueError, match="at least one logit"):
        partition(0)


def test_kernel_constants_agree_with_the_host():
    source = (kernels.KERNEL_DIR / "sampling.cu").read_text()
    defined = dict(re.findall(r"#define\s+(\w+)\s+(\d+)", source))
    assert int(defined["POOL_CAP"]) == POOL_CAP
    assert int(defined["MAX_TOP_K"]) == sampling.MAX_TOP_K
    assert int(defined["SAMPLE_THREADS"]) == sampling.SAMPLE_THREADS
    assert int(defined["N_RUNGS"]) == sampling.N_RUNGS


# --- launches against the kernels' parameters ------------------------------------------------------------------
nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) is not installed")
from nvrtc_check import requires_nvrtc  # noqa: E402
from kernel_abi import Recorder, kind, params  # noqa: E402


def signature_names(kernel: str) -> list[str]:
    """The parameter names of an extern "C" kernel of sampling.cu, in order."""
    source = (kernels.KERNEL_DIR / "sampling.cu").read_text()
    match = re.search(r'extern "C" __global__ void ' + kernel + r"\(([^)]*)\)", source)
    return [re.findall(r"\w+", p)[-1] for p in match.group(1).split(",")]


class Launches:
    def __init__(self):
        self.calls = []

    def __call__(self, file, kernel, dtype="f16", instance=None):
        assert file == "sampling"
        recorder = Recorder(kernel)
        grid_block = {}

        def launch(grid, block, args, shared_mem=0):
            grid_block.update(grid=grid, block=block)
            recorder(grid, block, args, shared_mem)

        self.calls.append((recorder, grid_block))
        return launch


@requires_nvrtc
@pytest.mark.parametrize("vocab", [7, 2049, 128256])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0),
                                    SamplingParams(temperature=0.0, repeat_penalty=1.3),
                                    SamplingParams(temperature=0.8, top_k=40, repeat_penalty=1.1)],
                         ids=["greedy", "greedy+penalty", "stochastic"])
def test_device_sampler_launches_match_the_kernel_parameters(monkeypatch, vocab, params):
    """Greedy launches sample_scan then sample_token, stochastic scan, pool, narrow, token; each argument has its
    parameter's PTX kind, and every argument named like a sampler array (partials, pool, ring, counter...) is
    that array: a swapped pair of pointers fails here, not on a GPU."""
    launches = Launches()
    monkeypatch.setattr(sampling, "function", launches)
    sampler = DeviceSampler(np, params, [3, 5, 3])  # numpy stands in for CuPy: the sampler allocates with it
    logits, position = np.zeros((1, vocab), np.float32), np.zeros(1, np.int32)
    sampler.launch(logits, position, advance=True)
    names = [r.name for r, _ in launches.calls]
    assert names == (["sample_scan", "sample_token"] if params.greedy else
                     ["sample_scan", "sample_pool", "sample_narrow", "sample_token"])
    blocks, size = partition(vocab)
    arrays = {"logits": logits, "pos": position, "token_out": sampler.token, "counter": sampler.counter,
              "ring": sampler.ring, "ring_count": sampler.ring_count, "partial_v": sampler.partial_v,
              "partial_i": sampler.partial_i, "partial_bad": sampler.partial_bad, "pool_v": sampler.pool_v,
              "pool_i": sampler.pool_i, "pool_count": sampler.pool_count, "seed": sampler.seed}
    s = sampler.scalars  # greedy: temperature 0, top_p 1, min_p 0 whatever params say (the kernel reads none)
    assert s == sampling.scalars(params) and s.greedy == params.greedy
    scalars = {"vocab": vocab, "slice": size, "n_partials": blocks, "ring_size": s.ring_size,
               "penalty": np.float32(s.penalty), "temperature": np.float32(params.temperature),
               "top_k": 0 if params.greedy else min(params.top_k, vocab),
               "top_p": np.float32(1.0 if params.greedy else params.top_p),
               "min_p": np.float32(0.0 if params.greedy else params.min_p), "advance": 1}
    for recorder, launch in launches.calls:
        assert [kind(a) for a in recorder.args] == params_of(recorder.name), recorder.name
        names = signature_names(recorder.name)
        assert len(names) == len(recorder.args)
        for name, arg in zip(names, recorder.args):
            if name in arrays:
                assert arg is arrays[name], (recorder.name, name)
            else:
                assert arg == scalars[name], (recorder.name, name, arg)
        assert launch["grid"] == ((1,) if recorder.name == "sample_token" else (blocks,))
        threads = launch["block"][0]
        assert threads % 32 == 0 and threads <= 1024
    assert blocks <= sampler.partial_v.shape[0] and sampler.pool_v.shape[0] == POOL_CAP


def params_of(kernel: str) -> list[str]:
    return params("sampling", kernel, "f16")


# --- a numpy model of the partials and their merge ---------------------------------------------------------------
def ranks_before(av, ai, bv, bi) -> bool:
    return av > bv or (av == bv and ai < bi)


def scan_partials(logits: np.ndarray, ring: list[int], penalty: float):
    """sample_scan's model: each block penalises the distinct ring tokens of its slice (the first occurrence),
    then keeps its best (value, id); returns the penalised logits and the partials."""
    out = logits.copy()
    blocks, size = partition(len(logits))
    partials = []
    for b in range(blocks):
        start, end = b * size, min((b + 1) * size, len(logits))
        if penalty != 1.0:
            for t, tok in enumerate(ring):
                if start <= tok < end and tok not in ring[:t]:
                    v = out[tok]
                    out[tok] = v / np.float32(penalty) if v > 0 else v * np.float32(penalty)
        best = (-np.inf, 2**31 - 1)
        for i in range(start, end):
            if ranks_before(out[i], i, *best):
                best = (out[i], i)
        partials.append(best)
    return out, partials


@pytest.mark.parametrize("vocab", [1, 7, 2047, 2048, 2049, 5000])
def test_merging_the_partials_in_any_order_gives_the_lowest_id_argmax(vocab):
    rng = np.random.default_rng(vocab)
    blocks, size = partition(vocab)
    for trial in range(6):
        logits = rng.integers(-3, 3, vocab).astype(np.float32)  # many ties
        if trial % 2:  # the top value on both sides of every slice boundary and in the last slice
            top = logits.max() + 1
            for b in range(1, blocks):
                logits[b * size - 1] = logits[b * size] = top
            logits[-1] = top
        ring = list(rng.integers(0, vocab, 12)) + [int(np.argmax(logits))] * 2  # the best token, twice
        ring += [b * size for b in range(blocks)] + [min((b + 1) * size, vocab) - 1 for b in range(blocks)]
        penalty = (1.0, 1.5, 0.75)[trial % 3]  # exact in fp32: the model's arithmetic is the kernel's
        penalised, partials = scan_partials(logits, ring, penalty)
        history = [int(t) for t in ring]
        ref = apply_repeat_penalty(logits.astype(np.float64), history, penalty, len(history)).astype(np.float32)
        assert np.array_equal(penalised, ref)  # every distinct ring token penalised once, by one block
        for _ in range(4):
            order = rng.permutation(blocks)
            best = partials[order[0]]
            for b in order[1:]:
                if ranks_before(*partials[b], *best):
                    best = partials[b]
            assert best[1] == int(np.argmax(ref))
