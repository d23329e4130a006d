"""Options declared once (engine/options.py): every command takes them, and they reach the model it loads."""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine.api
from engine import bench as bench_module
from engine.api import LLM
from engine.bench import bench
from engine.cli import generate, info
from engine.errors import ConfigError
from engine.eval import passkey as passkey_module
from engine.eval import ppl as ppl_module
from engine.eval.commands import eval_group
from engine.options import OPTIONS, SAMPLING_OPTIONS, LoadSettings, load_options
from engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TRAINING_TEXT, TinySpec, make_tiny_model  # noqa: E402

L = 256  # training context of the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("options"), TinySpec(context_length=L), gguf_types=("f32",),
                           hf=False)["f32"]


@pytest.fixture
def loaded(monkeypatch):
    """Every LLM that engine.load returns (the commands and LoadSettings.load all go through it)."""
    models: list[LLM] = []
    original = engine.api.load

    def recording(*args, **kwargs):
        models.append(original(*args, **kwargs))
        return models[-1]

    for module in (engine.api, ppl_module, passkey_module):
        monkeypatch.setattr(module, "load", recording)
    return models


def _option_names(command) -> set[str]:
    return {opt for p in command.params for opt in p.opts}


def test_settings_and_options_match():
    assert list(OPTIONS) == [f.name for f in dataclasses.fields(LoadSettings)]
    assert list(SAMPLING_OPTIONS) == [f.name for f in dataclasses.fields(SamplingParams)]
    every = {"-m", "-c", "--device", "--dtype", "--dca", "--dca-chunk-size", "--dca-local-window", "--rope-scaling",
             "--rope-scale", "--attn-temperature"}
    for command in (generate, info, bench):
        assert every <= _option_names(command), command.name
    for name in ("ppl", "passkey"):  # the methods set DCA and RoPE, the lengths the context
        names = _option_names(eval_group.commands[name])
        assert every - names == {"-c", "--dca", "--rope-scaling", "--rope-scale"}, name
    with pytest.raises(ValueError, match="no such setting"):
        load_options(without=("ctx_size",))


def test_sampling_defaults_come_from_sampling_params():
    defaults = SamplingParams()
    by_name = {p.name: p.default for p in generate.params}
    for field in dataclasses.fields(SamplingParams):
        expected = -1 if field.name == "seed" else getattr(defaults, field.name)  # -1: a random seed
        assert by_name[field.name] == expected, field.name
    signature = inspect.signature(LLM.generate).parameters
    assert {f.name: signature[f.name].default for f in dataclasses.fields(SamplingParams)} == \
        dataclasses.asdict(defaults)


