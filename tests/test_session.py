"""Sessions reuse the cached prefix of the previous sequence: the result equals a fresh prefill of the whole text."""
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.errors import ContextError
from engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
RNG = np.random.default_rng(7)
# prompts of 70 random ids sharing their first 45; with DCA chunk_len 12 the prefix spans 4 chunks
SHARED = [int(i) for i in RNG.integers(5, 380, 45)]
FIRST = SHARED + [int(i) for i in RNG.integers(5, 380, 25)]
SECOND = SHARED + [int(i) for i in RNG.integers(5, 380, 25)]
DCA_MODES = {"dca": engine.DCAConfig(chunk_size=16, local_window=4), "plain": "off"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), TinySpec(seed=5), gguf_types=("f32",), hf=False)["f32"]


@pytest.fixture(scope="module", params=sorted(DCA_MODES))
def llm(request, model_path):
    llm = engine.load(model_path, dca=DCA_MODES[request.param], context=128)
    llm.backend.prefill_batch = 16  # several prefill batches, not aligned with the shared prefix
    return llm


def fresh_generation(llm, prompt, n=8):
    return list(llm.generate_ids(prompt, n, GREEDY, stop_ids=[]))


def test_truncated_cache_plus_rest_equals_fresh_prefill(llm):
    cache = llm.new_cache()
    llm.prefill(FIRST, cache)
    cache.truncate(len(SHARED))
    logits = llm.prefill(SECOND[len(SHARED):], cache)
    k_reused, v_reused = cache.host_rows()
    expected = llm.logits(SECOND)[-1]
    k_fresh, v_fresh = llm.cache.host_rows()
    assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(k_reused, k_fresh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v_reused, v_fresh, rtol=1e-5, atol=1e-5)


def test_session_reuses_the_shared_prefix_and_generates_as_fresh(llm):
    expected = fresh_generation(llm, SECOND)
    session = llm.session()
    first = list(session.generate_ids(FIRST, 8, GREEDY, stop_ids=[]))
    assert first == fresh_generation(llm, FIRST)  # the fresh run took the cache over ...
    session_second = session.generate_ids  # ... so the session starts from empty again
    assert list(session_second(FIRST, 8, GREEDY, stop_ids=[])) == first and session.last_stats.cached_tokens == 0

    fed = []
    forward = llm.model.forward
    llm.model.forward = lambda tokens, cache, **kw: fed.append(len(tokens)) or forward(tokens, cache, **kw)
    try:
        second = list(session.generate_ids(SECOND, 8, GREEDY, stop_ids=[]))
    finally:
        del llm.model.forward
    assert second == expected
    assert session.last_stats.cached_tokens == len(SHARED)
    assert sum(fed) == len(SECOND) - len(SHARED) + 7  # the new prompt tokens, then one per decode step
    # the cache holds the prompt and every generated token but the last
    assert session.tokens == SECOND + second[:-1] and session.cache.length == len(session.tokens)


def test_repeating_the_whole_sequence_prefills_only_its_last_token(llm):
    session = llm.session()
    first = list(session.generate_ids(FIRST, 4, GREEDY, stop_ids=[]))
    again = list(session.generate_ids(FIRST + first, 4, GREEDY, stop_ids=[]))
    assert session.last_stats.cached_tokens == len(FIRST) + len(first) - 1
    assert again == fresh_generation(llm, FIRST + first, 4)


def test_the_prompts_last_token_alone_runs_as_a_decode_step(llm, monkeypatch):
    """With all but the prompt's last token cached, that token is the decoder's first step (decoder.start): no
    prefill runs, the tokens equal a fresh generation's, the stats count it as the prompt's, and the repetition
    penalty sees the whole prompt (the token once, not twice)."""
    penalized = SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=64)
    session = llm.session()
    list(session.generate_ids(FIRST, 1, GREEDY, stop_ids=[]))
    expected = {params: list(llm.generate_ids(FIRST, 6, params, stop_ids=[])) for params in (GREEDY, penalized)}
    for params, tokens in expected.items():
        list(session.generate_ids(FIRST, 1, GREEDY, stop_ids=[]))  # the session holds FIRST (and nothing after)
        monkeypatch.setattr(llm, "prefill", lambda *args, **kwargs: pytest.fail("prefilled the last token"))
        assert list(session.generate_ids(FIRST, 6, params, stop_ids=[])) == tokens
        monkeypatch.undo()
        stats = session.last_stats
        assert stats.cached_tokens == len(FIRST) - 1 and stats.generated_tokens == 6 and stats.prompt_seconds > 0


