"""Whole-model checks of the CUDA backend against the numpy backend (marker `cuda`), in both
activation dtypes (fp16 and bf16 activations and KV cache; fp32 residual stream and logits).

Tolerances, from a numpy emulation that rounds the CPU backend's activations where the CUDA backend
stores them (tiny models, 200 tokens; the GPU's fp16 error on the default model, ~1e-3, matches it):
logits relative L2 error, emulated fp16 0.9e-3 .. 1.2e-3 and bf16 6.8e-3 .. 1.0e-2 (bf16 rounds 8x
coarser) -> < 1e-2 (fp16) and < 3e-2 (bf16); the default model: emulated 1.7e-3 / 1.1e-2 -> 2e-2 /
4e-2. Greedy generation equal to the CPU's, or diverging only where the CPU's top-2 logits are within
0.1 (fp16) / 0.25 (bf16: emulated logit errors reach 0.07) of each other.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.convert import quantize_gguf
from engine.sampling import SamplingParams
from gpu_greedy import GREEDY, assert_follows_cpu, greedy_on_gpu
from prenorm_emulation import prenormed_tol, staging_only

pytestmark = pytest.mark.cuda

DTYPES = ("f16", "bf16")
LOGITS_TOL = {"f16": 1e-2, "bf16": 3e-2}
DEFAULT_MODEL_TOL = {"f16": 2e-2, "bf16": 4e-2}
# a one-token piece runs its products as GEMVs on exact weights (prefill GEMMs: weights rounded to the
# activation dtype); the emulated effect on the later rows: 4.4e-4 (fp16), 3.9e-3 (bf16)
PIECES_TOL = {"f16": 2e-3, "bf16": 1.5e-2}
LOGPROB_MAX_ERR = {"f16": 0.1, "bf16": 0.15}  # emulated: 0.004 (fp16), 0.03 (bf16)
# the fused decode step equals the op-by-op one but for RMSNorm's summation order, which can flip a
# rounding (one bf16 step is 8x an fp16 one)
FUSED_TOL = {"f16": 1e-3, "bf16": 3e-3}


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import VARIANTS, make_tiny_model

    paths = make_tiny_model(tmp_path_factory.mktemp("gqa"), VARIANTS["gqa"],
                            gguf_types=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"), hf=False)
    paths.update({f"kquant-{k}": v for k, v in make_tiny_model(
        tmp_path_factory.mktemp("kq"), VARIANTS["kquant"], gguf_types=("f32", "q4_k", "q6_k", "mixed"),
        hf=False).items()})
    for file_type in ("q4_k_m", "q5_k_m"):  # llama-quantize's mixtures, written by engine quantize (Q5_K: host F16)
        paths[f"kquant-{file_type}"] = paths["kquant-f32"].with_name(f"tiny-{file_type}.gguf")
        quantize_gguf(paths["kquant-f32"], paths[f"kquant-{file_type}"], file_type, progress=False)
    paths["q5_0"] = paths["f32"].with_name("tiny-q5_0.gguf")  # Q5_0 / Q5_1 weights: dequantized on the host
    quantize_gguf(paths["f32"], paths["q5_0"], "q5_0", progress=False)
    paths.update({f"tied-{k}": v for k, v in make_tiny_model(
        tmp_path_factory.mktemp("tied"), VARIANTS["tied"], gguf_types=("q8_0",), hf=False).items()})
    paths.update({f"d64-{k}": v for k, v in make_tiny_model(
        tmp_path_factory.mktemp("d64"), VARIANTS["d64"], gguf_types=("q8_0",), hf=False).items()})
    return paths


def test_d64_model_runs_the_fused_attention_kernels(tiny):
    """The head_dim 16 models run the simple kernels; "d64-*" is the one the fused kernels serve."""
    from engine.backends.cuda.flash_attention import unsupported_reason

    c = engine.load(tiny["d64-q8_0"], device="cuda").config
    assert c.head_dim == 64
    assert unsupported_reason(c.head_dim, c.rope.dim, c.n_heads, c.n_kv_heads, decode=True) is None


MODEL_KEYS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "kquant-q4_k", "kquant-q6_k", "kquant-mixed",
              "kquant-q4_k_m", "kquant-q5_k_m", "tied-q8_0")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", MODEL_KEYS)
def test_tiny_model_logits_match_cpu(tiny, key, dtype):
    rng = np.random.default_rng(1)
    cpu = engine.load(tiny[key], device="cpu")
    gpu = engine.load(tiny[key], device="cuda", dtype=dtype)
    assert gpu.device == "cuda" and gpu.dtype == dtype
    assert gpu.cache.k.dtype == gpu.backend.act
    ids = rng.integers(3, cpu.config.vocab_size, 200).tolist()
    err = rel_err(gpu.logits(ids), cpu.logits(ids))
    print(f"{key} {dtype}: logits rel err {err:.2e}")
    assert err < LOGITS_TOL[dtype]


def test_dtype_auto_follows_the_stored_matrices(tiny):
    assert engine.load(tiny["bf16"], device="cuda").dtype == "bf16"
    assert engine.load(tiny["f16"], device="cuda").dtype == "f16"
    assert engine.load(tiny["q4_1"], device="cuda").dtype == "f16"


@pytest.mark.cuda
def test_the_backend_keeps_the_prefill_copies_its_memory_plan_counts(tiny, monkeypatch):
    """The CUDA backend keeps 16-bit prefill copies exactly when the LLM's memory plan counts them (up to a
    sixteenth of the free GPU memory, memory.plan_memory), and none when the plan leaves them no room."""
    from engine.backends.cuda import weights as cuda_weights

    def kept(llm) -> list:
        return [m for m in llm._weights.values()
                if isinstance(m, cuda_weights.DeviceMatrix) and (m.whole or m).half is not None]

    llm = engine.load(tiny["q8_0"], device="cuda")
    assert llm.memory.copies > 0 and llm.backend.prefill_copy_budget >= llm.memory.copies and kept(llm)
    assert sum(2 * m.rows * m.cols for m in {id(m.whole or m): m.whole or m for m in kept(llm)}.values()) \
        == llm.memory.copies  # the plan counts what the backend keeps
    monkeypatch.setattr(cuda_weights, "PREFILL_FP16_BUDGET", 0)
    monkeypatch.setattr(cuda_weights, "PREFILL_FP16_SHARE", 1 << 62)
    llm = engine.load(tiny["q8_0"], device="cuda")
    assert llm.memory.copies == 0 and llm.backend.prefill_copy_budget == 0 and not kept(llm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", ["q4_1", "d64-q8_0"])
@pytest.mark.parametrize("dca", ["on", "off"])
def test_long_context_logits_match_cpu(tiny, key, dca, dtype):
    """900 tokens on a model trained on 256: DCA (cs=192, w=32: chunk boundaries every 160) and plain."""
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 384, 900).tolist()
    cpu = engine.load(tiny[key], device="cpu", context=1024, dca=dca)
    gpu = engine.load(tiny[key], device="cuda", context=1024, dca=dca, dtype=dtype)
    assert (gpu.dca is not None) == (dca == "on")
    err = rel_err(gpu.logits(ids), cpu.logits(ids))
    print(f"dca {dca} {dtype}: logits rel err {err:.2e}")
    assert err < LOGITS_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_match_cpu(tiny, dtype):
    """The log-softmax reduced on the device (eval ppl) against the host's float64 one."""
    ids = np.random.default_rng(3).integers(3, 384, 700).tolist()
    cpu = engine.load(tiny["q8_0"], device="cpu", context=1024, dca="on").token_logprobs(ids)
    gpu = engine.load(tiny["q8_0"], device="cuda", context=1024, dca="on", dtype=dtype).token_logprobs(ids)
    assert gpu.shape == cpu.shape == (699,)
    print(f"{dtype}: logprobs max abs err {np.abs(gpu - cpu).max():.3f}")
    assert abs(gpu.mean() - cpu.mean()) < 1e-2 * abs(cpu.mean()) and np.abs(gpu - cpu).max() < LOGPROB_MAX_ERR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_in_pieces_equals_one_pass(tiny, dtype):
    gpu = engine.load(tiny["q8_0"], device="cuda", context=1024, dca="on", dtype=dtype)
    ids = np.random.default_rng(3).integers(3, 384, 700)
    whole = gpu.backend.to_numpy(gpu.model.forward(ids, gpu.new_cache()))
    cache = gpu.new_cache()
    pieces = [gpu.backend.to_numpy(gpu.model.forward(ids[a:b], cache)) for a, b in ((0, 170), (170, 171), (171, 700))]
    err = rel_err(np.concatenate(pieces), whole)
    print(f"{dtype}: pieces vs one pass rel err {err:.2e}")
    assert err < PIECES_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", ["q4_1", "d64-q8_0"])
