"""Model families: Qwen2 (Q/K/V biases, GGUF architecture qwen2 with unpermuted Q/K rows), Mistral
(MistralForCausalLM, its sliding window) and Llama 3 (llama3 RoPE scaling: HF rope_scaling, GGUF rope_freqs)
against HF transformers' own classes (golden logits from tools/golden_families.py), from safetensors, from a
GGUF laid out as llama.cpp writes it and from `engine convert`'s GGUF; Qwen2 also through the converters, with
DCA, and on CUDA."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import engine
from engine.convert import convert_gguf_to_hf, convert_hf_to_gguf
from engine.models.family import QWEN2
from engine.sampling import SamplingParams
from prenorm_emulation import staging_only

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import VARIANTS, make_tiny_model  # noqa: E402

FAMILY_GOLDEN = {name: np.load(Path(__file__).parent / "golden" / f"tiny_{name}_logits.npz")
                 for name in ("qwen2", "mistral", "llama3")}
GOLDEN = FAMILY_GOLDEN["qwen2"]
IDS = GOLDEN["ids"].tolist()


def rel_err(got, want) -> float:
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), VARIANTS["qwen2"], gguf_types=("f32", "q8_0"))


_FAMILY_MODELS: dict[str, dict[str, Path]] = {}


def family_model(name: str, tmp_path_factory) -> dict[str, Path]:
    """Paths of the family's tiny model (made once per module): hf/, tiny-f32.gguf written with llama.cpp's
    names, and converted.gguf written by engine convert from hf/."""
    if name not in _FAMILY_MODELS:
        folder = tmp_path_factory.mktemp(name)
        paths = make_tiny_model(folder, VARIANTS[name], gguf_types=("f32",))
        paths["converted"] = folder / "converted.gguf"
        convert_hf_to_gguf(paths["hf"], paths["converted"], "f32", progress=False)
        _FAMILY_MODELS[name] = paths
    return _FAMILY_MODELS[name]


@pytest.fixture(scope="module", params=["qwen2", "mistral", "llama3"])
def each_family(request, tmp_path_factory):
    return request.param, family_model(request.param, tmp_path_factory)


@pytest.mark.parametrize("source", ["hf", "f32", "converted"])
def test_logits_equal_hf_transformers(each_family, source):
    name, paths = each_family
    golden = FAMILY_GOLDEN[name]
    llm = engine.load(paths[source], device="cpu", context=64)
    assert llm.config.architecture == ("qwen2" if name == "qwen2" else "llama")
    err = rel_err(llm.logits(golden["ids"].tolist()), golden["logits"])
    print(f"{name} {source} vs transformers: rel err {err:.2e}")
    assert err < 1e-5


def test_llama3_scaling_matters(tmp_path_factory, tmp_path):
    """Without its rope_scaling the llama3 model's logits leave the tolerance (so the golden checks the scaling);
    engine convert carries it as llama.cpp's rope_freqs tensor."""
    name, paths = "llama3", family_model("llama3", tmp_path_factory)
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(paths["converted"]).tensors}
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in paths["hf"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": None}))
    golden = FAMILY_GOLDEN[name]
    assert rel_err(engine.load(folder, context=64).logits(golden["ids"].tolist()), golden["logits"]) > 1e-2


def test_qwen2_biases_matter(qwen2):
    """The golden logits depend on the biases: dropping them moves the logits far beyond the tolerance."""
    llm = engine.load(qwen2["f32"], device="cpu", context=64)
    for layer in llm.model.weights.layers:
        layer.attn_q_bias = layer.attn_q_bias * 0
        layer.attn_k_bias = layer.attn_k_bias * 0
        layer.attn_v_bias = layer.attn_v_bias * 0
    assert rel_err(llm.logits(IDS), GOLDEN["logits"]) > 1e-2


def test_qwen2_gguf_is_laid_out_like_llama_cpp(qwen2):
    reader = gguf.GGUFReader(qwen2["f32"])
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert "qwen2.block_count" in reader.fields and "llama.block_count" not in reader.fields
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= names and "blk.0.attn_q.bias.weight" not in names
    bias = next(t for t in reader.tensors if t.name == "blk.0.attn_q.bias")
    assert bias.tensor_type == gguf.GGMLQuantizationType.F32


def test_qwen2_q8_0_stays_close(qwen2):
    got = engine.load(qwen2["q8_0"], device="cpu", context=64).logits(IDS)
    assert rel_err(got, GOLDEN["logits"]) < 2e-2


def test_qwen2_converts_both_ways(qwen2, tmp_path):
    stats = convert_hf_to_gguf(qwen2["hf"], tmp_path / "q.gguf", "f32", progress=False)
    assert stats.n_tensors == len(gguf.GGUFReader(qwen2["f32"]).tensors)
    assert rel_err(engine.load(tmp_path / "q.gguf", context=64).logits(IDS), GOLDEN["logits"]) < 1e-5
    convert_gguf_to_hf(tmp_path / "q.gguf", tmp_path / "hf", dtype="f32", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert rel_err(engine.load(tmp_path / "hf", context=64).logits(IDS), GOLDEN["logits"]) < 1e-5


def test_qwen2_with_dca_prefill_equals_decode(qwen2):
    """DCA with chunks shorter than the prompt: one prefill, and prefill + token-by-token decode, agree."""
    llm = engine.load(qwen2["f32"], device="cpu", context=128, dca=engine.DCAConfig(chunk_size=24, local_window=8))
    whole = llm.logits(IDS)
    cache = llm.new_cache()
    rows = [llm.model.forward(np.array(IDS[:10]), cache)] + [llm.model.forward(np.array([t]), cache) for t in IDS[10:]]
    assert rel_err(np.concatenate(rows), whole) < 1e-5
    assert rel_err(whole[:16], GOLDEN["logits"][:16]) < 1e-5  # within one chunk DCA is plain attention


def test_unknown_architecture_is_refused(qwen2, tmp_path):
    config = json.loads((qwen2["hf"] / "config.json").read_text())
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in qwen2["hf"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"],
                                                    "model_type": "gpt_neox"}))
    with pytest.raises(engine.ModelFormatError, match="unsupported architecture.*Qwen2ForCausalLM"):
        engine.load(folder)


