"""`engine convert` / `engine quantize` commands, tools/convert.py, and what bad input and failures leave behind."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from engine.convert import convert_gguf_to_hf, convert_hf_to_gguf, quantize_gguf
from engine.convert import tensors as tensors_module
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
    (["{gguf}", "{out}/x", "--threads", "2"], "--threads: not used when exporting to HF"),
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


def test_quantize_of_an_hf_folder_points_to_convert(tiny, tmp_path):
    result = CliRunner().invoke(quantize, [str(tiny["hf"]), str(tmp_path / "q.gguf"), "q8_0"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "is a folder" in str(result.exception) and "engine convert" in str(result.exception)
    assert leftovers(tmp_path) == []


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

    def failing_chunks(self, threads=1):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        yield from original_chunks(self, threads)

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


# ------------------------------------------------------------------------------------------ file types

def test_unknown_file_type_is_one_error_line(tiny, tmp_path):
    script = [sys.executable, str(REPO / "tools" / "convert.py")]
    for args in (["quantize", str(tiny["f32"]), str(tmp_path / "q.gguf"), "q3_k_m"],
                 ["convert", str(tiny["hf"]), str(tmp_path / "q.gguf"), "--type", "q3_k_m"]):
        done = subprocess.run(script + args, capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("error: unknown file type 'q3_k_m' (choose from f32, f16, bf16, q8_0, q6_k")
    assert leftovers(tmp_path) == []


def test_k_quant_summary_counts_types_and_bits(tmp_path):
    source = tmp_path / "toy.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    rng = np.random.default_rng(0)
    writer.add_tensor("blk.0.attn_v.weight", rng.normal(size=(8, 256)).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.normal(size=(8, 256)).astype(np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = CliRunner().invoke(quantize, [str(source), str(tmp_path / "q.gguf"), "Q4_K_M", "--no-progress"])
    assert result.exit_code == 0, result.output
    # one layer: attn_v gets Q6_K (use_more_bits), attn_q Q4_K; 2048*(6.5625 + 4.5)/8 + 1024 bytes = 3856 bytes
    assert "3 tensors (1 Q6_K, 1 Q4_K, 1 F32)" in result.stderr
    assert f"{8 * 3856 / 4352:.2f} bits/weight" in result.stderr
    assert GGUFFile(tmp_path / "q.gguf").metadata["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_thread_count_does_not_change_the_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 4 * 256)  # a few rows a slab: several slabs per matrix
    outputs = []
    for threads in ("1", "3"):
        out = tmp_path / f"q{threads}.gguf"
        result = CliRunner().invoke(quantize, [str(tiny["f32"]), str(out), "q4_k_m", "-t", threads, "--no-progress"])
        assert result.exit_code == 0, result.output
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    result = CliRunner().invoke(quantize, [str(tiny["f32"]), str(tmp_path / "q.gguf"), "q4_k_m", "--threads", "0"])
    assert isinstance(result.exception, ConfigError) and "thread count must be at least 1, got 0" in str(result.exception)
    assert not (tmp_path / "q.gguf").exists()


def test_value_a_type_cannot_hold_is_one_error_naming_the_tensor(tmp_path):
    source = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(source, "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.full((2, 64), 1e5, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="tensor 'blk.0.ffn_up.weight': value 100000 is beyond the F16 range"):
        quantize_gguf(source, tmp_path / "out.gguf", "f16", progress=False)
    assert leftovers(tmp_path) == ["big.gguf"]


def test_disk_full_mid_write_leaves_no_file(tiny, tmp_path, monkeypatch):
    """The file system refuses a write half-way through the tensor data (ENOSPC): one error, nothing left."""
    original = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def write_until_full(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_until_full)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(quantize, [str(tiny["f32"]), str(out / "q.gguf"), "q4_k_m", "--no-progress"])
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == f"{out / 'q.gguf'}: cannot write: No space left on device"
    assert calls["n"] == 4 and leftovers(out) == []


def test_partial_outputs_of_killed_runs_are_removed(tiny, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_file = tmp_path / f".q.gguf.{dead_pid}.k2j4.partial"
    stale_file.write_bytes(b"half a file")
    stale_folder = tmp_path / f".hf.{dead_pid}.x9.partial"
    (stale_folder / "sub").mkdir(parents=True)
    alive = tmp_path / f".q.gguf.{os.getppid()}.a1.partial"  # a running writer's: kept
    alive.write_bytes(b"in progress")
    other = tmp_path / f".other.gguf.{dead_pid}.b2.partial"  # another output's: not this run's business
    other.write_bytes(b"x")
    result = CliRunner().invoke(quantize, [str(tiny["f32"]), str(tmp_path / "q.gguf"), "q8_0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"warning: removed 1 partial output(s) of an interrupted run: {stale_file.name}" in result.stderr
    convert_gguf_to_hf(tiny["f32"], tmp_path / "hf", progress=False)
    assert leftovers(tmp_path) == sorted([alive.name, other.name, "hf", "q.gguf"])
