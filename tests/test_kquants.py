"""K-quant encoders (Q4_K, Q5_K, Q6_K) and Q5_0/Q5_1: llama.cpp's bytes, and round trips through two decoders."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.convert import kquants
from engine.convert import tensors as tensors_module
from engine.convert.quantize import encode_rows
from engine.convert.tensors import TensorJob, map_in_order
from engine.errors import ConfigError
from engine.loader import WeightTensor
from engine.weights.quant import GGMLType, dequantize
from kquant_reference import encode_q4_k, encode_q5_k, encode_q6_k

GOLDEN = Path(__file__).parent / "golden" / "kquants.npz"
K_TYPES = [GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
# relative RMS error bound on gaussian rows (llama.cpp's own quantizers reach ~0.07 / 0.035 / 0.018)
REL_RMS = {GGMLType.Q4_K: 0.09, GGMLType.Q5_K: 0.045, GGMLType.Q6_K: 0.022}


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_bytes_equal_llama_cpp(name):
    """tests/golden/kquants.npz holds ggml_quantize_chunk's output (tools/golden_kquants.py)."""
    golden = np.load(GOLDEN)
    x, expected = golden["input"], golden[name]
    ours = encode_rows(x, GGMLType[name])
    assert ours.shape == expected.shape
    differing = [row for row in range(x.shape[0]) if not np.array_equal(ours[row], expected[row])]
    assert differing == []


REFERENCE = {GGMLType.Q4_K: encode_q4_k, GGMLType.Q5_K: encode_q5_k, GGMLType.Q6_K: encode_q6_k}


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_reference_encoders_give_llama_cpp_bytes(t):
    """The plain reference (tests/kquant_reference.py) the fast encoders are compared with below is itself exact."""
    golden = np.load(GOLDEN)
    assert np.array_equal(REFERENCE[t](golden["input"]).reshape(golden[t.name].shape), golden[t.name])


def random_tensors() -> dict[str, np.ndarray]:
    """Tensors of several widths (256..14336) and row counts; more super-blocks than a Q4_K/Q5_K pass (1024) in one."""
    rng = np.random.default_rng(18)
    scaled = rng.normal(size=(37, 8192)) * np.exp(rng.uniform(-8, 4, size=(37, 512))).repeat(16, axis=1)
    scaled[3] = 0
    scaled[5, 1024:2048] = 0
    scaled[7, 64:96] = 0.25
    return {
        "1x256": rng.normal(size=(1, 256)),
        "3x768 tiny": rng.normal(size=(3, 768)) * 1e-4,
        "5x4096 8B-like": rng.normal(size=(5, 4096)) / 64,
        "2x14336 heavy tails": rng.standard_t(3, size=(2, 14336)) / 120,
        "11x2816 one-signed": np.abs(rng.normal(size=(11, 2816))) + 0.1,
        "37x8192 mixed scales, zero and constant runs": scaled,
    }


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(random_tensors()))
def test_encoders_equal_the_reference(t, case):
    x = random_tensors()[case].astype(np.float32)
    assert np.array_equal(encode_rows(x, t), REFERENCE[t](x).reshape(x.shape[0], -1))


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q5_K], ids=lambda t: t.name)
def test_exact_rounding_path_gives_the_same_bytes(t, monkeypatch):
    """The search rounds with np.rint where |values| < _RINT_LIMIT is proven; with no such proof (limit 0) every
    candidate takes ggml's nearest_int bit trick instead, and the bytes must not change."""
    golden = np.load(GOLDEN)
    monkeypatch.setattr(kquants, "_RINT_LIMIT", np.float32(0))
    assert np.array_equal(encode_rows(golden["input"], t), golden[t.name])