@pytest.mark.parametrize("model_type, window, use, refused", [
    ("mistral", 64, None, True),  # Mistral's code has no switch: a sliding_window always applies
    ("mistral", 64, False, True),
    ("qwen2", 64, True, True),
    ("qwen2", 64, None, False),  # Qwen2Config's use_sliding_window defaults to false
    ("qwen2", 64, False, False),
    ("qwen2", None, True, False),
])
def test_sliding_window_is_refused_beyond_the_window_never_ignored(qwen2, tmp_path, model_type, window, use, refused):
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in qwen2["hf"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = {**json.loads((folder / "config.json").read_text()), "sliding_window": window}
    config.pop("use_sliding_window")
    if use is not None:
        config["use_sliding_window"] = use
    if model_type == "mistral":  # the tiny qwen2's weights under Mistral's names: no biases
        config.update(architectures=["MistralForCausalLM"], model_type="mistral")
        index = folder / "model.safetensors"
        from safetensors.numpy import load_file, save_file
        save_file({k: v for k, v in load_file(index).items() if not k.endswith(".bias")}, index)
    (folder / "config.json").write_text(json.dumps(config))
    assert engine.load(folder, context=64).context == 64  # within the window: exact
    if refused:
        with pytest.raises(engine.ConfigError, match="sliding window of 64 tokens.*-c 64 or less"):
            engine.load(folder, context=65)
    else:
        assert engine.load(folder, context=128).context == 128


@pytest.fixture(scope="module")
def qwen2_1m(qwen2, tmp_path_factory):
    """The tiny qwen2 with its own DCA settings in config.json, as Qwen2.5-1M ships them."""
    folder = tmp_path_factory.mktemp("qwen2-1m") / "hf"
    folder.mkdir()
    for f in qwen2["hf"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["dual_chunk_attention_config"] = {"chunk_size": 24, "local_size": 8, "original_max_position_embeddings": 24}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_models_own_dca_settings_are_used(qwen2_1m, tmp_path):
    llm = engine.load(qwen2_1m, context=128)  # --dca auto: the model's settings, though 128 <= its 256 limit
    assert llm.dca == engine.DCAConfig(chunk_size=24, local_window=8)
    plain = engine.load(qwen2_1m, context=128, dca="off")
    assert plain.dca is None
    assert rel_err(llm.logits(IDS[:16]), plain.logits(IDS[:16])) < 1e-6  # within one chunk: plain attention
    assert rel_err(llm.logits(IDS), plain.logits(IDS)) > 1e-3  # beyond it: DCA
    greedy = SamplingParams(temperature=0.0)
    assert len(list(llm.generate_ids(IDS[:3], 4, greedy, stop_ids=[]))) == 4  # a 3-token prompt (vLLM once failed)
    assert engine.load(qwen2_1m, context=128, dca="on", dca_chunk_size=48, dca_local_window=8).dca.chunk_size == 48
    with pytest.raises(engine.ConfigError, match="exceeds the model's limit of 256"):
        engine.load(qwen2_1m, context=512)


def spec_forward(llm, ids, logit_scale=None) -> np.ndarray:
    """The model's forward pass in float64 from its stored weights, attention by the materialized DCA spec
    (engine/dca.py reference_attention): an implementation independent of the backends' blocks and kernels."""
    from engine.dca import reference_attention

    c, w = llm.config, {name: t.dequantize().astype(np.float64) for name, t in llm.loaded.weights.items()}
    norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * g  # noqa: E731
    x, n = w["token_embd"][ids], len(ids)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm"])
        q, k, v = (h @ w[p + f"attn_{t}"].T + w[p + f"attn_{t}.bias"] for t in "qkv")
        attn = reference_attention(q.reshape(n, c.n_heads, -1), k.reshape(n, c.n_kv_heads, -1),
                                   v.reshape(n, c.n_kv_heads, -1), np.arange(n), llm.model.rotary, llm.dca,
                                   logit_scale=logit_scale)
        x = x + attn.reshape(n, -1) @ w[p + "attn_output"].T
        h = norm(x, w[p + "ffn_norm"])
        gate = h @ w[p + "ffn_gate"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up"].T)) @ w[p + "ffn_down"].T
    return norm(x, w["output_norm"]) @ w.get("output", w["token_embd"]).T


def test_qwen2_with_its_own_dca_at_4x_its_original_context_agrees_with_the_spec(qwen2_1m):
    """96 tokens = 4 x the original 24 (chunk_len 16: six chunks, every relation): the engine's logits against
    the float64 spec forward, and against a plain-attention run, from which DCA must differ."""
    llm = engine.load(qwen2_1m, context=96, attention_temperature=False)  # its temperature: the test below
    ids = (IDS * 2)[:96]
    got = llm.logits(ids)
    err = rel_err(got, spec_forward(llm, ids))
    print(f"qwen2 with its own DCA at 96 tokens vs the float64 spec: rel err {err:.2e}")
    assert err < 1e-5
    assert rel_err(got, engine.load(qwen2_1m, context=96, dca="off").logits(ids)) > 1e-2


def test_the_models_own_dca_settings_survive_conversion(qwen2_1m, tmp_path):
    convert_hf_to_gguf(qwen2_1m, tmp_path / "q.gguf", "f32", progress=False)
    fields = gguf.GGUFReader(tmp_path / "q.gguf").fields
    assert fields["engine.dca.chunk_size"].contents() == 24 and fields["engine.dca.local_window"].contents() == 8
    assert engine.load(tmp_path / "q.gguf", context=64).dca == engine.DCAConfig(chunk_size=24, local_window=8)
    convert_gguf_to_hf(tmp_path / "q.gguf", tmp_path / "hf", dtype="f32", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dual_chunk_attention_config"] == {"chunk_size": 24, "local_size": 8,
                                                     "original_max_position_embeddings": 24}


@pytest.mark.parametrize("dca, message", [
    ({"chunk_size": 8, "local_size": 24}, "dual_chunk_attention_config.*local_window < chunk_size"),
    ({"chunk_size": 24, "local_size": 8, "original_max_position_embeddings": -3},
     "original_max_position_embeddings must be a positive whole number, got -3"),
    ({"chunk_size": 24, "local_size": 8, "original_max_position_embeddings": "262144"},
     "original_max_position_embeddings must be a positive whole number"),
])
def test_bad_dual_chunk_attention_config_is_one_error(qwen2_1m, tmp_path, dca, message):
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in qwen2_1m.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["dual_chunk_attention_config"] = dca
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(engine.ModelFormatError, match=message):
        engine.load(folder)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_qwen2_on_cuda_matches_the_cpu(qwen2, dtype):
    cpu = engine.load(qwen2["q8_0"], device="cpu", context=128)
    gpu = engine.load(qwen2["q8_0"], device="cuda", context=128, dtype=dtype)
    want = cpu.logits(IDS)
    err = rel_err(gpu.logits(IDS), want)
    print(f"qwen2 cuda {dtype}: rel err {err:.2e}")
    assert err < (3e-3 if dtype == "f16" else 2e-2)
    greedy = SamplingParams(temperature=0.0)
    assert list(gpu.generate_ids(IDS[:8], 12, greedy, stop_ids=[])) == list(cpu.generate_ids(IDS[:8], 12, greedy,
                                                                                              stop_ids=[]))
    assert QWEN2.name == gpu.config.architecture


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("dca", ["on", "off"])
def test_qwen2_fused_decode_step_adds_the_biases_as_the_composed_blocks(qwen2, dtype, dca):
    """The qkv kernel's bias epilogue: a fused decode step's logits and cache rows equal the composed blocks'
    (linear + add_bias + store_kv) within 16-bit rounding, and the biases matter (zeroing them changes both)."""
    from engine.backends.cuda.fused import FusedBlocks

    llm = engine.load(qwen2["q8_0"], device="cuda", context=128, dtype=dtype,
                      dca=engine.DCAConfig(chunk_size=24, local_window=6) if dca == "on" else "off")
    model, backend, c = llm.model, llm.backend, llm.config
    assert isinstance(model.decode_blocks, FusedBlocks) and all(model.decode_blocks.fused_attention)
    staging_only(model.decode_blocks)  # the staged inputs: the composed step's values but for summation order
    prompt = np.asarray((IDS * 3)[:60])
    caches = [backend.new_cache(c.n_layers, 128, c.n_kv_heads, c.head_dim) for _ in range(3)]
    for cache in caches:
        model.forward(prompt, cache, logits_for="none")
    token, position = backend.tokens([77]), backend.positions(len(prompt), 1)
    fused = backend.to_numpy(model.compute(token, position, caches[0], "last"))
    blocks, model.decode_blocks = model.decode_blocks, model  # the composed blocks
    composed = backend.to_numpy(model.compute(token, position, caches[1], "last"))
    model.decode_blocks = blocks
    tol = 2e-3 if dtype == "f16" else 6e-3  # test_cuda_model FUSED_TOL: 1e-3 / 3e-3 on llama tiny models
    assert rel_err(fused, composed) < tol
    rows = slice(len(prompt), len(prompt) + 1)
    for name in ("k", "v"):
        assert rel_err(backend.to_numpy(getattr(caches[0], name)[:, rows]),
                       backend.to_numpy(getattr(caches[1], name)[:, rows])) < tol
    for layer in model.weights.layers:  # without the biases the step differs: the epilogue did add them
        for bias in (layer.attn_q_bias, layer.attn_k_bias, layer.attn_v_bias):
            bias.fill(0)
    unbiased = backend.to_numpy(model.compute(token, position, caches[2], "last"))
    assert rel_err(unbiased, fused) > 10 * tol


def test_the_models_own_attention_temperature(qwen2_1m, tmp_path):
    """original_max_position_embeddings (24 here) is the temperature's L, on by default with the model's DCA,
    off with --no-attn-temperature or without DCA; the float64 spec forward with the same factors agrees; GGUF
    keeps it."""
    from engine.dca import temperature

    ids = (IDS * 2)[:64]
    auto = engine.load(qwen2_1m, context=64)
    assert auto.config.temperature_length == 24 and auto.model.temperature_length == 24
    off = engine.load(qwen2_1m, context=64, attention_temperature=False)
    assert off.model.temperature_length is None
    assert engine.load(qwen2_1m, context=64, dca="off").model.temperature_length is None
    assert rel_err(auto.logits(ids[:24]), off.logits(ids[:24])) < 1e-6  # within L the factor is 1
    assert rel_err(auto.logits(ids), off.logits(ids)) > 1e-3
    scale = temperature(np.arange(len(ids)), 24)
    assert scale[23] == 1.0 and scale[-1] > 1.09  # the factor the spec forward below applies
    assert rel_err(auto.logits(ids), spec_forward(auto, ids, logit_scale=scale)) < 1e-5

    convert_hf_to_gguf(qwen2_1m, tmp_path / "m.gguf", "f32", progress=False)  # back to HF: the test above
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["engine.dca.original_context"].contents() == 24
    assert engine.load(tmp_path / "m.gguf", context=64).model.temperature_length == 24
