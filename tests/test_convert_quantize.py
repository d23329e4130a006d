"""Quantizers and tensor jobs of engine.convert: bytes equal gguf-py's reference quantizers."""
from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.convert import tensors as tensors_module
from engine.convert.quantize import encode_rows
from engine.convert.tensors import TensorJob, gguf_rope_row_order, hf_rope_row_order
from engine.errors import ConfigError
from engine.loader import WeightTensor, _unpermute_rows
from engine.weights.quant import GGMLType, dequantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import permute_for_gguf  # noqa: E402

# the types gguf-py can quantize (the K-quants are checked against llama.cpp in test_kquants.py)
ALL_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_0,
             GGMLType.Q4_1]
# zero, or magnitudes whose block scales have finite reciprocals (below ~1e-37 both quantizers would
# cast NaN/inf to integers, which C and numpy leave undefined)
FINITE_VALUES = st.one_of(st.just(0.0), st.builds(lambda sign, magnitude: sign * magnitude,
                                                  st.sampled_from([-1.0, 1.0]), st.floats(2.0 ** -66, 1e4, width=32)))
BLOCK_TYPES = [GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_0, GGMLType.Q4_1]


def reference_bytes(x: np.ndarray, t: GGMLType) -> np.ndarray:
    """gguf-py's quantizer output as (rows, bytes per row) uint8."""
    out = gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), gguf.GGMLQuantizationType(int(t)))
    return out.view(np.uint8).reshape(x.shape[0], -1)


def edge_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    ties = (rng.integers(-16, 16, size=(8, 64)) * 0.5).astype(np.float32)  # many exact .5 ratios
    ties[:, 0] = 127 * 0.5  # max|x| = 63.5 -> Q8_0 d = 0.5, every ratio a tie
    single_spike = np.zeros((2, 32), np.float32)
    single_spike[0, 5], single_spike[1, 31] = 3.0, -3.0
    return {
        "gaussian": rng.normal(size=(64, 256)).astype(np.float32),
        "zeros": np.zeros((4, 64), np.float32),
        "constant": np.full((4, 64), 3.25, np.float32),
        "negative constant": np.full((4, 32), -0.75, np.float32),
        "all negative": -np.abs(rng.normal(size=(8, 64))).astype(np.float32),
        "all positive": np.abs(rng.normal(size=(8, 64))).astype(np.float32),
        "ties": ties,
        "single spike": single_spike,
        "tiny": (rng.normal(size=(8, 64)) * 1e-6).astype(np.float32),
        "large": (rng.normal(size=(8, 64)) * 1e3).astype(np.float32),
        "heavy tails": rng.standard_cauchy(size=(16, 96)).astype(np.float32),
    }


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(edge_cases()))
def test_bytes_equal_gguf_py(t, case):
    x = edge_cases()[case]
    assert np.array_equal(encode_rows(x, t), reference_bytes(x, t))


@settings(max_examples=60, deadline=None)
@given(
    t=st.sampled_from(ALL_TYPES),
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])), elements=FINITE_VALUES),
)
def test_bytes_equal_gguf_py_on_arbitrary_values(t, x):
    assert np.array_equal(encode_rows(x, t), reference_bytes(x, t))


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_quantized_values_decode_close_to_input(t):
    x = np.random.default_rng(1).normal(size=(32, 128)).astype(np.float32)
    decoded = dequantize(encode_rows(x, t), t, x.shape)
    rel_rms = np.sqrt(np.mean((decoded - x) ** 2) / np.mean(x ** 2))
    assert rel_rms < {GGMLType.Q8_0: 0.01, GGMLType.Q5_0: 0.08, GGMLType.Q5_1: 0.06, GGMLType.Q4_0: 0.15,
                      GGMLType.Q4_1: 0.12}[t]


def test_bf16_keeps_nan_and_infinities():
    x = np.array([[np.nan, np.inf, -np.inf, 1.0, -0.0, 3e38, 1e-40, 0.1]], np.float32)
    out = encode_rows(x, GGMLType.BF16)
    assert np.array_equal(out, reference_bytes(x, GGMLType.BF16))
    back = dequantize(out, GGMLType.BF16, x.shape)[0]
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf


def test_f16_overflow_is_an_error():
    with pytest.raises(ConfigError, match="beyond the F16 range"):
        encode_rows(np.array([[1.0, 70000.0]], np.float32), GGMLType.F16)


def test_block_types_need_whole_blocks():
    with pytest.raises(ConfigError, match="not a multiple of the Q8_0 block size"):
        encode_rows(np.zeros((2, 48), np.float32), GGMLType.Q8_0)


@pytest.mark.parametrize("n_heads,head_dim", [(4, 16), (3, 64), (1, 2)])
def test_rope_row_orders_match_llama_cpp_permute(n_heads, head_dim):
    n_rows = n_heads * head_dim
    hf = np.random.default_rng(2).normal(size=(n_rows, 8)).astype(np.float32)
    as_gguf = hf[gguf_rope_row_order(n_rows, n_heads)]
    assert np.array_equal(as_gguf, permute_for_gguf(hf, n_heads))  # convert_hf_to_gguf.py's permute
    assert np.array_equal(as_gguf[hf_rope_row_order(n_rows, n_heads)], hf)
    assert np.array_equal(_unpermute_rows(as_gguf, n_heads), hf)  # the loader's inverse


def weight(x: np.ndarray, t: GGMLType) -> WeightTensor:
    raw = encode_rows(x.reshape(-1, x.shape[-1]), t).reshape(-1)
    return WeightTensor("w", t, x.shape, raw)


@pytest.mark.parametrize("source_type", [GGMLType.F32, GGMLType.BF16, GGMLType.Q4_1])
@pytest.mark.parametrize("out_type", [GGMLType.F32, GGMLType.Q8_0, GGMLType.Q4_0])
def test_job_streams_in_chunks_and_reorders_rows(monkeypatch, source_type, out_type):
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 3 * 64)  # 3 rows a chunk: 22 chunks
    x = np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)
    source = weight(x, source_type)
    order = gguf_rope_row_order(64, 4)
    job = TensorJob("blk.0.attn_q.weight", source, out_type, order)
    assert len(list(job.chunks())) == 22
    expected = encode_rows(dequantize(source.raw, source_type, x.shape)[order], out_type).reshape(-1)
    data = job.data()
    assert data.size == job.nbytes and np.array_equal(data, expected)


def test_job_copies_unchanged_types_byte_for_byte():
    x = np.random.default_rng(4).normal(size=(16, 64)).astype(np.float32)
    source = weight(x, GGMLType.Q4_1)
    assert np.array_equal(TensorJob("w", source, GGMLType.Q4_1).data(), source.raw)
    order = hf_rope_row_order(16, 2)
    moved = TensorJob("w", source, GGMLType.Q4_1, order).data()
    assert np.array_equal(moved.reshape(16, -1), source.raw.reshape(16, -1)[order])


def test_job_names_the_tensor_in_errors():
    source = weight(np.array([[70000.0] * 32], np.float32), GGMLType.F32)
    with pytest.raises(ConfigError, match="tensor 'token_embd.weight': value 70000 is beyond the F16 range"):
        TensorJob("token_embd.weight", source, GGMLType.F16).data()
