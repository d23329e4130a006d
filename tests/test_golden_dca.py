"""The numpy engine's DCA against an independent three-call DCA in HF transformers (tools/golden_dca.py).

Golden: 400 book tokens, chunk_size 96, local_window 32 (chunk_len 64), so positions 64.. use the
successive relation and 128.. the inter relation as well.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.default_model import locate_default_model

GOLDEN = Path(__file__).parent / "golden" / "dca_smollm2.npz"
META = GOLDEN.with_suffix(".json")

pytestmark = pytest.mark.skipif(locate_default_model() is None, reason="default model not installed")


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def dca():
    settings = json.loads(META.read_text())["dca"]
    return engine.DCAConfig(chunk_size=settings["chunk_size"], local_window=settings["local_window"])


@pytest.fixture(scope="module")
def logits(golden, dca):
    llm = engine.load(device="cpu", context=512, dca=dca)
    return llm.logits(golden["ids"].tolist())  # (n, vocab) float32


def next_logprobs(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    x = logits[:-1].astype(np.float64)  # (n-1, vocab)
    m = x.max(axis=1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x[np.arange(len(x)), ids[1:]] - log_z


def test_full_logits_rows_match(golden, logits):
    for row, expected in zip(golden["rows"], golden["row_logits"]):
        err = np.linalg.norm(logits[row] - expected) / np.linalg.norm(expected)
        assert err < 1e-4, f"position {row}: relative L2 error {err:.2e}"


def test_next_token_logprobs_match(golden, logits):
    diff = np.abs(next_logprobs(logits, golden["ids"]) - golden["next_logprobs"])
    assert diff.max() < 1e-3, f"max |log p - golden| = {diff.max():.2e} at position {diff.argmax()}"


def test_top1_and_top5_logits_match(golden, logits):
    assert (logits.argmax(axis=1) == golden["top5_ids"][:, 0]).all()
    top5 = np.take_along_axis(logits, golden["top5_ids"].astype(np.int64), axis=1)
    np.testing.assert_allclose(top5, golden["top5_logits"], atol=1e-3)


def test_golden_is_not_plain_attention(golden, dca):
    """Within the first chunk DCA is plain attention; past it the golden must differ from plain
    attention by far more than the tolerances above, so the tests above would catch a DCA that
    silently attends plainly."""
    diff = np.abs(golden["next_logprobs"].astype(np.float64) - golden["plain_next_logprobs"])  # (n-1,)
    first_chunk = dca.chunk_len  # rows 0 .. cl-1: queries inside chunk 0
    assert diff[:first_chunk].max() < 1e-3
    assert diff[first_chunk:].max() > 0.1
