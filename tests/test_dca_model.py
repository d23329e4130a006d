"""DCA on the default model (the DCA issue's acceptance checks that need a real model)."""
import numpy as np
import pytest

import engine
from engine.default_model import locate_default_model
from prose import prose

pytestmark = pytest.mark.skipif(locate_default_model() is None, reason="default model not installed")


def prose_tokens(llm, n):
    ids = llm.tokenize(prose()[: n * 8])
    assert len(ids) >= n
    return ids[:n]


def test_one_pass_prefill_equals_prefill_plus_decode_with_dca():
    llm = engine.load(dca=engine.DCAConfig(chunk_size=96, local_window=32))
    ids = prose_tokens(llm, 400)
    whole = llm.logits(ids)
    cache = llm.new_cache()
    rows = [llm.model.forward(np.array(ids[:150]), cache)]
    rows += [llm.model.forward(np.array([t]), cache) for t in ids[150:]]
    pieces = np.concatenate(rows)
    assert np.abs(pieces - whole).max() <= 1e-4 * np.abs(whole).max()


def test_dca_keeps_perplexity_where_rope_is_fine():
    """2k tokens (inside the 8k training context, six DCA chunks): DCA with cs=448, w=128 within 10% of plain
    RoPE."""
    plain = engine.load(dca="off", context=2048)
    ids = prose_tokens(plain, 2048)
    ppl_plain = float(np.exp(-plain.token_logprobs(ids).mean()))
    dca = engine.load(dca=engine.DCAConfig(chunk_size=448, local_window=128), context=2048)
    ppl_dca = float(np.exp(-dca.token_logprobs(ids).mean()))
    print(f"PPL over 2048 tokens: plain RoPE {ppl_plain:.3f}, DCA(448, 128) {ppl_dca:.3f}")
    assert ppl_dca <= 1.10 * ppl_plain
