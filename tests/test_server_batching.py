"""engine/server/batching.py without the server: generations on several slots, decoding in threads of their own
through one DecodeBatcher, give each the tokens it gives alone (greedy, seeded, with a repetition penalty; DCA
active), every step runs with all the decoders still going (batch sizes fall only as generations end), and a
step whose cache is full fails alone while the rest of its batch runs."""
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.errors import ContextError
from engine.sampling import SamplingParams
from engine.server.batching import DecodeBatcher
from engine.server.turns import ModelTurns

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

RNG = np.random.default_rng(5)
PROMPTS = [[int(i) for i in RNG.integers(3, 380, n)] for n in (7, 30, 45)]
SAMPLING = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=42),
            SamplingParams(temperature=0.0, repeat_penalty=1.3)]
MAX_TOKENS = [4, 6, 8]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), TinySpec(seed=9), gguf_types=("f32",), hf=False)["f32"]
    return engine.load(path, dca=engine.DCAConfig(chunk_size=16, local_window=4), context=64, slots=3)


def test_slots_decoding_together_get_what_they_get_alone(llm):
    alone = [list(llm.session(slot=i).generate_ids(p, n, s, stop_ids=[]))
             for i, (p, n, s) in enumerate(zip(PROMPTS, MAX_TOKENS, SAMPLING))]
    sizes = []
    batcher = DecodeBatcher(llm.model, ModelTurns(), sizes.append)
    streams = [llm.session(slot=i).generate_ids(p, n, s, stop_ids=[], decoders=batcher)
               for i, (p, n, s) in enumerate(zip(PROMPTS, MAX_TOKENS, SAMPLING))]
    firsts = [next(stream) for stream in streams]  # the prefills, one after another: each decoder joins
    with ThreadPoolExecutor(len(streams)) as pool:  # the decode steps, each slot in its own thread
        rests = list(pool.map(list, streams))
    assert [[first] + rest for first, rest in zip(firsts, rests)] == alone
    assert sizes == [3] * 3 + [2] * 2 + [1] * 2  # 3, 5 and 7 steps: every step waits for all decoders still going


def test_a_step_on_a_full_cache_fails_alone(llm):
    caches = llm.caches[:2]
    for prompt, cache in zip(PROMPTS[1:], caches):
        cache.reset()
        llm.model.forward(prompt, cache, logits_for="none")
    llm.model.forward(PROMPTS[1][:caches[1].free], caches[1], logits_for="none")
    assert caches[1].free == 0 and caches[0].free > 0
    expected = llm.model.forward(np.array([7]), caches[0], logits_for="last")[0]
    caches[0].truncate(caches[0].length - 1)

    sizes = []
    batcher = DecodeBatcher(llm.model, ModelTurns(), sizes.append)
    decoders = [batcher.decoder(llm.model, cache, SAMPLING[0], []) for cache in caches]
    start = threading.Barrier(2)

    def step(decoder):
        start.wait()
        try:
            return decoder.step(7)
        except ContextError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(step, decoders))
    assert results[0] == int(np.argmax(expected)) and caches[0].length == len(PROMPTS[1]) + 1
    assert isinstance(results[1], ContextError) and "do not fit" in str(results[1])
    assert sizes == [1]  # the full cache's step was not run
    for decoder in decoders:
        decoder.close()
    with ThreadPoolExecutor(1) as pool:  # both have left: a new decoder's step runs alone at once
        assert pool.submit(batcher.decoder(llm.model, caches[0], SAMPLING[0], []).step, 8).result(timeout=30) >= 0
    assert sizes == [1, 1]