def test_column_sums_add_rows_in_order():
    """The encoders' sums must round as the C loops do: row 0 + row 1 + ... , not pairwise."""
    rng = np.random.default_rng(3)
    terms = (rng.normal(size=(32, 24)) * np.exp(rng.uniform(-20, 20, size=(32, 24)))).astype(np.float32)
    running = terms[0].copy()
    for row in terms[1:]:
        running += row
    assert np.array_equal(kquants._column_sums(terms), running)
    assert not np.array_equal(np.sum(terms.T.copy(), axis=1), running)  # pairwise order rounds differently here


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
def test_threads_give_the_same_bytes(t, monkeypatch):
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 4 * 1024)  # 4 rows a slab: 13 slabs
    x = np.random.default_rng(9).normal(size=(50, 1024)).astype(np.float32)
    job = TensorJob("blk.0.ffn_up.weight", WeightTensor("w", GGMLType.F32, x.shape, x.view(np.uint8).reshape(-1)), t)
    one = job.data(threads=1)
    assert np.array_equal(one, encode_rows(x, t).reshape(-1))
    assert np.array_equal(job.data(threads=2), one)
    assert np.array_equal(job.data(threads=3), one)


def test_map_in_order_keeps_order_and_bounds_the_work_in_flight():
    started = []

    def square(i: int) -> int:
        started.append(i)
        return i * i

    results = map_in_order(square, range(100), threads=3)
    assert [next(results) for _ in range(4)] == [0, 1, 4, 9]
    assert max(started) < 4 + 2 * 3  # no more than 2 * threads submitted beyond what was consumed
    assert list(results) == [i * i for i in range(4, 100)]


def test_map_in_order_raises_a_worker_error():
    def fail_at_five(i: int) -> int:
        if i == 5:
            raise ConfigError("bad slab")
        return i

    with pytest.raises(ConfigError, match="bad slab"):
        list(map_in_order(fail_at_five, range(20), threads=2))


def round_trip_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    odd_scales = rng.normal(size=(6, 512)) * np.exp(rng.uniform(-9, 9, size=(6, 16))).repeat(32, axis=1)
    zero_blocks = rng.normal(size=(4, 768))
    zero_blocks[0] = 0
    zero_blocks[1, 256:512] = 0
    zero_blocks[2, 40:72] = 0
    constant = np.repeat(rng.normal(size=(4, 16)), 32, axis=1)
    return {
        "gaussian": rng.normal(size=(16, 512)),
        "odd scales": odd_scales,
        "zero blocks": zero_blocks,
        "constant blocks": constant,
        "huge": rng.normal(size=(4, 256)) * 3e4,
        "tiny": rng.normal(size=(4, 256)) * 1e-3,  # fp16 scales are subnormal here
        "negative only": -np.abs(rng.normal(size=(4, 256))) - 1.0,
        "positive only": np.abs(rng.normal(size=(4, 256))) + 1.0,
        "heavy tails": rng.standard_cauchy(size=(4, 512)),
    }


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(round_trip_cases()))
def test_round_trip_through_engine_and_gguf_py_decoders(t, case):
    x = round_trip_cases()[case].astype(np.float32)
    raw = encode_rows(x, t)
    ours = dequantize(raw, t, x.shape)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t))).reshape(x.shape)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    assert np.all(np.isfinite(ours))
    blocks, decoded = x.reshape(-1, 32), ours.reshape(-1, 32)
    zero = ~blocks.any(axis=1)
    assert not decoded[zero].any()  # all-zero sub-blocks come back exactly zero
    if case == "gaussian":
        assert np.sqrt(np.mean((ours - x) ** 2) / np.mean(x ** 2)) < REL_RMS[t]
    # every value is within a small part of its super-block's range; where all sub-blocks have alike
    # magnitudes (no 6-bit scale rounds to 0 against a much larger neighbour), of its sub-block's
    err = np.abs(ours - x).reshape(-1, 256)
    assert np.all(err <= 0.15 * np.abs(x).reshape(-1, 256).max(axis=1, keepdims=True))
    if case not in ("odd scales", "heavy tails", "zero blocks"):
        assert np.all(np.abs(decoded - blocks) <= 0.15 * np.abs(blocks).max(axis=1, keepdims=True))


def _awkward_rows(rng) -> np.ndarray:
    """Rows of 512 values that stress scale selection: zeros, constants, one-signed, outliers, sparse."""
    gaussian = rng.normal(size=512)
    outlier = rng.normal(size=512) * 0.01
    outlier[[3, 300]] = [40.0, -25.0]
    sparse = np.where(rng.random(512) < 0.05, rng.normal(size=512), 0.0)
    rows = [gaussian, np.zeros(512), np.full(512, 0.7), np.full(512, -0.7), np.abs(gaussian), -np.abs(gaussian),
            outlier, sparse, gaussian * 1e3, np.r_[np.zeros(256), gaussian[:256]]]
    return np.stack(rows).astype(np.float32)