def test_a_stream_closed_early_leaves_tokens_matching_the_cache(llm):
    session = llm.session()
    stream = session.generate_ids(FIRST, 20, GREEDY, stop_ids=[])
    taken = [next(stream) for _ in range(3)]
    stream.close()
    assert session.tokens == FIRST + taken[:2] and session.cache.length == len(FIRST) + 2
    list(session.generate_ids(FIRST + taken, 2, GREEDY, stop_ids=[]))
    assert session.last_stats.cached_tokens == len(FIRST) + 2


def test_a_refused_prompt_keeps_the_session(llm):
    session = llm.session()
    list(session.generate_ids(FIRST, 2, GREEDY, stop_ids=[]))
    before = list(session.tokens)
    with pytest.raises(ContextError):
        list(session.generate_ids(SHARED * 3, 2, GREEDY))  # 135 tokens > context 128
    assert session.tokens == before and session.cache.length == len(before)
    list(session.generate_ids(FIRST, 1, GREEDY, stop_ids=[]))
    assert session.last_stats.cached_tokens == len(FIRST) - 1


def test_chat_turns_reuse_the_previous_turns(model_path):
    llm = engine.load(model_path, context=256)
    session = llm.session(system="Be brief.")
    answer = "".join(session.chat("Hello there", max_tokens=6, temperature=0))
    first_prompt = llm.chat_ids(session.messages[:2])
    assert session.messages[-1] == {"role": "assistant", "content": answer}
    "".join(session.chat("And then?", max_tokens=6, temperature=0))
    assert len(session.messages) == 5
    assert session.last_stats.cached_tokens >= len(first_prompt)
    assert session.last_stats.prompt_tokens == len(llm.chat_ids(session.messages[:4]))
    session.clear()
    assert session.messages == [{"role": "system", "content": "Be brief."}] and session.tokens == []
    with pytest.raises(ContextError):
        "".join(session.chat("hello " * 300))  # beyond the context: refused, the chat stays as it was
    assert session.messages == [{"role": "system", "content": "Be brief."}]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_sessions_on_their_own_slots_keep_their_sequences_side_by_side(model_path, device):
    """On CUDA each generation's decode graph is captured against its own slot's cache: alternating two of them
    step by step must give what each gives alone."""
    llm = engine.load(model_path, device=device, context=128, slots=2)
    one, two = llm.session(slot=0), llm.session(slot=1)
    expected = {"first": fresh_generation(llm, FIRST), "second": fresh_generation(llm, SECOND)}
    # interleaved token by token, as the server's slots run: neither disturbs the other's cache
    streams = [one.generate_ids(FIRST, 8, GREEDY, stop_ids=[]), two.generate_ids(SECOND, 8, GREEDY, stop_ids=[])]
    together = list(zip(*streams))
    assert [list(stream) for stream in streams] == [[], []]  # both ended (zip stopped at the first's end)
    assert [t[0] for t in together] == expected["first"] and [t[1] for t in together] == expected["second"]
    assert one.last_stats.generated_tokens == two.last_stats.generated_tokens == 8
    # each slot still holds its own sequence: a follow-up reuses it, and llm.generate (slot 0's cache) takes slot 0
    assert list(two.generate_ids(SECOND + expected["second"], 2, GREEDY, stop_ids=[]))
    assert two.last_stats.cached_tokens == len(SECOND) + 8 - 1
    fresh_generation(llm, SHARED)
    list(two.generate_ids(SECOND, 2, GREEDY, stop_ids=[]))
    list(one.generate_ids(FIRST, 2, GREEDY, stop_ids=[]))
    assert two.last_stats.cached_tokens == len(SECOND) - 1 and one.last_stats.cached_tokens == 0
    with pytest.raises(engine.ConfigError, match="slot 2 does not exist"):
        llm.session(slot=2)
