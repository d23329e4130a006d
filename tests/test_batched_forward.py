"""Llama.forward_batch: several sequences' new tokens as one forward, each on its own cache, equals each sequence's
own forward (logits within float32 rounding, the same cache rows), with DCA active (chunks of 12 tokens) and
without, on float32 and on stored Q8_0 weights; one sequence is exactly forward; a full cache or bad input is
refused before any cache changes."""
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.errors import ConfigError, ContextError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(3, 380, n) for n in (5, 23, 40, 61)]  # with DCA: inside the first chunk .. the sixth
NEW = [RNG.integers(3, 380, n) for n in (1, 3, 1, 2)]  # decode steps and a few rows (varlen)
CONTEXT = 72
SETTINGS = {"dca-f32": (engine.DCAConfig(chunk_size=16, local_window=4), "f32", True),
            "plain-q8_0-stored": ("off", "q8_0", False)}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), TinySpec(seed=3), gguf_types=("f32", "q8_0"), hf=False)


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def llm(request, paths):
    dca, kind, f32_copies = SETTINGS[request.param]
    return engine.load(paths[kind], dca=dca, context=CONTEXT, slots=len(PROMPTS), f32_copies=f32_copies)


def prefilled(llm):
    """Every slot's cache holding its prompt."""
    for prompt, cache in zip(PROMPTS, llm.caches):
        cache.reset()
        llm.model.forward(prompt, cache, logits_for="none")
    return llm.caches


def test_a_batch_equals_each_sequence_alone(llm):
    alone = [llm.model.forward(new, cache, logits_for="last")[0] for new, cache in zip(NEW, prefilled(llm))]
    keys = [cache.k[:, :cache.length].copy() for cache in llm.caches]
    values = [cache.v[:, :cache.length].copy() for cache in llm.caches]

    batched = llm.model.forward_batch(NEW, prefilled(llm))
    assert batched.shape == (len(NEW), llm.config.vocab_size)
    for i, cache in enumerate(llm.caches):
        assert cache.length == len(PROMPTS[i]) + len(NEW[i])
        np.testing.assert_allclose(batched[i], alone[i], rtol=1e-5, atol=1e-5 * np.abs(alone[i]).max())
        np.testing.assert_allclose(cache.k[:, :cache.length], keys[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cache.v[:, :cache.length], values[i], rtol=1e-5, atol=1e-6)
    assert [int(np.argmax(row)) for row in batched] == [int(np.argmax(row)) for row in alone]


def test_one_sequence_is_forward_itself(llm):
    cache = prefilled(llm)[2]
    alone = llm.model.forward(NEW[2], cache, logits_for="last")
    cache.truncate(len(PROMPTS[2]))
    np.testing.assert_array_equal(llm.model.forward_batch([NEW[2]], [cache]), alone)


def test_a_full_cache_refuses_the_batch_before_any_cache_changes(llm):
    caches = prefilled(llm)
    llm.model.forward(PROMPTS[1][:CONTEXT - 1 - len(PROMPTS[3])], caches[3], logits_for="none")
    assert caches[3].free == 1  # sequence 3 brings two tokens
    lengths = [cache.length for cache in caches]
    keys = [cache.k.copy() for cache in caches]
    with pytest.raises(ContextError, match=r"^sequence 3 of the batch: 73 tokens do not fit in a context of 72"):
        llm.model.forward_batch(NEW, caches)
    assert [cache.length for cache in caches] == lengths
    assert all(np.array_equal(cache.k, k) for cache, k in zip(caches, keys))
    # without the full sequence the others run
    assert llm.model.forward_batch(NEW[:3], caches[:3]).shape == (3, llm.config.vocab_size)


def test_bad_batches_are_refused(llm):
    caches = prefilled(llm)
    with pytest.raises(ConfigError, match="each cache once"):
        llm.model.forward_batch([[5], [6]], [caches[0], caches[0]])
    with pytest.raises(ConfigError, match="at least one new token"):
        llm.model.forward_batch([[5], []], caches[:2])
    with pytest.raises(ConfigError, match="one cache per sequence"):
        llm.model.forward_batch([[5], [6]], caches[:1])
    assert [cache.length for cache in caches] == [len(p) for p in PROMPTS]
