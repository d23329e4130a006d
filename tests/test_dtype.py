"""--dtype auto|f16|bf16, the activation dtype of the CUDA backend (runs everywhere, no GPU needed):
auto follows the stored matrices (BF16 -> bf16, else f16), an explicit dtype on the CPU backend is a
one-line ConfigError, every command with --device takes --dtype, and the host-side bf16 helpers round
as ggml does. The GPU side (kernels and whole models in bf16) is in test_cuda_ops.py / test_cuda_model.py.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from engine.backends import get_backend, resolve_dtype, stored_dtype
from engine.backends.numpy_backend import NumpyBackend
from engine.bench import bench
from engine.cli import cli
from engine.errors import ConfigError
from engine.eval.commands import eval_group
from engine.loader import open_model
from engine.options import LoadSettings

CPU_REFUSAL = "--dtype applies to --device cuda; the CPU backend computes in float32"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import VARIANTS, make_tiny_model

    paths = make_tiny_model(tmp_path_factory.mktemp("dtype"), VARIANTS["gqa"],
                            gguf_types=("f32", "f16", "bf16", "q4_1", "mixed"), hf=True, hf_dtype="bf16")
    paths["hf-f32"] = make_tiny_model(tmp_path_factory.mktemp("hf32"), VARIANTS["gqa"], gguf_types=(), hf=True)["hf"]
    return paths


@pytest.mark.parametrize("key,expected", [
    ("bf16", "bf16"), ("hf", "bf16"),  # GGUF BF16 tensors, safetensors BF16
    ("mixed", "bf16"),  # one BF16 family (ffn_up) among quantized and F16 ones: the model came in bf16
    ("f16", "f16"), ("f32", "f16"), ("q4_1", "f16"), ("hf-f32", "f16"),
])
def test_auto_follows_the_stored_matrices(tiny, key, expected):
    weights = open_model(tiny[key]).weights
    assert stored_dtype(weights) == expected
    assert resolve_dtype("auto", "cuda", weights) == expected
    other = "f16" if expected == "bf16" else "bf16"
    assert resolve_dtype(other, "cuda", weights) == other  # an explicit dtype wins
    assert resolve_dtype("auto", "cpu", weights) == "f32"


def test_auto_without_weights_is_f16():
    assert resolve_dtype("auto", "cuda") == "f16"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_cpu_backend_refuses_an_explicit_dtype(tiny, dtype):
    with pytest.raises(ConfigError) as info:
        resolve_dtype(dtype, "cpu")
    assert str(info.value) == CPU_REFUSAL
    with pytest.raises(ConfigError, match=re.escape(CPU_REFUSAL)):
        get_backend("cpu", dtype)
    with pytest.raises(ConfigError, match=re.escape(CPU_REFUSAL)):
        engine.load(tiny["bf16"], device="cpu", dtype=dtype)


def test_cpu_backend_with_auto_computes_in_float32(tiny):
    assert isinstance(get_backend("cpu", "auto"), NumpyBackend)
    llm = engine.load(tiny["bf16"], device="cpu", dtype="auto")
    assert llm.device == "cpu" and llm.dtype == "f32"
    assert llm.logits([5, 6, 7]).dtype == np.float32


def test_unknown_dtypes_are_refused():
    from engine.backends.cuda import CudaBackend

    with pytest.raises(ConfigError, match="unknown dtype 'fp8' \\(choose from auto, f16, bf16\\)"):
        resolve_dtype("fp8", "cuda")
    with pytest.raises(ConfigError, match="unknown activation dtype 'f32' for the CUDA backend"):
        CudaBackend(dtype="f32")  # refused before CuPy is touched


def test_host_bf16_rounding_matches_ggml():
    """weights.to_activation (written for CuPy arrays, numpy here) rounds float32 to bf16 bits to nearest
    even, exactly as gguf-py's BF16 quantizer; fp16 is a plain cast."""
    import gguf

    from engine.backends.cuda.weights import activation_type, to_activation

    x = np.concatenate([np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, 3e-5, 1e30, 0.0, -0.0], np.float32),
                        np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 50])
    bits = to_activation(np, x, "bf16")
    assert bits.dtype == activation_type(np, "bf16") == np.uint16
    np.testing.assert_array_equal(bits, gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16))
    assert bits[1] == 0x3F80 and bits[2] == 0x3F82  # ties: 1 + 2^-8 -> 1.0, 1 + 3*2^-8 -> 1 + 2^-6
    np.testing.assert_array_equal(to_activation(np, bits, "bf16"), bits)  # already bf16: as it is
    small = x[np.abs(x) < 6e4]
    np.testing.assert_array_equal(to_activation(np, small, "f16"), small.astype(np.float16))
    with pytest.raises(ConfigError, match="unknown activation dtype 'f8'"):
        activation_type(np, "f8")


