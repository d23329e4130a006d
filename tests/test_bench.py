"""`engine bench` on the CPU with a tiny model, and the synthetic weights it can run on."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.bench import SMOLLM2_CONFIG, bench, prefill_flops, synthetic_weight, synthetic_weights
from engine.loader import open_model
from engine.weights.quant import GGMLType

TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K,
         GGMLType.Q6_K)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_synthetic_weight_decodes_to_the_asked_scale(ggml_type):
    w = synthetic_weight("w", ggml_type, (64, 512), np.random.default_rng(0), scale=0.05)
    values = w.dequantize()
    assert values.shape == (64, 512) and np.isfinite(values).all()
    assert 0.01 < values.std() < 0.15  # O(scale), whatever the block format
    assert len(np.unique(values)) > 50  # real spread, not a constant


def test_synthetic_smollm2_has_every_tensor_with_its_shape():
    weights = synthetic_weights(SMOLLM2_CONFIG)
    c = SMOLLM2_CONFIG
    assert len(weights) == 2 + 9 * c.n_layers  # tied: no output tensor
    assert weights["blk.29.ffn_down"].shape == (c.d_model, c.ffn_dim)
    assert weights["blk.0.attn_k"].ggml_type == GGMLType.Q4_1 and weights["token_embd"].ggml_type == GGMLType.Q8_0
    assert math.isclose(float(weights["blk.3.attn_norm"].dequantize().mean()), 1.0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import VARIANTS, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("bench"), VARIANTS["gqa"], gguf_types=("q8_0",), hf=False)["q8_0"]


def test_bench_json_reports_every_test(tiny_gguf):
    result = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "-p", "16,40", "-d", "8",
                                        "-n", "4", "-r", "2", "--json", "--no-hf"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the progress lines go to stderr, one as each test starts and ends
    assert report["device"] == "cpu" and report["dca"] is False
    progress = [line for line in result.stderr.splitlines() if line.startswith("bench: ")]
    assert progress[0] == "bench: pp16 @ 0 (test 1 of 3: a warm-up run and 2 timed)..." and len(progress) == 6
    assert progress[-1].startswith("bench: tg4 @ 8: ") and progress[-1].endswith(" tokens/s")
    assert [(r["test"], r["depth"], r["runs"]) for r in report["results"]] == [
        ("pp16", 0, 2), ("pp40", 0, 2), ("tg4", 8, 2)]
    assert all(r["tokens_per_s"] > 0 and r["sd"] >= 0 for r in report["results"])
    # prompt tests: the FLOP/s of prefill_flops at that rate, against the matrix peak measured in the run
    assert report["matmul_peak_tflops"] > 0 and report["matmul_peak"].startswith("float32 GEMM")
    config = open_model(tiny_gguf).config
    for r in report["results"]:
        assert ("tflops" in r) == r["test"].startswith("pp")
        if "tflops" in r:
            assert math.isclose(r["tflops"], prefill_flops(config, r["tokens"]) * r["tokens_per_s"] / r["tokens"] / 1e12)
            assert math.isclose(r["peak_fraction"], r["tflops"] / report["matmul_peak_tflops"])


def test_prefill_flops_counts_products_and_causal_pairs():
    c = SMOLLM2_CONFIG  # 30 layers, d 576, 9 / 3 heads of 64, ffn 1536
    per_layer_weights = 576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536
    assert prefill_flops(c, 1) == 30 * (2 * per_layer_weights + 4 * 576 * 1)
    assert prefill_flops(c, 100) == 30 * (2 * 100 * per_layer_weights + 4 * 576 * 5050)


def test_bench_context_holds_the_longest_generation_test(tiny_gguf):
    # the generation test is the longest (16 + 4 + warm-up steps): the default context must hold all of it
    result = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "-p", "8", "-d", "0,16",
                                        "-n", "4", "-r", "1", "--json", "--no-hf"])
    assert result.exit_code == 0, result.output
    assert [r["test"] for r in json.loads(result.stdout)["results"]] == ["pp8", "tg4", "tg4"]


def test_bench_measures_transformers_on_the_same_gguf(tiny_gguf):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    result = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "-p", "16", "-d", "8", "-n", "4",
                                        "-r", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("{"):])["results"]
    for row in rows:
        assert row["hf_tokens_per_s"] > 0
        assert math.isclose(row["speedup_vs_hf"], row["tokens_per_s"] / row["hf_tokens_per_s"])


def test_bench_keeps_its_table_when_transformers_fails(tiny_gguf, monkeypatch):
    """HF transformers is an optional peer: where it cannot run the model (here: its GGUF loader wanting accelerate),
    the engine's rows stand, without the HF columns, and stderr says why."""
    import engine.bench as bench_module

    def refuse(*args, **kwargs):
        raise ValueError("accelerate is required when loading a GGUF file `pip install accelerate`.")

    monkeypatch.setattr(bench_module, "hf_available", lambda: True)
    monkeypatch.setattr(bench_module, "hf_results", refuse)
    result = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "-p", "8", "-d", "0", "-n", "2",
                                        "-r", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert [set(r) & {"hf_tokens_per_s", "speedup_vs_hf"} for r in json.loads(result.stdout)["results"]] == [set()] * 2
    assert ("bench: HF transformers could not run this model (ValueError: accelerate is required when loading a GGUF "
            "file `pip install accelerate`.); the table leaves it out") in result.stderr