def test_graph_decoder_equals_eager_and_host_loop(tiny, key, dtype):
    llm = engine.load(tiny[key], device="cuda", context=512, dtype=dtype)
    prompt = np.random.default_rng(4).integers(3, 384, 50).tolist()
    graph_tokens, cache, _ = greedy_on_gpu(llm, prompt, 64)
    assert cache.length == len(prompt) + 63
    eager_tokens, _, _ = greedy_on_gpu(llm, prompt, 64, use_graph=False)
    host_tokens = list(llm.generate_ids(prompt, 64, GREEDY, stop_ids=[]))
    assert graph_tokens == eager_tokens == host_tokens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key,dca", [("q4_1", "off"), ("kquant-mixed", "off"), ("q8_0", "on"), ("bf16", "on"),
                                     ("d64-q8_0", "on")])
def test_greedy_generation_matches_cpu(tiny, key, dca, dtype):
    context = 1024 if dca == "on" else 256
    cpu = engine.load(tiny[key], device="cpu", context=context, dca=dca)
    gpu = engine.load(tiny[key], device="cuda", context=context, dca=dca, dtype=dtype)
    prompt = np.random.default_rng(5).integers(3, 384, 150 if dca == "off" else 400).tolist()
    cpu_tokens = list(cpu.generate_ids(prompt, 64, GREEDY, stop_ids=[]))
    gpu_tokens, _, _ = greedy_on_gpu(gpu, prompt, 64)
    # the int8 models' decode steps read prenormed inputs (the mixed one's gate/up types differ: composed MLPs)
    assert gpu.model.decode_blocks.normed_head == (key not in ("bf16", "kquant-mixed"))
    assert_follows_cpu(cpu, prompt, cpu_tokens, gpu_tokens, dtype, f"{key} {dtype}")


