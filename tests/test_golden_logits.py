"""The numpy reference engine against HF transformers on the default model (tools/golden_logits.py)."""
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.default_model import locate_default_model

GOLDEN = Path(__file__).parent / "golden" / "smollm2_logits.npz"
PROMPTS = ("capital", "chat", "book")

pytestmark = pytest.mark.skipif(locate_default_model() is None, reason="default model not installed")


@pytest.fixture(scope="module")
def llm():
    return engine.load(device="cpu")


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(llm, golden, prompt):
    ids = golden[f"{prompt}_ids"].tolist()
    rows = golden[f"{prompt}_positions"]
    expected = golden[f"{prompt}_logits"]  # (len(rows), vocab)
    got = llm.logits(ids)[rows]
    err = np.abs(got - expected).max()
    assert err <= 1e-3 * np.abs(expected).max(), f"max |logit - golden| = {err}"
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(llm, golden, prompt):
    ids = golden[f"{prompt}_ids"].tolist()
    expected = golden[f"{prompt}_greedy"].tolist()  # ends with EOS (2) when transformers stopped there
    n_new = len(expected) - (expected[-1] in llm.tokenizer.stop_ids)
    got = list(llm.generate_ids(ids, max_tokens=32, sampling=engine.SamplingParams(temperature=0.0)))
    assert got[:n_new] == expected[:n_new]
    if n_new < len(expected):  # transformers stopped at EOS: so must we
        assert len(got) == n_new and llm.last_stats.stop_reason == "eos"
