"""KV cache types (engine/kv_storage.py, --cache-type-k/-v): rows stored as llama.cpp stores them (bytes equal to
gguf-py's quantizers), attention over an encoded cache equal to attention over its decoded rows, a model whose cache
is q8_0 equal to one whose every cached row is rounded through gguf-py's q8_0, the memory plan, session files and
the refusals (CUDA, head sizes that do not split into blocks)."""
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import engine
from engine import kv_storage, memory, tiled_attention
from engine.backends.numpy_backend import NumpyBackend
from engine.config import DCAConfig
from engine.dca import as_scheme
from engine.errors import ConfigError
from engine.prompt_cache import SessionFileError
from engine.rope import RopeConfig, RotaryTable
from engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

ENCODED = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
GREEDY = SamplingParams(temperature=0.0)
DCA = DCAConfig(chunk_size=24, local_window=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with head_dim 32 (one q8_0 block a head), 2 KV heads."""
    spec = TinySpec(d_model=128, n_heads=4, n_kv_heads=2, ffn_dim=160, seed=5)
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), spec, gguf_types=("f32",))["f32"]


@pytest.mark.parametrize("name", ENCODED)
def test_rows_are_stored_as_gguf_py_quantizes_them(name):
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((2, 7, 3, 64)) * rng.uniform(0.01, 30, (2, 7, 3, 1))).astype(np.float32)
    rows[0, 2, 1] = 0.0  # an all-zero block
    store = kv_storage.allocate(name, (2, 10, 3, 64))
    store[:, 2:9] = rows
    qtype = gguf.GGMLQuantizationType[name.upper()]
    expected = np.ascontiguousarray(gguf.quants.quantize(rows.reshape(-1, 64), qtype)).view(np.uint8)
    expected = expected.reshape(2, 7, 3, -1)  # f16 / bf16 come back as 16-bit values: their bytes
    assert np.array_equal(store.raw[:, 2:9], expected)
    assert not store.raw[:, :2].any() and not store.raw[:, 9:].any()  # only the rows written
    decoded = np.asarray(store[:, 2:9], dtype=np.float32)
    assert decoded.shape == rows.shape
    assert np.array_equal(decoded, gguf.quants.dequantize(expected.reshape(-1, expected.shape[-1]), qtype)
                          .reshape(rows.shape))
    assert store[1].shape == (10, 3, 64) and store[1, 3:5].shape == (2, 3, 64)


def test_bytes_per_row_follow_the_ggml_block_sizes():
    assert [kv_storage.row_bytes(t, 128) for t in ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")] \
        == [512, 256, 256, 136, 96, 88, 80, 72]


def test_encoded_rows_take_leading_indices_only():
    store = kv_storage.allocate("q8_0", (2, 4, 1, 32))
    with pytest.raises(IndexError):
        store[0, 1, 0, 3]
    with pytest.raises(IndexError):
        store[np.array([0, 1])]


@pytest.mark.parametrize("layout", [None, DCA])
def test_attention_over_an_encoded_cache_equals_attention_over_its_decoded_rows(layout):
    rng = np.random.default_rng(2)
    n_keys, hkv, hq, hd = 70, 2, 6, 32
    rotary = RotaryTable(RopeConfig(dim=hd, theta=10000.0), 80)
    keys = kv_storage.allocate("q8_0", (n_keys, hkv, hd))
    values = kv_storage.allocate("q4_0", (n_keys, hkv, hd))
    keys[:] = rng.standard_normal((n_keys, hkv, hd))
    values[:] = rng.standard_normal((n_keys, hkv, hd))
    q = rng.standard_normal((9, hq, hd)).astype(np.float32)
    positions = np.arange(61, 70)
    scheme = as_scheme(layout)
    encoded = tiled_attention.blockwise_attention(q, keys, values, positions, rotary, scheme, block_k=16)
    decoded = tiled_attention.blockwise_attention(q, np.asarray(keys, np.float32), np.asarray(values, np.float32),
                                                  positions, rotary, scheme, block_k=16)
    assert np.array_equal(encoded, decoded)


class RoundTripBackend(NumpyBackend):
    """A float32 cache whose every written row is rounded through gguf-py's q8_0: the independent oracle."""

    def store_kv(self, cache, layer, k, v, positions, rotary, dca):
        super().store_kv(cache, layer, k, v, positions, rotary, dca)
        rows = slice(int(positions[0]), int(positions[-1]) + 1)
        for store in (cache.k, cache.v):
            x = store[layer, rows]
            q8 = gguf.quants.quantize(x.reshape(-1, x.shape[-1]), gguf.GGMLQuantizationType.Q8_0)
            store[layer, rows] = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)


