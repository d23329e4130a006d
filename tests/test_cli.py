"""The `engine` command line: output on success, one clear line and exit 1 on bad input."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cli"), TinySpec(), gguf_types=("f32",), hf=False)["f32"]


def run(*args, input_text=None):
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=120, input=input_text)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_generate_streams_text_and_reports_speed(tiny):
    result = run("generate", "-m", tiny, "-p", "hello world", "-n", "8", "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "tokens/s" in result.stderr and "prompt:" in result.stderr
    assert re.search(r"device: (cpu \(f32\)|cuda \(f16\))$", result.stderr.strip())  # F32 model: auto is f16


def test_generate_reads_prompt_file(tiny, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello from a file")
    assert run("generate", "-m", tiny, "-f", prompt, "-n", "4", "--temp", "0").returncode == 0


def test_generate_reads_prompt_from_stdin_with_dash(tiny):
    from_stdin = run("generate", "-m", tiny, "-f", "-", "-n", "6", "--temp", "0", input_text="hello from a pipe")
    from_argument = run("generate", "-m", tiny, "-p", "hello from a pipe", "-n", "6", "--temp", "0")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_argument.stdout and from_stdin.stdout.strip()
    assert_one_line_error(run("generate", "-m", tiny, "-f", "-", input_text=""), "empty prompt")


def test_n_predict_minus_one_generates_to_the_end_of_the_context(tiny):
    result = run("generate", "-m", tiny, "-p", "hello", "-n", "-1", "-c", "32", "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert "generation: 30 tokens" in result.stderr and "end of the context (32 tokens)" in result.stderr
    assert_one_line_error(run("generate", "-m", tiny, "-p", "hello", "-n", "-2"), "-n")


def test_info_usage_shows_the_model_as_optional():
    from click.testing import CliRunner

    from engine.cli import cli

    assert "info [OPTIONS] [MODEL]" in CliRunner().invoke(cli, ["info", "--help"]).output


def test_info_shows_model_and_plan(tiny):
    result = run("info", tiny, "-c", "1024")
    assert result.returncode == 0, result.stderr
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines())
    assert rows["architecture"].startswith("llama: 2 layers, d_model 64")
    assert "GQA group 2" in rows["attention"]
    assert rows["training context"] == "256"
    assert rows["plan: context"] == "1024"
    assert rows["plan: device"] in ("cpu, float32",
                                    "cuda, fp16 activations and KV cache (float32 residual stream and logits)")
    # 2 (K, V) x 2 layers x 1024 tokens x 2 KV heads x 16 dims = 131072 values: 0.5 MiB in float32
    assert rows["plan: KV cache"].startswith("0.00 GiB on the CPU (k f32, v f32)")
    assert re.fullmatch(r"\d+\.\d\d GiB on the CPU as stored( \+ \d+\.\d\d GiB of float32 copies)?, "
                        r"\d+\.\d\d GiB on CUDA as stored"
                        r"( \+ \d+\.\d\d GiB of fp16 copies for prefill)?", rows["plan: weights"])
    # DCA is on because 1024 > 256, with the defaults 3L/4 and L/8
    assert rows["plan: DCA"] == "on: chunk_size 192, local_window 32, chunk_len 160"
    # head_dim 16: the fused attention kernels (64 and 128 only) are not used, and info says why
    assert rows["plan: attention on CUDA"] == ("simple tiled kernels (the fused tensor-core kernels do not "
                                               "support head_dim 16 (the fused kernels are built for 64 and 128))")
    assert "off" in re.search(r"plan: DCA\s+(.*)", run("info", tiny).stdout).group(1)


def test_dca_sizes_turn_auto_dca_on_within_the_training_context(tiny):
    from engine.api import resolve_dca

    out = run("info", tiny, "--dca-chunk-size", "128").stdout  # context 256 = training: auto alone would be off
    assert re.search(r"plan: DCA\s+on: chunk_size 128, local_window 32, chunk_len 96", out), out
    assert resolve_dca("off", 256, 256, chunk_size=128) is None  # an explicit off stays off
    assert resolve_dca("auto", 256, 256) is None


@pytest.mark.parametrize("args, fragments", [
    (["generate", "-m", "/nonexistent/model.gguf", "-p", "x"], ["no such file"]),
    (["generate", "-p", "x", "-f", "also.txt"], ["-p or -f"]),
    (["generate"], ["no prompt", "-f -"]),
    (["generate", "-p", "x", "-sys", "be brief"], ["--chat"]),
    (["info", "other.gguf"], ["model twice"]),
    (["generate", "-p", "x", "--prompt-cache", "/nonexistent/dir/p.session"], ["does not exist"]),  # before work
    (["generate", "-p", "caf\udce9"], ["not valid Unicode"]),  # the bytes b"caf\xe9" (Latin-1) in argv
    (["generate", "-p", "x", "--temp", "-1"], ["temperature"]),
    (["generate", "-p", "word " * 50, "-c", "16"], ["-c"]),
    (["generate", "-p", "x", "--dca", "on", "--dca-chunk-size", "64", "--dca-local-window", "64"], ["local_window"]),
    (["generate", "-p", "x", "--dca", "on", "--dca-chunk-size", "4096"], ["exceeds"]),
    (["generate", "-p", "x", "--device", "cpu", "--dtype", "bf16"], ["--dtype applies to --device cuda"]),
])
def test_bad_input_gives_one_line(tiny, args, fragments):
    if "-m" not in args:
        args = args[:1] + ["-m", str(tiny)] + args[1:]
    assert_one_line_error(run(*args), *fragments)


@pytest.mark.parametrize("args, fragments", [
    (["generate", "-p", "x", "--dtype", "f64"], ["'f64' is not one of", "engine generate --help"]),
    (["generate", "-p", "x", "--device", "tpu"], ["'tpu' is not one of"]),
    (["generate", "-p", "x", "-n", "many"], ["'many' is not a valid integer"]),
    (["info", "--no-such-flag"], ["No such option", "engine info --help"]),
    (["nosuch"], ["No such command 'nosuch'", "engine --help"]),
    (["serve", "--port", "99999"], ["99999 is not in the range"]),
])
def test_usage_errors_give_one_line(args, fragments):
    assert_one_line_error(run(*args), *fragments)


def test_malformed_model_file_gives_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTAGGUF" + bytes(100))
    assert_one_line_error(run("generate", "-m", bad, "-p", "x"), str(bad))
    assert_one_line_error(run("info", bad), str(bad))


def test_cuda_without_gpu_gives_one_line(tiny):
    from engine.backends import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is usable here: this checks the message on machines without one")
    assert_one_line_error(run("generate", "-m", tiny, "-p", "x", "--device", "cuda"), "--device cuda is unavailable")


def test_context_beyond_memory_is_refused_before_work(tiny):
    # 2 layers x 2 KV heads x 16 dims x 2 (K and V) x 4 bytes = 512 bytes per token: 2^40 tokens is 512 TiB
    assert_one_line_error(run("generate", "-m", tiny, "-p", "x", "-c", str(2**40)), "GiB", "-c")


def test_rope_scaling_factor_defaults_to_context_over_training(tiny):
    out = run("info", tiny, "-c", "1024", "--rope-scaling", "linear", "--dca", "off").stdout
    assert "scaling linear x4 (original context 256)" in out
    out = run("info", tiny, "-c", "1024", "--rope-scaling", "yarn", "--rope-scale", "2").stdout
    assert "scaling yarn x2" in out
    summary = run("generate", "-m", tiny, "-p", "hi", "-n", "1", "--rope-scale", "2").stderr
    assert "| rope: linear x2 |" in summary, summary  # the summary line names a RoPE scaling in force
    out = run("info", tiny, "--rope-scale", "2").stdout  # llama.cpp: the scaling is linear unless the model says
    assert "scaling linear x2 (original context 256)" in out, out
    assert_one_line_error(run("info", tiny, "--rope-scaling", "none", "--rope-scale", "2"), "--rope-scaling none")


def test_an_explicit_rope_scaling_keeps_auto_dca_off(tiny):
    # beyond the training context (256) auto DCA comes on, unless a RoPE scaling extends the context instead
    def dca_row(*args: str) -> str:
        return re.search(r"^plan: DCA\s+(\S+)", run("info", tiny, "-c", "1024", *args).stdout, re.M).group(1)

    assert dca_row() == "on:"
    assert dca_row("--rope-scaling", "yarn") == "off"
    assert dca_row("--rope-scale", "4") == "off"
    assert dca_row("--rope-scaling", "ntk", "--dca", "on") == "on:"


def test_info_names_the_fused_attention_kernels_for_supported_heads():
    from dataclasses import replace

    from engine.cli import _describe_cuda_attention
    from engine.config import ModelConfig, RopeConfig
    from engine.streaming import StreamingConfig

    base = ModelConfig(n_layers=1, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=64, vocab_size=32,
                       norm_eps=1e-5, context_length=8192, rope=RopeConfig(theta=1e4, dim=64))
    assert _describe_cuda_attention(base) == ("fused tensor-core prefill (wgmma on Hopper, mma.sync on other GPUs), "
                                              "split-K tensor-core decode")
    many = replace(base, n_heads=64, n_kv_heads=2)  # GQA group 32: beyond the decode kernel's 16
    assert "simple tiled decode" in _describe_cuda_attention(many) and "group 32" in _describe_cuda_attention(many)
    assert _describe_cuda_attention(base, StreamingConfig(4, 100)).startswith("two passes of the mma.sync flash")
    tempered = _describe_cuda_attention(base, StreamingConfig(4, 100), temperature_length=8192)
    assert tempered.startswith("the tiled algorithm over CuPy arrays") and "attention temperature" in tempered
    odd = _describe_cuda_attention(replace(base, head_dim=96, rope=RopeConfig(theta=1e4, dim=96)),
                                   StreamingConfig(4, 100))
    assert odd.startswith("the tiled algorithm over CuPy arrays") and "head_dim 96" in odd
