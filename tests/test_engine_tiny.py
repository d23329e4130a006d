"""The whole engine on tiny random models: formats agree, tensor types dispatch, tiling of work never matters."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.errors import ContextError, ModelFormatError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import VARIANTS, TinySpec, make_tiny_model  # noqa: E402

QUANT_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "mixed")
# (max |logits - f32 logits| / max |f32 logits|, min correlation with the f32 logits): measured
# 8.5e-4, 6.9e-3, 0.027, 0.37, 0.34, 0.29, 0.083, 0.22 and correlations 0.94 .. 0.9999996 on these
# Gaussian random weights (4-bit formats lose much on them); bounds leave ~1.5x headroom.
QUANT_TOLERANCE = {"f16": (2e-3, 0.99999), "bf16": (1e-2, 0.9999), "q8_0": (0.04, 0.999),
                   "q4_0": (0.55, 0.9), "q4_1": (0.5, 0.92), "q4_k": (0.45, 0.92), "q6_k": (0.13, 0.99),
                   "mixed": (0.35, 0.95)}
PROMPT = [5, 17, 200, 33, 99, 250, 7, 64, 128, 300, 11, 42, 77, 150, 3, 180, 260, 91, 45, 12]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for variant in ("gqa", "mha", "tied"):
        out[variant] = make_tiny_model(tmp_path_factory.mktemp(variant), VARIANTS[variant], gguf_types=("f32",))
    out["kquant"] = make_tiny_model(tmp_path_factory.mktemp("kquant"), VARIANTS["kquant"],
                                    gguf_types=("f32",) + QUANT_TYPES, hf=False)
    return out


@pytest.mark.parametrize("variant", ["gqa", "mha", "tied"])
def test_gguf_and_safetensors_give_the_same_logits(models, variant):
    from_gguf = engine.load(models[variant]["f32"]).logits(PROMPT)
    from_hf = engine.load(models[variant]["hf"]).logits(PROMPT)
    assert from_gguf.shape == (len(PROMPT), VARIANTS[variant].vocab_size)
    assert rel_err(from_gguf, from_hf) < 1e-5


def test_tied_model_has_no_output_tensor(models):
    llm = engine.load(models["tied"]["f32"])
    assert llm.config.tied_embeddings and "output" not in llm.loaded.weights


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantized_models_track_f32(models, qtype):
    reference = engine.load(models["kquant"]["f32"]).logits(PROMPT)
    logits = engine.load(models["kquant"][qtype]).logits(PROMPT)
    max_rel_err, min_correlation = QUANT_TOLERANCE[qtype]
    assert rel_err(logits, reference) < max_rel_err
    assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > min_correlation


def test_mixed_file_dispatches_each_tensor_type(models):
    types = engine.load(models["kquant"]["mixed"]).loaded.tensor_type_counts()
    assert {"Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "Q4_K", "Q6_K", "F32"} <= set(types)


def test_bf16_and_sharded_safetensors(tmp_path):
    paths = make_tiny_model(tmp_path, TinySpec(seed=3), gguf_types=("f32",), hf_dtype="bf16", hf_shards=3)
    assert (paths["hf"] / "model.safetensors.index.json").exists()
    assert rel_err(engine.load(paths["hf"]).logits(PROMPT), engine.load(paths["f32"]).logits(PROMPT)) < 1e-5


def test_matches_transformers_on_tiny_model(models):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(models["gqa"]["hf"], dtype=torch.float32)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0].numpy()
    assert rel_err(engine.load(models["gqa"]["hf"]).logits(PROMPT), expected) < 1e-5


@pytest.mark.parametrize("dca", [None, engine.DCAConfig(chunk_size=12, local_window=4)])
def test_prefill_in_pieces_and_decode_equal_one_pass(models, dca):
    llm = engine.load(models["gqa"]["f32"], dca=dca if dca else "off")
    whole = llm.logits(PROMPT)
    cache = llm.new_cache()
    rows = [llm.backend.to_numpy(llm.model.forward(np.array(PROMPT[:7]), cache))]
    rows += [llm.backend.to_numpy(llm.model.forward(np.array([t]), cache)) for t in PROMPT[7:]]
    assert rel_err(np.concatenate(rows), whole) < 1e-5


def test_dca_changes_logits_only_beyond_one_chunk(models):
    plain = engine.load(models["gqa"]["f32"], dca="off").logits(PROMPT)
    dca = engine.load(models["gqa"]["f32"], dca=engine.DCAConfig(chunk_size=12, local_window=4)).logits(PROMPT)
    chunk_len = 8
    assert rel_err(dca[:chunk_len], plain[:chunk_len]) < 1e-6
    assert rel_err(dca[chunk_len:], plain[chunk_len:]) > 1e-3


def test_greedy_generation_is_the_argmax_chain(models):
    llm = engine.load(models["gqa"]["f32"])
    got = list(llm.generate_ids(PROMPT, max_tokens=6, sampling=engine.SamplingParams(temperature=0.0),
                                stop_ids=()))
    ids = list(PROMPT)
    for _ in range(6):
        ids.append(int(np.argmax(llm.logits(ids)[-1])))
    assert got == ids[len(PROMPT):]


def test_sampled_generation_is_deterministic_for_a_seed(models):
    llm = engine.load(models["gqa"]["f32"])
    runs = ["".join(llm.generate("hello", max_tokens=12, temperature=1.0, seed=s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_prompt_beyond_context_is_a_clear_error(models):
    llm = engine.load(models["gqa"]["f32"], context=8)
    with pytest.raises(ContextError, match="-c"):
        llm.logits(PROMPT)


def test_generation_stops_at_the_end_of_the_context(models):
    llm = engine.load(models["gqa"]["f32"], context=len(PROMPT) + 3)
    got = list(llm.generate_ids(PROMPT, max_tokens=10, sampling=engine.SamplingParams(temperature=0.0),
                                stop_ids=()))
    # three decode steps fill the cache; the logits of the last one still give a fourth token
    assert len(got) == 4 and llm.last_stats.stop_reason == "context"


def test_chat_prompt_uses_the_template(models):
    llm = engine.load(models["gqa"]["f32"])
    ids = llm.prompt_ids("hi", chat=True)
    assert llm.detokenize(ids).startswith("<|im_start|>user\nhi<|im_end|>")


def _copy_hf(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_tensor_is_named(models, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder = _copy_hf(models["gqa"]["hf"], tmp_path / "hf")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="blk.1.ffn_up"):
        engine.load(folder)


@pytest.mark.parametrize("edit, message", [
    ({"hidden_size": 96}, "shape"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_bad_config_is_a_clear_error(models, tmp_path, edit, message):
    folder = _copy_hf(models["gqa"]["hf"], tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=message):
        engine.load(folder)


def test_rope_freqs_tensor_divides_the_frequencies(tmp_path):
    """Factors all equal to 2 in `rope_freqs` are linear RoPE scaling by 2 (llama.cpp semantics)."""
    spec = TinySpec(rope_freq_factors=(2.0,) * 8)
    with_factors = make_tiny_model(tmp_path / "a", spec, gguf_types=("f32",), hf=False)["f32"]
    plain = make_tiny_model(tmp_path / "b", TinySpec(), gguf_types=("f32",), hf=False)["f32"]
    llm = engine.load(with_factors)
    np.testing.assert_array_equal(llm.config.rope.freq_factors, 2.0)
    linear = engine.load(plain, rope_scaling="linear", rope_scale=2.0).logits(PROMPT)
    assert rel_err(llm.logits(PROMPT), linear) < 1e-5
    assert rel_err(engine.load(plain).logits(PROMPT), linear) > 1e-3


def test_integer_buffers_are_ignored_but_integer_weights_refused(models, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder = _copy_hf(models["gqa"]["hf"], tmp_path / "hf")
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "model.position_ids": np.arange(256, dtype=np.int64)}, folder / "model.safetensors")
    assert rel_err(engine.load(folder).logits(PROMPT), engine.load(models["gqa"]["hf"]).logits(PROMPT)) == 0
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="'model.norm.weight' has dtype I8"):
        engine.load(folder)
