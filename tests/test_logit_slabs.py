"""Bounded logits (LLM.logits / token_logprobs compute the head a slab of rows at a time) and LLM.relayout."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import api
from engine.models import Llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

L = 256  # training context of the tiny model
N = 300  # tokens scored: past L, over several prefill batches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("slabs"), TinySpec(context_length=L), gguf_types=("f32",),
                           hf=False)["f32"]


@pytest.fixture(scope="module")
def ids(tiny) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 384, N)


@pytest.fixture(scope="module")
def reference(tiny, ids):
    """Logits and log-probs of one prefill batch and one slab (the head over every row at once)."""
    llm = engine.load(tiny, device="cpu", context=N)
    llm.backend.prefill_batch = N
    logits = llm.logits(ids).astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return logits, log_softmax[np.arange(N - 1), ids[1:]]


@pytest.fixture
def head_rows(monkeypatch):
    """Rows of every Llama.head call, and a slab of 7 rows and a prefill batch of 64 tokens."""
    rows = []
    original = Llama.head

    def recording(self, x):
        rows.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(Llama, "head", recording)
    monkeypatch.setattr(api, "LOGIT_SLAB_BYTES", 7 * 4 * 384)
    monkeypatch.setattr(engine.backends.numpy_backend.NumpyBackend, "prefill_batch", 64)
    return rows


def test_slab_rows_fit_the_budget():
    for vocab in (384, 49152, 128256, api.LOGIT_SLAB_BYTES):
        rows = api.slab_rows(vocab)
        assert rows >= 1 and (rows == 1 or rows * 4 * vocab <= api.LOGIT_SLAB_BYTES)
        assert (rows + 1) * 4 * vocab > api.LOGIT_SLAB_BYTES
    assert api.slab_rows(49152) == 1365  # SmolLM2's vocabulary: 256 MiB of float32 rows


def test_logits_are_computed_in_slabs_and_returned_whole(tiny, ids, reference, head_rows):
    logits = engine.load(tiny, device="cpu", context=N).logits(ids)
    assert logits.shape == (N, 384) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference[0], rtol=1e-4, atol=1e-4)
    assert max(head_rows) == 7 and sum(head_rows) == N
    # each 64-token batch is cut into slabs of 7 (the last of a batch shorter): the batch never shows
    assert head_rows[:10] == [7] * 9 + [1]


def test_token_logprobs_hold_one_slab_at_a_time(tiny, ids, reference, head_rows):
    logprobs = engine.load(tiny, device="cpu", context=N).token_logprobs(ids)
    assert logprobs.shape == (N - 1,) and logprobs.dtype == np.float64
    np.testing.assert_allclose(logprobs, reference[1], rtol=1e-4, atol=1e-4)
    assert max(head_rows) == 7 and sum(head_rows) == N - 1  # no logits for the last token: nothing follows it


def test_one_token_has_no_logprobs(tiny, head_rows):
    assert engine.load(tiny, device="cpu", context=8).token_logprobs([5]).shape == (0,)
    assert head_rows == []


@pytest.mark.parametrize("layout", [
    dict(dca="on", dca_chunk_size=96, dca_local_window=32, rope_scaling="none", rope_scale=1.0),
    dict(dca="off", rope_scaling="yarn", rope_scale=2.0),
    dict(dca="on", dca_chunk_size=128, dca_local_window=16, rope_scaling="ntk", rope_scale=3.0),
    dict(dca="off", rope_scaling="dynamic", rope_scale=1.0),
])
def test_relayout_equals_a_fresh_load(tiny, ids, layout):
    llm = engine.load(tiny, device="cpu", context=N, dca="off", rope_scaling="linear", rope_scale=4.0)
    before = llm.logits(ids)
    llm.relayout(**layout)
    fresh = engine.load(tiny, device="cpu", context=N, **layout)
    assert llm.config.rope == fresh.config.rope and llm.dca == fresh.dca
    np.testing.assert_array_equal(llm.logits(ids), fresh.logits(ids))
    assert not np.allclose(before, fresh.logits(ids), atol=1e-3)  # the layout changed the scores


def test_relayout_rope_context_is_the_context_dynamic_ntk_scales_to(tiny, ids):
    llm = engine.load(tiny, device="cpu", context=2 * N, dca="off")
    llm.relayout(dca="off", rope_scaling="dynamic", rope_scale=1.0, rope_context=N)
    fresh = engine.load(tiny, device="cpu", context=N, dca="off", rope_scaling="dynamic", rope_scale=1.0)
    np.testing.assert_array_equal(llm.logits(ids), fresh.logits(ids))