def test_bench_table_and_bad_lengths(tiny_gguf):
    result = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "--synthetic", "-p", "8", "-d", "0",
                                        "-n", "2", "-r", "1"])
    assert result.exit_code == 0, result.output
    assert "synthetic weights" in result.output and "|      pp8 |" in result.output and "tg2" in result.output
    bad = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "-p", "8,x"])
    assert bad.exit_code != 0 and "comma-separated integers" in bad.output


def test_presets_are_real_shapes_that_q4_k_can_store():
    from engine.models.presets import PRESETS

    assert {"llama3.2-1b", "llama2-7b", "llama3-8b", "llama3-70b", "qwen2.5-7b", "qwen2.5-14b"} <= set(PRESETS)
    for name, c in PRESETS.items():
        assert c.d_model % 256 == 0 and c.ffn_dim % 256 == 0 and c.n_heads * c.head_dim == c.d_model, name
    assert PRESETS["qwen2.5-7b"].architecture == "qwen2" and PRESETS["llama3-70b"].n_layers == 80


def test_bench_shape_runs_and_saves_a_gguf_llama_cpp_can_read(tmp_path, monkeypatch):
    """A small stand-in preset (the real ones take GBs): bench runs on its random weights, and --save-gguf writes
    them with llama.cpp's names, Q4_K matrices and a Q6_K head, which the engine loads back."""
    import dataclasses

    import gguf

    import engine
    from engine import bench as bench_module
    from engine.models import presets

    small = dataclasses.replace(presets.PRESETS["qwen2.5-7b"], n_layers=2, d_model=256, n_heads=4, n_kv_heads=2,
                                head_dim=64, ffn_dim=512, vocab_size=49152 + 48,
                                rope=dataclasses.replace(presets.PRESETS["qwen2.5-7b"].rope, dim=64))
    monkeypatch.setitem(presets.PRESETS, "qwen2.5-7b", small)
    result = CliRunner().invoke(bench, ["--shape", "qwen2.5-7b", "--device", "cpu", "-p", "16", "-n", "2", "-d", "0",
                                        "-r", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["test"] for r in json.loads(result.stdout)["results"]] == ["pp16", "tg2"]
    out = tmp_path / "q.gguf"
    result = CliRunner().invoke(bench, ["--shape", "qwen2.5-7b", "--save-gguf", str(out)])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t.tensor_type for t in reader.tensors}
    # one token per embedding row, as llama.cpp requires: the donor's 49152 padded with unused tokens
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152 + 48
    assert list(reader.fields["tokenizer.ggml.token_type"].contents()[-48:]) == [5] * 48
    assert tensors["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert tensors["output.weight"] == gguf.GGMLQuantizationType.Q6_K and "blk.1.attn_v.bias" in tensors
    assert engine.load(out, context=32).config.architecture == "qwen2"
    assert bench_module.shape_model("qwen2.5-7b").config == small
    again = tmp_path / "donor.gguf"  # the vocabulary from -m: no default model needed
    result = CliRunner().invoke(bench, ["--shape", "qwen2.5-7b", "--save-gguf", str(again), "-m", str(out)])
    assert result.exit_code == 0, result.output
    assert gguf.GGUFReader(again).fields["tokenizer.ggml.tokens"].data == reader.fields["tokenizer.ggml.tokens"].data
    bare = tmp_path / "bare.gguf"  # a GGUF without a tokenizer: one clear error, no traceback
    writer = gguf.GGUFWriter(str(bare), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = CliRunner().invoke(bench, ["--shape", "qwen2.5-7b", "--save-gguf", str(tmp_path / "x.gguf"), "-m", str(bare)])
    assert result.exit_code != 0 and "no tokenizer.ggml.tokens" in str(result.exception or result.output)


@pytest.mark.cuda
def test_matmul_peak_on_cuda_is_a_tensor_core_rate():
    from engine.backends.cuda import CudaBackend
    from engine.bench import matmul_peak

    flops, what = matmul_peak(CudaBackend("f16"))
    assert what == "fp16 GEMM 8192^2" and 20e12 < flops < 5e15  # any tensor-core GPU; an H100 gives ~700 TFLOP/s


def test_bench_zero_skips_prompt_or_generation_tests_as_llama_bench_does(tiny_gguf):
    """-p 0 runs no prompt test and -n 0 no generation test (llama-bench's meaning); nothing left is an error."""
    def tests(*args):
        result = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "-r", "1", "--json", "--no-hf",
                                            *args])
        assert result.exit_code == 0, result.output
        return [(r["test"], r["depth"]) for r in json.loads(result.stdout)["results"]]

    assert tests("-p", "0", "-n", "4", "-d", "0,8") == [("tg4", 0), ("tg4", 8)]
    assert tests("-p", "8,0,16", "-n", "0", "-d", "8") == [("pp8", 0), ("pp16", 0)]
    empty = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "-p", "0", "-n", "0"])
    assert empty.exit_code != 0 and "no test left" in empty.output
    negative = CliRunner().invoke(bench, ["-m", str(tiny_gguf), "--device", "cpu", "-n", "-1"])
    assert negative.exit_code != 0 and "not negative" in negative.output