def test_planned_prefill_copies_follow_the_dtype(tiny):
    """Weights stored in the activation dtype are read as stored; the other 16-bit type gets a copy."""
    from engine.backends.cuda.weights import planned_fp16_copies

    f16_weights, bf16_weights = (open_model(tiny[key]).weights for key in ("f16", "bf16"))
    total = sum(2 * int(np.prod(w.shape)) for w in bf16_weights.values() if len(w.shape) == 2)
    assert planned_fp16_copies(f16_weights, "f16") == 0 and planned_fp16_copies(f16_weights, "bf16") == total
    assert planned_fp16_copies(bf16_weights, "bf16") == 0 and planned_fp16_copies(bf16_weights, "f16") == total


# ---- the option on every command that takes --device ------------------------------------------------------

def invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def test_generate_and_info_refuse_a_dtype_on_the_cpu(tiny):
    for args in (["generate", "-m", tiny["q4_1"], "-p", "x", "-n", "1"], ["info", tiny["q4_1"]]):
        result = invoke(cli, *args, "--device", "cpu", "--dtype", "bf16")
        assert isinstance(result.exception, ConfigError) and str(result.exception) == CPU_REFUSAL, result.output
    bad = invoke(cli, "info", tiny["q4_1"], "--dtype", "fp8")
    assert bad.exit_code == 2 and "Invalid value for '--dtype'" in bad.output


def rows(output: str) -> dict[str, str]:
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in output.splitlines())


def test_info_shows_the_device_and_the_cuda_dtype(tiny):
    result = invoke(cli, "info", tiny["q4_1"], "--device", "cpu")
    assert result.exit_code == 0, result.output
    info = rows(result.output)
    assert info["plan: device"] == "cpu, float32"
    assert info["plan: KV cache"].endswith("GiB on CUDA (fp16)")
    assert re.search(r"\+ \d+\.\d\d GiB of fp16 copies for prefill$", info["plan: weights"])
    info = rows(invoke(cli, "info", tiny["bf16"], "--device", "cpu").output)
    assert info["plan: KV cache"].endswith("GiB on CUDA (bf16)")  # auto: the BF16 model runs in bf16
    assert info["plan: weights"].endswith("GiB on CUDA as stored")  # its BF16 matrices need no copies


def test_eval_commands_take_the_option(tiny, tmp_path, monkeypatch):
    from engine.eval import passkey, ppl

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was refused")

    monkeypatch.setattr(ppl, "load", refuse)
    monkeypatch.setattr(passkey, "load", refuse)
    text = tmp_path / "book.txt"
    text.write_text("the lighthouse keeper wrote in his log every evening. " * 50)
    for args in (["ppl", "--text", text, "--lengths", "64"], ["passkey", "--lengths", "300"]):
        result = invoke(eval_group, *args, "-m", tiny["q4_1"], "--device", "cpu", "--dtype", "f16")
        assert isinstance(result.exception, ConfigError) and str(result.exception) == CPU_REFUSAL, result.output


def test_eval_passes_the_dtype_to_every_load(tiny, tmp_path, monkeypatch):
    from engine.eval import ppl

    seen = []
    original = ppl.load

    def recording(*args, **kwargs):
        seen.append(kwargs["dtype"])
        return original(*args, **kwargs)

    monkeypatch.setattr(ppl, "load", recording)
    text = tmp_path / "book.txt"
    text.write_text("the lighthouse keeper wrote in his log every evening. " * 50)
    plan = ppl.plan_ppl(LoadSettings(model=tiny["q4_1"], device="cpu", dtype="auto"), [text], [32], ["rope", "dca"])
    assert plan.settings.dtype == "auto" and len(list(ppl.run_ppl(plan))) == 2
    assert seen == ["auto"]  # one load for every cell


def test_bench_takes_the_option(tiny):
    result = invoke(bench, "-m", tiny["q4_1"], "--device", "cpu", "--dtype", "bf16", "-p", "8", "-d", "0", "-n", "2",
                    "-r", "1", "--no-hf")
    assert isinstance(result.exception, ConfigError) and str(result.exception) == CPU_REFUSAL
    result = invoke(bench, "-m", tiny["q4_1"], "--device", "cpu", "-p", "8", "-d", "0", "-n", "2", "-r", "1", "--json",
                    "--no-hf")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["device"] == "cpu" and report["dtype"] == "f32"
