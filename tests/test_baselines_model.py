"""Self-Extend and StreamingLLM through the whole engine on a tiny random model (training context 256):
one-pass prefill == prefill + cached decode, plain RoPE where they change nothing, load settings, the CLI."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from engine.cli import cli
from engine.errors import ConfigError
from engine.eval.methods import method_settings, self_extend_settings
from engine.extensions import resolve_extension
from engine.prompt_cache import session_settings
from engine.self_extend import SelfExtendConfig
from engine.streaming import StreamingConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

L = 256
SELF_EXTEND = {"grp_attn_n": 4, "grp_attn_w": 48}
STREAMING = {"streaming_sinks": 4, "streaming_window": 60}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_baselines"), TinySpec(context_length=L), gguf_types=("f32",),
                           hf=False)["f32"]


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 300, size=n)


@pytest.mark.parametrize("flags", [SELF_EXTEND, STREAMING])
def test_prefill_then_cached_decode_equals_one_pass(tiny, flags):
    llm = engine.load(tiny, device="cpu", context=600, **flags)
    ids = _ids(600)
    whole = llm.logits(ids)
    cache = llm.new_cache()
    rows = [llm.model.forward(ids[:150], cache)]  # prefill past the window, then one token at a time
    rows += [llm.model.forward(ids[t:t + 1], cache) for t in range(150, 600)]
    assert np.abs(np.concatenate(rows) - whole).max() <= 1e-4 * np.abs(whole).max()
    plain = engine.load(tiny, device="cpu", context=600, dca="off").logits(ids)
    assert np.abs(whole[200:] - plain[200:]).max() > 1e-3 * np.abs(plain).max()  # the methods do change logits


@pytest.mark.parametrize("flags,n_plain", [(SELF_EXTEND, 48), (STREAMING, 64), ({"grp_attn_n": 1}, 200)])
def test_short_prompts_are_plain_rope(tiny, flags, n_plain):
    """Within the neighbour window (Self-Extend) or S + R tokens (StreamingLLM) the logits are plain RoPE's."""
    ids = _ids(n_plain, seed=1)
    plain = engine.load(tiny, device="cpu", context=n_plain, dca="off").logits(ids)
    logits = engine.load(tiny, device="cpu", context=n_plain, **flags).logits(ids)
    assert np.abs(logits - plain).max() <= 1e-5 * np.abs(plain).max()


def test_relayout_switches_attention_like_a_fresh_load(tiny):
    ids = _ids(400, seed=2)
    llm = engine.load(tiny, device="cpu", context=400, dca="on")
    for flags in (SELF_EXTEND, STREAMING):
        llm.relayout(dca="off", **flags)
        fresh = engine.load(tiny, device="cpu", context=400, **flags).logits(ids)
        np.testing.assert_array_equal(llm.logits(ids), fresh)
    llm.relayout(dca="on")
    assert llm.extension is None and llm.dca is not None


def test_settings_select_one_attention(tiny):
    assert resolve_extension(4, 64) == SelfExtendConfig(4, 64)
    assert resolve_extension(streaming_window=100) == StreamingConfig(4, 100)
    assert resolve_extension(1, 64) is None
    with pytest.raises(ConfigError, match="exclude each other"):
        resolve_extension(4, 64, streaming_window=100)
    for dca in ({"dca": "on"}, {"dca_chunk_size": 96}, {"dca": engine.DCAConfig(96, 32)}):
        with pytest.raises(ConfigError, match="DCA exclude each other"):
            engine.load(tiny, device="cpu", context=400, **SELF_EXTEND, **dca)
    llm = engine.load(tiny, device="cpu", context=400, **STREAMING)  # --dca auto turns off beside them
    assert llm.dca is None and llm.extension == StreamingConfig(4, 60)


def test_session_files_record_the_attention(tiny):
    settings = [session_settings(engine.load(tiny, device="cpu", context=300, **flags))["dca"]
                for flags in ({"dca": "off"}, SELF_EXTEND, STREAMING, {"dca": "on"})]
    assert len(set(settings)) == 4


def test_method_settings():
    assert self_extend_settings(200, L) == (1, 32)
    group, window = self_extend_settings(4 * L, L)
    assert window == 32 and window + (4 * L - window) / group <= L / 2 < window + (4 * L - window) / (group - 1)
    cell = method_settings("self-extend", 4 * L, L)
    assert (cell.grp_attn_n, cell.grp_attn_w, cell.streaming_window, cell.dca) == (group, 32, None, "off")
    cell = method_settings("streaming", 4 * L, L)
    assert (cell.grp_attn_n, cell.streaming_sinks, cell.streaming_window, cell.dca) == (1, 4, L - 4, "off")
    cell = method_settings("dca", 4 * L, L, cell)  # a cell's settings never leak into the next method's
    assert (cell.grp_attn_n, cell.streaming_window, cell.dca) == (1, None, "on")


def test_cli_info_and_errors(tiny):
    runner = CliRunner()
    result = runner.invoke(cli, ["info", str(tiny), "-c", "1024", "--grp-attn-n", "4", "--grp-attn-w", "64"])
    assert result.exit_code == 0, result.output
    assert "Self-Extend: group size 4, neighbour window 64 (largest relative position 303)" in result.output
    result = runner.invoke(cli, ["info", str(tiny), "--streaming-window", "100"])
    assert "StreamingLLM: 4 sink tokens + a window of 100" in result.output
    # EngineErrors (one `error:` line from engine.cli.run)
    result = runner.invoke(cli, ["info", str(tiny), "--streaming-window", "100", "--dca", "on"])
    assert isinstance(result.exception, ConfigError) and "StreamingLLM and DCA exclude" in str(result.exception)
    result = runner.invoke(cli, ["generate", "-m", str(tiny), "--device", "cpu", "-p", "hello", "-n", "2",
                                 "--grp-attn-n", "0"])
    assert isinstance(result.exception, ConfigError) and "--grp-attn-n must be at least 1" in str(result.exception)
    result = runner.invoke(cli, ["generate", "-m", str(tiny), "--device", "cpu", "-p", "hello world", "-n", "3",
                                 "--temp", "0", "--streaming-window", "8"])
    assert result.exit_code == 0 and "attention: StreamingLLM: 4 sink tokens + a window of 8" in result.output
