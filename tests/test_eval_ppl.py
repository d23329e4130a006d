"""engine eval ppl: methods -> load arguments, windowing, identical windows per method, NLL, CLI, JSON, errors.

A tiny random model (training context 256) with DCA chunk_size 96 / local_window 32 (chunk_len 64).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import engine

from engine.api import LLM
from engine.errors import ConfigError, ContextError
from engine.options import LoadSettings
from engine.eval import ppl as ppl_module
from engine.eval.commands import eval_group
from engine.eval.methods import METHODS, method_settings, parse_depths, parse_lengths, parse_methods
from engine.eval.ppl import plan_ppl, run_ppl, windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TRAINING_TEXT, TinySpec, make_tiny_model  # noqa: E402

L = 256  # training context of the tiny model
DCA_ARGS = ["--dca-chunk-size", "96", "--dca-local-window", "32"]
SETTINGS = LoadSettings(device="cpu", dca_chunk_size=96, dca_local_window=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_eval")
    return make_tiny_model(out, TinySpec(context_length=L), gguf_types=("f32",), hf=False)["f32"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "book.txt"
    path.write_text(TRAINING_TEXT * 4, encoding="utf-8")  # about 3.7k tiny-tokenizer tokens
    return path


# ---- methods ---------------------------------------------------------------------------------

def test_method_settings_within_training_context_are_plain_rope():
    for method in METHODS:
        cell = method_settings(method, 200, L, SETTINGS)
        assert cell.rope_scale == 1.0
        assert cell.dca == ("on" if method.startswith("dca") else "off")


def test_method_settings_beyond_training_context():
    expected = {"rope": ("none", 1.0), "pi": ("linear", 4.0), "ntk": ("ntk", 4.0), "dynamic": ("dynamic", 1.0),
                "yarn": ("yarn", 4.0), "dca": ("none", 1.0), "dca+ntk": ("ntk", 2.0)}
    for method, (scaling, factor) in expected.items():
        cell = method_settings(method, 4 * L, L, SETTINGS)
        assert (cell.rope_scaling, cell.rope_scale) == (scaling, factor), method
        assert cell.dca_chunk_size == 96 and cell.device == "cpu"  # the rest comes from the run's settings
    assert method_settings("dca+ntk", 4 * L, L, SETTINGS, ntk_factor=3.0).rope_scale == 3.0


def test_parsers():
    assert parse_lengths("512, 2k,128") == (128, 512, 2048)
    assert parse_methods("rope,DCA+ntk") == ("rope", "dca+ntk")
    assert parse_depths("1,0,0.5") == (0.0, 0.5, 1.0)
    for bad, parser, words in [("2048,abc", parse_lengths, "abc"), ("1", parse_lengths, "too short"),
                               ("64,64", parse_lengths, "repeats"), ("rope,alibi", parse_methods, "alibi"),
                               ("", parse_methods, "no method"), ("0.5,1.5", parse_depths, "outside")]:
        with pytest.raises(ConfigError, match=words):
            parser(bad)
    with pytest.raises(ConfigError, match="unknown method"):
        method_settings("alibi", 64, L)


# ---- windows ---------------------------------------------------------------------------------

def test_windows_are_consecutive_from_the_start():
    ids = np.arange(100, 130)
    w = windows(ids, 8, 3)
    np.testing.assert_array_equal(w, np.arange(100, 124).reshape(3, 8))
    with_bos = windows(ids, 8, 3, bos_id=1)
    np.testing.assert_array_equal(with_bos[:, 0], [1, 1, 1])
    np.testing.assert_array_equal(with_bos[:, 1:], w[:, 1:])
    with pytest.raises(ConfigError, match="too few"):
        windows(ids, 8, 4)


# ---- scoring ---------------------------------------------------------------------------------

@pytest.fixture
def recorded_calls(monkeypatch):
    """Every token_logprobs call: (rope scaling, rope factor, DCA on, window ids)."""
    calls = []
    original = LLM.token_logprobs

    def recording(self, ids):
        calls.append((self.config.rope.scaling, self.config.rope.factor, self.dca is not None, np.array(ids)))
        return original(self, ids)

    monkeypatch.setattr(LLM, "token_logprobs", recording)
    return calls


def test_every_method_scores_the_same_windows(tiny, text_file, recorded_calls):
    lengths, n_windows = (64, 320), 2
    plan = plan_ppl(dataclasses.replace(SETTINGS, model=tiny), [text_file], lengths, METHODS, n_windows)
    cells = list(run_ppl(plan))
    assert [(c.length, c.method) for c in cells] == [(n, m) for n in lengths for m in METHODS]
    ids = plan.texts[0].ids
    calls = iter(recorded_calls)
    for n in lengths:
        expected = windows(ids, n, n_windows)
        for method in METHODS:
            group = [next(calls) for _ in range(n_windows)]
            np.testing.assert_array_equal(np.stack([call[3] for call in group]), expected)
            cell = method_settings(method, n, L, SETTINGS)
            assert all(call[:3] == (cell.rope_scaling, cell.rope_scale, cell.dca == "on") for call in group)
    assert all(c.n_tokens == n_windows * (c.length - 1) for c in cells)
    nll = {(c.method, c.length): c.nll for c in cells}
    # at 64 tokens (<= chunk_len, <= L) every method is plain causal RoPE attention
    assert np.allclose([nll[m, 64] for m in METHODS], nll["rope", 64], rtol=1e-6, atol=0)
    # beyond L the scalings and DCA change the scores; dynamic NTK equals ntk at factor n/L here
    for method in ("pi", "ntk", "yarn", "dca", "dca+ntk", "self-extend", "streaming"):
        assert abs(nll[method, 320] - nll["rope", 320]) > 1e-4, method
    assert nll["dynamic", 320] == pytest.approx(nll["ntk", 320], rel=1e-6)
    assert abs(nll["dca+ntk", 320] - nll["dca", 320]) > 1e-4


def test_nll_is_the_mean_of_next_token_log_likelihoods(tiny, text_file):
    plan = plan_ppl(LoadSettings(model=tiny, device="cpu"), [text_file], [96], ["rope"], 2)
    (cell,) = run_ppl(plan)
    llm = engine.load(tiny, device="cpu", context=96, dca="off")
    total = 0.0
    for window in windows(plan.texts[0].ids, 96, 2):
        logits = llm.logits(window).astype(np.float64)  # (96, vocab)
        log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        total -= log_softmax[np.arange(95), window[1:]].sum()
    assert cell.n_tokens == 2 * 95
    assert cell.nll == pytest.approx(total / 190, rel=1e-6)
    assert cell.ppl == pytest.approx(math.exp(total / 190), rel=1e-6)


# ---- command line ----------------------------------------------------------------------------

def _invoke(*args):
    return CliRunner().invoke(eval_group, ["ppl", *map(str, args)])


def test_cli_table_and_json_schema(tiny, text_file, tmp_path):
    out = tmp_path / "ppl.json"
    result = _invoke("-m", tiny, "--text", text_file, "--lengths", "64,128", "--method", "rope,pi,dca,streaming",
                     "--windows", "2", *DCA_ARGS, "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["PPL", "64", "128"]
    assert [line.split()[0] for line in lines[1:]] == ["rope", "pi", "dca", "streaming"]
    data = json.loads(out.read_text())
    assert data["version"] == 1 and data["kind"] == "ppl" and data["complete"] is True
    assert data["model"] == {"path": str(tiny), "name": "tiny-llama-f32", "training_context": L}
    assert data["device"] == "cpu" and data["windows"] == 2
    assert data["lengths"] == [64, 128] and data["methods"] == ["rope", "pi", "dca", "streaming"]
    assert data["dca"] == {"chunk_size": 96, "local_window": 32} and data["ntk_factor"] == 2.0
    assert data["files"][0]["path"] == str(text_file) and data["files"][0]["tokens"] > 256
    assert len(data["cells"]) == 8
    for cell in data["cells"]:
        assert set(cell) == {"method", "length", "nll", "ppl", "n_tokens", "seconds", "load_seconds",
                             "rope_scaling", "rope_scale", "dca_on", "self_extend", "streaming"}
        assert cell["ppl"] == pytest.approx(math.exp(cell["nll"]))
        assert cell["n_tokens"] == 2 * (cell["length"] - 1)
        assert cell["dca_on"] == (cell["method"] == "dca")
        assert cell["self_extend"] is None  # G = 1 within the training context
        assert cell["streaming"] == ({"sinks": 4, "window": L - 4} if cell["method"] == "streaming" else None)
        value = lines[1 + data["methods"].index(cell["method"])].split()[1 + data["lengths"].index(cell["length"])]
        assert value == f"{cell['ppl']:.2f}"


def test_cli_plot(tiny, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "ppl.png"
    result = _invoke("-m", tiny, "--text", text_file, "--lengths", "32,64", "--method", "rope,ntk", "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if an evaluation loads a model: errors must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was refused")
    monkeypatch.setattr(ppl_module, "load", refuse)


@pytest.mark.parametrize("args,error,words", [
    (["--lengths", "4096"], ConfigError, r"book.txt has \d+ tokens, too few for 1 window\(s\) of 4096"),
    (["--lengths", "1024", "--windows", "4"], ConfigError, r"too few for 4 window\(s\) of 1024 tokens \(4096"),
    (["--lengths", "200000000"], ContextError, r"200000000 tokens: .*KV cache .* GiB needed .* available"),
    (["--lengths", "64", "--method", "rope,alibi"], ConfigError, "unknown method 'alibi'"),
    (["--lengths", "64", "--method", "dca", "--dca-chunk-size", "300"], ConfigError, "exceeds the model's training"),
    (["--lengths", "64", "--windows", "0"], ConfigError, "--windows must be at least 1"),
    (["--lengths", "64", "--json", "/nonexistent/dir/x.json"], ConfigError, "does not exist"),
    (["--lengths", "64", "--json", "/"], ConfigError, "is a folder"),
])
def test_cli_refuses_before_any_work(tiny, text_file, no_model_work, args, error, words):
    result = _invoke("-m", tiny, "--text", text_file, *args)
    assert isinstance(result.exception, error), result.output
    assert re.search(words, str(result.exception)), str(result.exception)


def test_cli_missing_text_file(tiny, tmp_path, no_model_work):
    result = _invoke("-m", tiny, "--text", tmp_path / "absent.txt", "--lengths", "64")
    assert isinstance(result.exception, ConfigError) and "absent.txt does not exist" in str(result.exception)


def test_cli_plot_without_matplotlib(tiny, text_file, tmp_path, monkeypatch, no_model_work):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = _invoke("-m", tiny, "--text", text_file, "--lengths", "64", "--plot", tmp_path / "p.png")
    assert isinstance(result.exception, ConfigError) and "needs matplotlib" in str(result.exception)


def test_cli_ctrl_c_prints_partial_results(tiny, text_file, tmp_path, monkeypatch):
    original = LLM.token_logprobs
    calls = []

    def interrupt_third(self, ids):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, ids)

    monkeypatch.setattr(LLM, "token_logprobs", interrupt_third)
    out = tmp_path / "partial.json"
    result = _invoke("-m", tiny, "--text", text_file, "--lengths", "32,64", "--method", "rope,pi", "--json", out)
    assert result.exit_code == 130
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.strip().splitlines()[1:]}
    assert rows["rope"][0] != "-" and rows["pi"][0] != "-"  # both 32-token cells finished
    assert rows["rope"][1] == "-" and rows["pi"][1] == "-"  # the 64-token ones did not
    data = json.loads(out.read_text())
    assert data["complete"] is False and [(c["method"], c["length"]) for c in data["cells"]] == [("rope", 32),
                                                                                                ("pi", 32)]
    assert "interrupted: 2 of 4 cells finished" in result.stderr