def test_a_q8_0_cache_runs_the_model_as_rounding_every_cached_row_does(tiny, monkeypatch):
    ids = [int(i) for i in np.random.default_rng(4).integers(5, 380, 70)]
    llm = engine.load(tiny, dca=DCA, context=96, cache_type_k="q8_0", cache_type_v="q8_0")
    assert llm.dca is not None and llm.cache.types == ("q8_0", "q8_0")
    logits = llm.logits(ids)
    plain = engine.load(tiny, dca=DCA, context=96).logits(ids)
    monkeypatch.setattr(engine.api, "get_backend", lambda *a, **k: RoundTripBackend())
    oracle = engine.load(tiny, dca=DCA, context=96).logits(ids)
    np.testing.assert_array_equal(logits, oracle)  # the same rows in the same arithmetic
    assert 1e-3 < np.abs(logits - plain).max() < 0.1 * np.abs(plain).max()  # the rounding shows, and stays small


def test_generation_with_mixed_types_is_reproducible_and_sessions_round_trip(tiny, tmp_path):
    prompt = [int(i) for i in np.random.default_rng(6).integers(5, 380, 40)]
    llm = engine.load(tiny, dca=DCA, context=96, cache_type_k="q8_0", cache_type_v="f16")
    session = llm.session()
    first = list(session.generate_ids(prompt, 6, GREEDY, stop_ids=[]))
    path = tmp_path / "doc.session"
    session.save(path)
    again = engine.load(tiny, dca=DCA, context=96, cache_type_k="q8_0", cache_type_v="f16").session()
    again.load(path)
    follow_up = prompt + first + prompt[:5]
    assert list(again.generate_ids(follow_up, 4, GREEDY, stop_ids=[])) == \
        list(llm.generate_ids(follow_up, 4, GREEDY, stop_ids=[]))
    assert again.last_stats.cached_tokens == len(prompt) + len(first) - 1
    other = engine.load(tiny, dca=DCA, context=96).session()  # f32/f32
    with pytest.raises(SessionFileError, match="cache_types q8_0/f16"):
        other.load(path)


def test_memory_plan_counts_the_cache_types(tiny):
    f32 = engine.load(tiny, context=96)
    q8 = engine.load(tiny, context=96, cache_type_k="q8_0", cache_type_v="q4_0")
    c = f32.config  # 2 layers, 2 KV heads, head_dim 32
    assert f32.memory.kv_cache == 96 * 2 * 2 * (128 + 128)
    assert q8.memory.kv_cache == 96 * 2 * 2 * (34 + 18)
    assert memory.kv_bytes_per_token(c, ("f16", "q8_0")) == 2 * 2 * (64 + 34)


def test_refusals(tiny):
    with pytest.raises(ConfigError, match=r"on CUDA the KV cache is kept in the activation dtype \(f16\) or as q8_0"):
        kv_storage.resolve_cache_types("q4_0", None, "cuda", "f16", 128)  # CUDA takes q8_0 (test_cuda_kv_q8.py)
    assert kv_storage.resolve_cache_types(None, "bf16", "cuda", "bf16", 128) == ("bf16", "bf16")
    with pytest.raises(ConfigError, match="blocks of 32"):
        kv_storage.resolve_cache_types("q4_0", None, "cpu", "f32", 48)
    with pytest.raises(ConfigError, match="unknown KV cache type 'q3_k'"):
        engine.load(tiny, context=96, cache_type_v="q3_k")


def test_cli_generate_and_info_take_the_cache_types(tiny):
    run = [sys.executable, "-m", "engine"]
    gen = subprocess.run(run + ["generate", "-m", str(tiny), "-p", "hello", "-n", "4", "--temp", "0", "-c", "64",
                                "-ctk", "q8_0", "-ctv", "q5_1"], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    info = subprocess.run(run + ["info", "-m", str(tiny), "-c", "64", "-ctk", "q8_0", "--device", "cpu"],
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "KV cache" in info.stdout and "k q8_0, v f32" in info.stdout
    bad = subprocess.run(run + ["generate", "-m", str(tiny), "-p", "hi", "-ctk", "q4_k"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "q4_k" in bad.stderr


def test_session_files_from_before_cache_types_load_as_the_backends_own(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    prompt = [int(i) for i in np.random.default_rng(8).integers(5, 380, 20)]
    session = engine.load(tiny, context=96).session()
    list(session.generate_ids(prompt, 2, GREEDY, stop_ids=[]))
    path, old = tmp_path / "new.session", tmp_path / "old.session"
    session.save(path)
    with safe_open(str(path), framework="numpy") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "cache_types"}
        save_file({name: f.get_tensor(name) for name in f.keys()}, str(old), metadata=metadata)
    restored = engine.load(tiny, context=96).session()
    restored.load(old)  # an f32 CPU cache, as every file was before cache types
    assert restored.tokens == session.tokens
    with pytest.raises(SessionFileError, match="cache_types f32/f32"):
        engine.load(tiny, context=96, cache_type_k="q8_0").session().load(old)