def test_q4_k_round_trip_within_format_bounds():
    rng = np.random.default_rng(7)
    x = np.concatenate([_awkward_rows(rng), rng.normal(size=(6, 512)).astype(np.float32)])
    blocks = encode_rows(x, GGMLType.Q4_K)
    assert blocks.dtype == np.uint8 and blocks.shape == (x.shape[0], 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K][1])
    y = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    assert np.isfinite(y).all()
    # per super-block: half a step at the largest sub-block scale, plus 6-bit scale/min rounding
    xs, ys = x.reshape(-1, 8, 32), y.reshape(-1, 8, 32)
    low = np.minimum(xs.min(-1), 0)
    max_step = ((xs.max(-1) - low) / 15).max(-1)
    max_offset = (-low).max(-1)
    bound = 0.5 * max_step + 7.5 * max_step / 63 + 0.5 * max_offset / 63
    err = np.abs(ys - xs).max(axis=(1, 2))
    assert (err <= bound * 1.01 + 1e-7).all(), (err, bound)
    np.testing.assert_array_equal(y[1], 0.0)                  # zeros stay exact
    gaussian = slice(10, None)
    assert np.linalg.norm(y[gaussian] - x[gaussian]) / np.linalg.norm(x[gaussian]) < 0.1


def test_q6_k_round_trip_within_format_bounds():
    rng = np.random.default_rng(8)
    x = np.concatenate([_awkward_rows(rng), rng.normal(size=(6, 512)).astype(np.float32)])
    blocks = encode_rows(x, GGMLType.Q6_K)
    assert blocks.dtype == np.uint8 and blocks.shape == (x.shape[0], 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K][1])
    y = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K)
    assert np.isfinite(y).all()
    # per super-block, at the largest sub-block step (|x|max/32): a full step where a value of the sign
    # opposite to its sub-block's extreme clips at q-32 = +31, plus int8 scale rounding (32 * d/2, d = step/128)
    xs, ys = x.reshape(-1, 16, 16), y.reshape(-1, 16, 16)
    max_step = (np.abs(xs).max(-1) / 32).max(-1)
    bound = max_step + 16 * max_step / 128
    err = np.abs(ys - xs).max(axis=(1, 2))
    assert (err <= bound * 1.01 + 1e-7).all(), (err, bound)
    np.testing.assert_array_equal(y[1], 0.0)
    gaussian = slice(10, None)
    assert np.linalg.norm(y[gaussian] - x[gaussian]) / np.linalg.norm(x[gaussian]) < 0.025


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_constant_rows_decode_close_to_the_constant(t):
    x = np.full((2, 256), -0.7, np.float32)
    x[1] = 2.5
    decoded = dequantize(encode_rows(x, t), t, x.shape)
    np.testing.assert_allclose(decoded, x, rtol=0.02)


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_rows_encode_independently(t):
    """A tensor encoded in slabs of rows (as TensorJob streams it) equals the tensor encoded whole."""
    x = np.random.default_rng(5).normal(size=(12, 512)).astype(np.float32)
    whole = encode_rows(x, t)
    assert np.array_equal(np.concatenate([encode_rows(x[i:i + 5], t) for i in range(0, 12, 5)]), whole)


def test_job_streams_k_quants_in_slabs(monkeypatch):
    monkeypatch.setattr(tensors_module, "CHUNK_ELEMENTS", 2 * 512)  # 2 rows per slab
    x = np.random.default_rng(6).normal(size=(9, 512)).astype(np.float32)
    source = WeightTensor("w", GGMLType.F32, x.shape, x.view(np.uint8).reshape(-1))
    job = TensorJob("blk.0.ffn_down.weight", source, GGMLType.Q4_K)
    assert len(list(job.chunks())) == 5
    assert np.array_equal(job.data(), encode_rows(x, GGMLType.Q4_K).reshape(-1))


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_rows_must_be_whole_super_blocks(t):
    with pytest.raises(ConfigError, match=f"row length 576 is not a multiple of the {t.name} block size 256"):
        encode_rows(np.zeros((2, 576), np.float32), t)
