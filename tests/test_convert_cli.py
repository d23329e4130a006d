"""`engine convert` / `engine quantize` commands, tools/convert.py, and what bad input and failures leave behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from engine.convert import convert_gguf_to_hf, convert_hf_to_gguf, quantize_gguf
from engine.convert.commands import convert, quantize
from engine.convert.tensors import TensorJob
from engine.errors import ConfigError, EngineError, ModelFormatError
from engine.weights.gguf import GGUFFile
from engine.weights.quant import GGMLType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from make_tiny_model import VARIANTS, make_tiny_model, write_safetensors  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), VARIANTS["gqa"], gguf_types=("f32",))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def hf_copy(tiny, folder: Path, edit_config=None) -> Path:
    shutil.copytree(tiny["hf"], folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------------------------------ commands

def test_convert_both_ways_and_quantize(tiny, tmp_path):
    runner = CliRunner()
    result = runner.invoke(convert, [str(tiny["hf"]), str(tmp_path / "m.gguf"), "--type", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and "MB/s" in result.stderr
    assert GGUFFile(tmp_path / "m.gguf").tensors["blk.0.ffn_up.weight"].ggml_type == GGMLType.Q8_0
    result = runner.invoke(convert, [str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    result = runner.invoke(quantize, [str(tmp_path / "m.gguf"), str(tmp_path / "q.gguf"), "Q4_0"])
    assert result.exit_code == 0, result.output
    assert GGUFFile(tmp_path / "q.gguf").tensors["blk.0.ffn_up.weight"].ggml_type == GGMLType.Q4_0
    result = runner.invoke(convert, [str(tmp_path / "m.gguf"), str(tmp_path / "g.gguf"), "--type", "q4_1"])
    assert result.exit_code == 0, result.output
    assert GGUFFile(tmp_path / "g.gguf").tensors["blk.0.ffn_up.weight"].ggml_type == GGMLType.Q4_1


@pytest.mark.parametrize("args,message", [
    (["{hf}", "{out}/x.gguf", "--dtype", "bf16"], "--dtype: not used when converting to GGUF"),
    (["{gguf}", "{out}/x", "--type", "q8_0"], "--type: not used when exporting to HF"),
    (["{gguf}", "{out}/x.gguf"], "GGUF -> GGUF needs --type"),
    (["{hf}", "{out}/x", "--to", "hf"], "is already an HF folder"),
    (["{out}/missing.gguf", "{out}/x"], "no such file or directory"),
])
def test_option_misuse_is_one_clear_error(tiny, tmp_path, args, message):
    args = [a.format(hf=tiny["hf"], gguf=tiny["f32"], out=tmp_path) for a in args]
    result = CliRunner().invoke(convert, args)
    assert isinstance(result.exception, EngineError) and message in str(result.exception)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x").exists()


def test_tools_script_runs_the_same_commands(tiny, tmp_path):
    script = [sys.executable, str(REPO / "tools" / "convert.py")]
    done = subprocess.run(script + ["quantize", str(tiny["f32"]), str(tmp_path / "q.gguf"), "q8_0", "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "wrote" in done.stderr, done.stderr
    again = subprocess.run(script + ["quantize", str(tiny["f32"]), str(tmp_path / "q.gguf"), "q8_0"],
                           capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.strip().endswith("already exists; use --force to overwrite it")
    assert again.stderr.count("\n") == 1 and again.stderr.startswith("error: ")


# ------------------------------------------------------------------------------------------ overwriting

def test_existing_file_needs_force(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="already exists; use --force"):
        convert_hf_to_gguf(tiny["hf"], out, progress=False)
    with pytest.raises(ConfigError, match="already exists; use --force"):
        quantize_gguf(tiny["f32"], out, "q8_0", progress=False)
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == ["m.gguf"]
    convert_hf_to_gguf(tiny["hf"], out, "f32", force=True, progress=False)
    assert GGUFFile(out).metadata["general.architecture"] == "llama"
    assert leftovers(tmp_path) == ["m.gguf"]


def test_quantize_refuses_to_overwrite_its_input(tiny, tmp_path):
    source = tmp_path / "m.gguf"
    shutil.copy(tiny["f32"], source)
    with pytest.raises(ConfigError, match="is the input file"):
        quantize_gguf(source, source, "q8_0", force=True, progress=False)
    assert source.read_bytes() == Path(tiny["f32"]).read_bytes()


def test_existing_folder_needs_force_and_must_be_a_model_folder(tiny, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty; use --force"):
        convert_gguf_to_hf(tiny["f32"], out, progress=False)
    with pytest.raises(ConfigError, match="not a model folder"):
        convert_gguf_to_hf(tiny["f32"], out, force=True, progress=False)
    assert leftovers(out) == ["notes.txt"] and leftovers(tmp_path) == ["hf"]
    (out / "config.json").write_text("{}")
    convert_gguf_to_hf(tiny["f32"], out, force=True, progress=False)
    assert "notes.txt" not in leftovers(out) and "model.safetensors" in leftovers(out)
    assert leftovers(tmp_path) == ["hf"]
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_gguf_to_hf(tiny["f32"], empty, progress=False)  # an empty folder is filled without --force
    assert "config.json" in leftovers(empty)


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("num_hidden_layers"), "missing key 'num_hidden_layers'"),
    (lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture"),
    (lambda c: c.update(num_key_value_heads=4), "has shape (32, 64), expected (64, 64)"),
])
def test_bad_hf_folder_is_one_error_and_leaves_nothing(tiny, tmp_path, edit, message):
    hf_dir = hf_copy(tiny, tmp_path / "hf", edit)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ModelFormatError) as caught:
        convert_hf_to_gguf(hf_dir, out_dir / "m.gguf", progress=False)
    assert message in str(caught.value) and str(hf_dir) in str(caught.value)
    assert leftovers(out_dir) == []


def test_mismatched_tensor_shape_is_an_error(tiny, tmp_path):
    hf_dir = hf_copy(tiny, tmp_path / "hf")
    weights = load_file(hf_dir / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:, :32]
    write_safetensors(hf_dir / "model.safetensors", weights, "f32")
    with pytest.raises(ModelFormatError, match="'blk.1.ffn_up' has shape \\(96, 32\\), expected \\(96, 64\\)"):
        convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", progress=False)
    assert leftovers(tmp_path) == ["hf"]


def test_tensors_without_a_place_are_refused_not_dropped(tiny, tmp_path):
    hf_dir = hf_copy(tiny, tmp_path / "hf")
    weights = load_file(hf_dir / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # a buffer: ignored
    write_safetensors(hf_dir / "model.safetensors", weights, "f32")
    convert_hf_to_gguf(hf_dir, tmp_path / "ok.gguf", "f32", progress=False)
    weights["model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float32)  # attention_bias: unsupported
    write_safetensors(hf_dir / "model.safetensors", weights, "f32")
    with pytest.raises(ModelFormatError, match="'model.layers.0.self_attn.q_proj.bias' has no place in a llama model"):
        convert_hf_to_gguf(hf_dir, tmp_path / "bad.gguf", progress=False)
    assert leftovers(tmp_path) == ["hf", "ok.gguf"]


def test_bad_gguf_is_one_error_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    for run in (lambda: convert_gguf_to_hf(bad, tmp_path / "hf", progress=False),
                lambda: quantize_gguf(bad, tmp_path / "q.gguf", "q8_0", progress=False)):
        with pytest.raises(ModelFormatError, match="bad.gguf"):
            run()
    assert leftovers(tmp_path) == ["bad.gguf"]


@pytest.mark.parametrize("direction", ["to_gguf", "to_hf", "quantize"])
def test_failure_while_writing_removes_the_partial_output(tiny, tmp_path, monkeypatch, direction):
    """A tensor that fails half-way (here the 5th; a full disk or Ctrl-C behave alike) leaves no file."""
    calls = {"n": 0}
    original_chunks = TensorJob.chunks

    def failing_chunks(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        yield from original_chunks(self)

    monkeypatch.setattr(TensorJob, "chunks", failing_chunks)
    out = tmp_path / "out"
    out.mkdir()
    run = {"to_gguf": lambda: convert_hf_to_gguf(tiny["hf"], out / "m.gguf", progress=False),
           "to_hf": lambda: convert_gguf_to_hf(tiny["f32"], out / "hf", progress=False),
           "quantize": lambda: quantize_gguf(tiny["f32"], out / "q.gguf", "q8_0", progress=False)}[direction]
    with pytest.raises(KeyboardInterrupt):
        run()
    assert calls["n"] == 5 and leftovers(out) == []


def test_write_error_becomes_an_engine_error(tiny, tmp_path, monkeypatch):
    def disk_full(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorJob, "data", disk_full)
    with pytest.raises(ConfigError, match="m.gguf: cannot write: No space left on device"):
        convert_hf_to_gguf(tiny["hf"], tmp_path / "m.gguf", progress=False)
    assert leftovers(tmp_path) == []


def test_output_permissions_follow_the_umask(tiny, tmp_path):
    convert_hf_to_gguf(tiny["hf"], tmp_path / "m.gguf", "f32", progress=False)
    convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~mask
    assert np.array_equal(GGUFFile(tmp_path / "m.gguf").tensor("output_norm.weight"),
                          GGUFFile(tiny["f32"]).tensor("output_norm.weight"))