def test_stochastic_decoder_is_seeded_and_host_fallback_runs(tiny):
    llm = engine.load(tiny["q4_0"], device="cuda", context=256)
    prompt = [5, 17, 99, 200]

    def run(params):
        cache = llm.new_cache()
        decoder = llm.backend.decoder(llm.model, cache, params, prompt)
        tokens = [decoder.first(llm.prefill(prompt, cache))]
        while len(tokens) < 40:
            tokens.append(decoder.step(tokens[-1]))
        return tokens, decoder

    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.3, seed=11)
    a, decoder = run(params)
    assert decoder.on_device
    assert a == run(params)[0]
    assert a != run(SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.3,
                                   seed=12))[0]
    fallback, decoder = run(SamplingParams(temperature=0.8, top_k=0, seed=1))  # all-vocab: host sampler
    assert not decoder.on_device
    assert all(0 <= t < 384 for t in a + fallback)


@pytest.fixture(scope="module")
def default_model_on_cpu():
    """(path, CPU LLM, prompt ids, CPU logits, CPU greedy tokens) of the default model, computed once."""
    from engine.default_model import locate_default_model

    path = locate_default_model()
    if path is None or not Path(path).exists():
        pytest.skip("default model not installed")
    cpu = engine.load(path, device="cpu")
    ids = cpu.tokenize("The lighthouse keeper wrote in his log every evening: wind from the north-west, "
                       "three ships passed, the lamp was trimmed at seven. " * 3)
    return path, cpu, ids, cpu.logits(ids), list(cpu.generate_ids(ids, 32, GREEDY, stop_ids=[]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_model_logits_match_cpu(default_model_on_cpu, dtype):
    path, cpu, ids, cpu_logits, cpu_tokens = default_model_on_cpu
    gpu = engine.load(path, device="cuda", dtype=dtype)
    err = rel_err(gpu.logits(ids), cpu_logits)
    print(f"default model {dtype}: logits rel err {err:.2e}")
    assert err < DEFAULT_MODEL_TOL[dtype]
    gpu_tokens, _, _ = greedy_on_gpu(gpu, ids, 32)
    assert_follows_cpu(cpu, ids, cpu_tokens, gpu_tokens, dtype, f"default model {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", ["f32", "bf16", "q4_1", "kquant-q4_k", "kquant-q6_k", "tied-q8_0"])
@pytest.mark.parametrize("dca", ["on", "off"])
@pytest.mark.parametrize("prenormed", ["prenormed", "staged"])
def test_fused_decode_step_equals_op_by_op(tiny, key, dca, dtype, prenormed):
    """The fused decode blocks (6 launches a layer) compute what the model's composed blocks do (same
    arithmetic and activation rounding points; RMSNorm sums in another order), cache rows included, with the
    RMSNorm-fused products staging their input ("staged"). With prenormed inputs (int8 weights: gemv_add quantizes
    x * w for the next product, which scales by the norm) they quantize x * w in fp32, not act_t(x * inv * w): the
    tolerance measured for that on the CPU (tests/prenorm_emulation.py prenormed_tol; larger for Q4_1 / Q4_K)."""
    from engine.backends.cuda.fused import FusedBlocks

    llm = engine.load(tiny[key], device="cuda", context=512, dca=dca, dtype=dtype)
    model, backend, c = llm.model, llm.backend, llm.config
    fused = model.decode_blocks
    assert isinstance(fused, FusedBlocks) and all(fused.fused_attention) and all(fused.fused_mlp) and fused.fused_head
    int8 = key not in ("f32", "bf16")
    assert fused.normed_qkv == [False] + [int8] * (c.n_layers - 1) and fused.normed_gate_up == [int8] * c.n_layers
    assert fused.normed_head == int8
    if prenormed == "staged":
        staging_only(fused)
    if int8 and prenormed == "prenormed":
        tol = prenormed_tol(model.weights.layers[0].ffn_gate.ggml_type)
        tol = (tol["logits"], tol["rows"])
    else:
        tol = (FUSED_TOL[dtype],) * 2
    prompt = np.random.default_rng(6).integers(3, 384, 300 if dca == "on" else 100)
    caches = [backend.new_cache(c.n_layers, 512, c.n_kv_heads, c.head_dim) for _ in range(2)]
    for cache in caches:
        model.forward(prompt, cache, logits_for="none")
    token, position = backend.tokens([77]), backend.positions(len(prompt), 1)
    fused_logits = backend.to_numpy(model.compute(token, position, caches[0], "last"))
    model.decode_blocks = model  # the composed blocks
    plain_logits = backend.to_numpy(model.compute(token, position, caches[1], "last"))
    err = rel_err(fused_logits, plain_logits)
    print(f"fused {key} dca {dca} {dtype} {prenormed}: rel err {err:.1e}")
    assert err < tol[0]
    rows = slice(len(prompt), len(prompt) + 1)
    for name in ("k", "v"):
        fused_rows = backend.to_numpy(getattr(caches[0], name)[:, rows])
        plain_rows = backend.to_numpy(getattr(caches[1], name)[:, rows])
        assert np.abs(fused_rows).max() > 0 and rel_err(fused_rows, plain_rows) < tol[1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_types_fall_back_to_op_by_op_graph(tiny, dtype):
    llm = engine.load(tiny["kquant-mixed"], device="cuda", context=256, dtype=dtype)
    blocks = llm.model.decode_blocks
    assert not any(blocks.fused_attention) and not any(blocks.fused_mlp)
    prompt = [4, 8, 15, 16, 23, 42]
    tokens, cache, _ = greedy_on_gpu(llm, prompt, 20)
    assert tokens == list(llm.generate_ids(prompt, 20, GREEDY, stop_ids=[]))
