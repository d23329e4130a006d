"""engine eval passkey: the prompt builder (length and depth), keys, exact match, the run, CLI and JSON."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.api import LLM
from engine.default_model import locate_default_model
from engine.errors import ConfigError, ContextError
from engine.eval import passkey as passkey_module
from engine.eval.commands import eval_group
from engine.eval.passkey import (FILLER, INTRO, KEY_LINE, QUESTION, STYLES, build_prompt, is_correct, make_keys,
                                 plan_passkey, run_passkey)
from engine.loader import open_model
from engine.options import LoadSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SETTINGS = dict(device="cpu", dca_chunk_size=96, dca_local_window=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_passkey")
    return make_tiny_model(out, TinySpec(context_length=256), gguf_types=("f32",), hf=False)["f32"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny):
    return open_model(tiny).tokenizer


def _check_prompt(tokenizer, prompt, length, depth, key):
    assert abs(prompt.length - length) <= 0.01 * length, (prompt.length, length)
    assert abs(prompt.key_offset / prompt.length - depth) <= 0.02, (prompt.key_offset, prompt.length, depth)
    text = tokenizer.decode(prompt.ids, skip_special=True)
    lines = text.split("\n")
    assert lines[0] == INTRO and lines[-1] == QUESTION
    assert text.count(KEY_LINE.format(key=key)) == 1 and text.count(str(key)) == 2
    filler = " ".join(line for line in lines[1:-1] if line != KEY_LINE.format(key=key))
    sentences = re.findall(r"[^.]+\.", filler)
    assert [s.strip() for s in sentences] == [FILLER[i % len(FILLER)] for i in range(len(sentences))]
    # the token at key_offset starts the key's digits
    assert tokenizer.decode(prompt.ids[prompt.key_offset:prompt.key_offset + 8]).lstrip().startswith(str(key))
    assert str(key) not in tokenizer.decode(prompt.ids[:prompt.key_offset])


@pytest.mark.parametrize("length", [8192, 20000])  # the tiny tokenizer takes ~100 tokens for the intro
def test_prompt_length_and_depth_tiny_tokenizer(tiny_tokenizer, length):
    for depth in DEPTHS:
        _check_prompt(tiny_tokenizer, build_prompt(tiny_tokenizer, length, depth, 47213), length, depth, 47213)


def test_prompt_length_and_depth_default_tokenizer():
    path = locate_default_model()
    if path is None:
        pytest.skip("default model not installed")
    tokenizer = open_model(path).tokenizer
    for length in (1024, 3000):
        prompt = build_prompt(tokenizer, length, 0.5, 10507)
        assert abs(prompt.length - length) <= 0.01 * length
    for depth in DEPTHS:
        _check_prompt(tokenizer, build_prompt(tokenizer, 4096, depth, 99999), 4096, depth, 99999)


def test_spaced_style_is_one_paragraph_with_the_same_sentences(tiny_tokenizer):
    for depth in STYLES["spaced"][1]:
        prompt = build_prompt(tiny_tokenizer, 8192, depth, 31337, style="spaced")
        assert abs(prompt.length - 8192) <= 0.01 * 8192
        assert abs(prompt.key_offset / prompt.length - depth) <= 0.02
        text = tiny_tokenizer.decode(prompt.ids, skip_special=True)
        assert "\n" not in text and text.startswith(INTRO + " The grass is green. ") and text.endswith(". " + QUESTION)
        before, after = text[len(INTRO) + 1:-len(QUESTION) - 1].split(" " + KEY_LINE.format(key=31337) + " ")
        sentences = re.findall(r"[^.]+\.", before + " " + after)
        assert [s.strip() for s in sentences] == [FILLER[i % len(FILLER)] for i in range(len(sentences))]
    landmark = build_prompt(tiny_tokenizer, 2000, 0.5, 31337)
    spaced = build_prompt(tiny_tokenizer, 2000, 0.5, 31337, style="spaced")
    assert tiny_tokenizer.decode(landmark.ids).replace("\n", " ") == tiny_tokenizer.decode(spaced.ids)
    with pytest.raises(ConfigError, match="unknown passkey style 'ruler'"):
        build_prompt(tiny_tokenizer, 2000, 0.5, 31337, style="ruler")


def test_prompt_too_short(tiny_tokenizer):
    with pytest.raises(ConfigError, match="too short: the intro, key line and question alone take"):
        build_prompt(tiny_tokenizer, 40, 0.5, 12345)


def test_keys_are_five_digits_and_fixed_by_the_seed():
    keys = make_keys(7, 3, 5, 4)
    assert keys.shape == (3, 5, 4) and keys.min() >= 10000 and keys.max() <= 99999
    np.testing.assert_array_equal(keys, make_keys(7, 3, 5, 4))
    assert not np.array_equal(keys, make_keys(8, 3, 5, 4))


def test_exact_match():
    assert is_correct(" 12345. Remember it.", 12345)
    assert is_correct("12345", 12345)
    assert not is_correct(" 123456", 12345)
    assert not is_correct(" 1234", 12345)
    assert not is_correct(" the key is unknown", 12345)
    assert not is_correct(" 54321 or 12345", 12345)


def test_run_scores_the_answers(tiny, monkeypatch):
    """An oracle that reads the key out of the prompt when DCA is on, and answers 00000 otherwise."""
    seen = []

    def oracle(self, prompt_ids, max_tokens=128, sampling=None, stop_ids=None):
        seen.append((self.dca is not None, tuple(prompt_ids), sampling.temperature, max_tokens))
        key = re.search(r"pass key is (\d+)", self.detokenize(prompt_ids)).group(1)
        yield from self.tokenize(f" {key if self.dca is not None else '00000'}. Remember")

    monkeypatch.setattr(LLM, "generate_ids", oracle)
    plan = plan_passkey(LoadSettings(model=tiny, **SETTINGS), (300, 400), (0.0, 1.0), ("rope", "dca"), trials=2,
                        seed=3, max_new_tokens=5)
    cells = list(run_passkey(plan))
    assert [(c.length, c.method, c.depth) for c in cells] == [
        (n, m, d) for n in (300, 400) for m in ("rope", "dca") for d in (0.0, 1.0)]
    for cell in cells:
        assert cell.n_correct == (2 if cell.method == "dca" else 0)
        assert [t.key for t in cell.trials] == list(plan.keys()[(300, 400).index(cell.length),
                                                               (0.0, 1.0).index(cell.depth)])
    assert all(temperature == 0.0 and max_tokens == 5 for _, _, temperature, max_tokens in seen)
    rope_prompts = [ids for dca, ids, *_ in seen if not dca]
    dca_prompts = [ids for dca, ids, *_ in seen if dca]
    assert rope_prompts == dca_prompts  # every method sees the same prompts


def _invoke(*args):
    return CliRunner().invoke(eval_group, ["passkey", *map(str, args)])


def test_cli_real_run_table_json_and_plot(tiny, tmp_path):
    out, png = tmp_path / "passkey.json", tmp_path / "passkey.png"
    plot = ["--plot", png] if _has_matplotlib() else []
    result = _invoke("-m", tiny, "--lengths", "300", "--depths", "0,1", "--method", "rope,dca", "--trials", "1",
                     "--dca-chunk-size", "96", "--dca-local-window", "32", "-n", "3", "--json", out, *plot)
    assert result.exit_code == 0, result.output
    blocks = result.stdout.strip().split("\n\n")
    assert [b.splitlines()[0].split() for b in blocks] == [["passkey", m, "0", "1", "all"] for m in ("rope", "dca")]
    data = json.loads(out.read_text())
    assert {k: data[k] for k in ("version", "kind", "complete", "style", "lengths", "depths", "methods", "trials",
                                 "seed", "max_new_tokens", "dca")} == {
        "version": 1, "kind": "passkey", "complete": True, "style": "landmark", "lengths": [300], "depths": [0.0, 1.0],
        "methods": ["rope", "dca"], "trials": 1, "seed": 0, "max_new_tokens": 3,
        "dca": {"chunk_size": 96, "local_window": 32}}
    assert data["model"]["training_context"] == 256 and data["device"] == "cpu"
    assert len(data["cells"]) == 4
    for cell in data["cells"]:
        assert set(cell) == {"method", "length", "depth", "n_correct", "trials", "accuracy", "seconds",
                             "load_seconds", "results"}
        (trial,) = cell["results"]
        assert set(trial) == {"key", "output", "correct", "prompt_tokens", "key_offset"}
        assert trial["correct"] == is_correct(trial["output"], trial["key"])
        assert cell["n_correct"] == int(trial["correct"]) and abs(trial["prompt_tokens"] - 300) <= 3
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_spaced_style_defaults_to_its_depths(tiny, tmp_path):
    out = tmp_path / "spaced.json"
    result = _invoke("-m", tiny, "--style", "spaced", "--lengths", "300", "--method", "rope", "-n", "2",
                     "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["style"] == "spaced" and data["depths"] == [0.125, 0.375, 0.625, 0.875]
    assert [c["depth"] for c in data["cells"]] == data["depths"]
    assert result.stdout.splitlines()[0].split() == ["passkey", "rope", "0.125", "0.375", "0.625", "0.875", "all"]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("args,error,words", [
    (["--lengths", "100000000"], ContextError, r"passkey prompts of 100000000 tokens .*: .* GiB needed"),
    (["--lengths", "40"], ConfigError, "too short"),
    (["--lengths", "300", "--depths", "0,1.5"], ConfigError, "outside"),
    (["--lengths", "300", "--trials", "0"], ConfigError, "--trials must be at least 1"),
    (["--lengths", "300", "--method", "dca", "--dca-local-window", "0"], ConfigError, "local_window"),
])
def test_cli_refuses_before_any_work(tiny, monkeypatch, args, error, words):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the request was refused")
    monkeypatch.setattr(passkey_module, "load", refuse)
    result = _invoke("-m", tiny, *args)
    assert isinstance(result.exception, error), result.output
    assert re.search(words, str(result.exception)), str(result.exception)


def test_cli_ctrl_c(tiny, monkeypatch, tmp_path):
    original = LLM.generate_ids
    calls = []

    def interrupt_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate_ids", interrupt_second)
    out = tmp_path / "partial.json"
    result = _invoke("-m", tiny, "--lengths", "300", "--depths", "0,1", "--method", "rope", "-n", "2",
                     "--json", out)
    assert result.exit_code == 130
    assert result.stdout.splitlines()[1].split()[2] == "-"  # depth 1 did not finish
    data = json.loads(out.read_text())
    assert data["complete"] is False and [c["depth"] for c in data["cells"]] == [0.0]