def test_generate_passes_its_sampling_options(tiny, monkeypatch):
    seen = []

    def recording(self, prompt, max_tokens=128, chat=False, system=None, **sampling):
        seen.append(SamplingParams(**sampling))
        return iter(["ok"])

    monkeypatch.setattr(LLM, "generate", recording)
    result = CliRunner().invoke(generate, ["-m", str(tiny), "--device", "cpu", "-p", "hi", "--temp", "0.5",
                                           "--top-k", "7", "--min-p", "0", "-s", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [SamplingParams(temperature=0.5, top_k=7, min_p=0.0, seed=3)]
    bad = CliRunner().invoke(generate, ["-m", str(tiny), "--device", "cpu", "-p", "hi", "--top-p", "0"])
    assert isinstance(bad.exception, ConfigError) and "top-p" in str(bad.exception)


def test_bench_takes_the_load_options_and_they_reach_the_model(tiny, loaded):
    args = ["-m", str(tiny), "--device", "cpu", "-p", "16", "-d", "8", "-n", "2", "-r", "1", "--json", "--no-hf",
            "-c", "1024", "--dca", "on", "--dca-chunk-size", "96", "--dca-local-window", "32",
            "--rope-scaling", "yarn", "--rope-scale", "3", "--attn-temperature"]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dca"] is True
    (llm,) = loaded
    assert llm.context == 1024 and (llm.dca.chunk_size, llm.dca.local_window) == (96, 32)
    assert (llm.config.rope.scaling, llm.config.rope.factor) == ("yarn", 3.0)
    assert llm.model.temperature_length == L


def test_bench_context_defaults_to_the_longest_test_and_refuses_less(tiny, loaded):
    result = CliRunner().invoke(bench, ["-m", str(tiny), "--device", "cpu", "-p", "16", "-d", "8", "-n", "4",
                                        "-r", "1", "--json", "--no-hf"])
    assert result.exit_code == 0, result.output
    assert loaded[0].context == 16 and loaded[0].dca is None  # max(16, 8 + 4 + 1); within training: no DCA
    short = CliRunner().invoke(bench, ["-m", str(tiny), "--device", "cpu", "-p", "64", "-d", "0", "-n", "2", "-c", "32",
                                       "--no-hf"])
    assert isinstance(short.exception, ConfigError) and "shorter than the longest test (64" in str(short.exception)


def test_bench_synthetic_without_a_model_has_smollm2s_shapes(monkeypatch, loaded):
    small = dataclasses.replace(bench_module.SMOLLM2_CONFIG, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                head_dim=16, ffn_dim=96, vocab_size=320,  # SmolLM2's, shrunk to stay fast
                                rope=dataclasses.replace(bench_module.SMOLLM2_CONFIG.rope, dim=16))
    monkeypatch.setattr(bench_module, "SMOLLM2_CONFIG", small)
    result = CliRunner().invoke(bench, ["--synthetic", "--device", "cpu", "-p", "8", "-d", "0", "-n", "2", "-r", "1",
                                        "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == small.name
    (llm,) = loaded
    assert llm.config == small and llm.loaded.weights["blk.1.ffn_up"].shape == (96, 64)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "book.txt"
    path.write_text(TRAINING_TEXT * 2, encoding="utf-8")
    return path


def test_eval_ppl_takes_the_load_options_and_loads_once(tiny, text_file, loaded):
    result = CliRunner().invoke(eval_group, ["ppl", "-m", str(tiny), "--device", "cpu", "--text", str(text_file),
                                             "--lengths", "64,320", "--method", "rope,pi,dca", "--attn-temperature",
                                             "--dca-chunk-size", "96", "--dca-local-window", "32"])
    assert result.exit_code == 0, result.output
    (llm,) = loaded  # one load for 6 cells, at the longest length
    assert llm.context == 320 and llm.model.temperature_length == L
    assert (llm.dca.chunk_size, llm.dca.local_window) == (96, 32)  # the last cell: dca at 320


def test_eval_passkey_takes_the_load_options_and_loads_once(tiny, loaded, tmp_path):
    out = tmp_path / "passkey.json"
    result = CliRunner().invoke(eval_group, ["passkey", "-m", str(tiny), "--device", "cpu", "--lengths", "300,400",
                                             "--depths", "0.5", "--method", "dca,rope", "--attn-temperature",
                                             "--dca-chunk-size", "96", "-n", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (llm,) = loaded  # one load for 4 cells, for the longest prompt and its answer
    longest = max(t["prompt_tokens"] for c in json.loads(out.read_text())["cells"] for t in c["results"])
    assert llm.context == longest + 2 and llm.model.temperature_length == L
    assert llm.dca is None and llm.config.rope.scaling == "none"  # the last cell: rope at 400


@pytest.mark.parametrize("option", [["-c", "512"], ["--dca", "on"], ["--rope-scaling", "yarn"]])
def test_eval_declines_what_its_methods_decide(tiny, text_file, option):
    result = CliRunner().invoke(eval_group, ["ppl", "-m", str(tiny), "--text", str(text_file), "--lengths", "64",
                                             *option])
    assert result.exit_code == 2 and "No such option" in result.output


@pytest.mark.parametrize("flag, copies", [("--f32-copies", True), ("--no-f32-copies", False), (None, True)])
def test_f32_copies_option_reaches_the_cpu_weights(tiny, loaded, flag, copies):
    """--[no-]f32-copies decides how the CPU backend keeps the matrices; unset, the plan decides (the tiny
    model's copies fit comfortably)."""
    args = ["-m", str(tiny), "--device", "cpu", "-p", "8", "-d", "0", "-n", "1", "-r", "1", "--json", "--no-hf"]
    result = CliRunner().invoke(bench, args + ([flag] if flag else []))
    assert result.exit_code == 0, result.output
    (llm,) = loaded
    assert llm.memory.f32_copies is copies and llm.backend.f32_copies is copies  # the plan, and what the backend did
