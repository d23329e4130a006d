"""Block dequantization against gguf-py's independent numpy implementation."""
import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as reference_dequantize

from engine.errors import ModelFormatError
from engine.weights.quant import SUPPORTED_TYPES, GGMLType, block_layout, dequantize, tensor_nbytes

QUANTIZED = [
    GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
    GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
]
# Byte offsets of the fp16 fields (d, m/dmin) inside each block: set to sane values so that
# random bytes never make NaN/inf scales; every other byte stays random.
FP16_FIELDS = {
    GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
}


def random_blocks(t: GGMLType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random valid bytes of a tensor of numpy `shape`, as (n_blocks, bytes_per_block) uint8."""
    per_block, block_bytes = block_layout(t)
    n_blocks = int(np.prod(shape)) // per_block
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[t]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype("<f2")
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def reference(blocks: np.ndarray, t: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    rows = blocks.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1)
    return reference_dequantize(rows, gguf.GGMLQuantizationType(int(t))).reshape(shape)


def test_type_numbers_match_llama_cpp():
    for t in GGMLType:
        assert gguf.GGMLQuantizationType[t.name].value == t.value
    for t in SUPPORTED_TYPES:
        assert block_layout(t) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))]


@pytest.mark.parametrize("t", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (3, 4), (17, 2), (64, 3)])
def test_quantized_matches_reference(t, rows, blocks_per_row):
    rng = np.random.default_rng([int(t), rows, blocks_per_row])
    shape = (rows, blocks_per_row * block_layout(t)[0])
    blocks = random_blocks(t, shape, rng)
    ours = dequantize(blocks.reshape(-1), t, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours, reference(blocks, t, shape))


@pytest.mark.parametrize("t", QUANTIZED, ids=lambda t: t.name)
def test_three_dimensional_shape_and_large_tensor(t):
    # Larger than one decoding step (8192 blocks), with a 3-D numpy shape.
    rng = np.random.default_rng(int(t))
    per_block = block_layout(t)[0]
    shape = (3, 1500, 2 * per_block)
    blocks = random_blocks(t, shape, rng)
    np.testing.assert_array_equal(dequantize(blocks, t, shape), reference(blocks, t, shape))


@pytest.mark.parametrize("t", QUANTIZED, ids=lambda t: t.name)
def test_row_subset_equals_rows_of_full_tensor(t):
    rng = np.random.default_rng(100 + int(t))
    shape = (10, 2 * block_layout(t)[0])
    rows = random_blocks(t, shape, rng).reshape(shape[0], -1)
    full = dequantize(rows, t, shape)
    np.testing.assert_array_equal(dequantize(rows[3:7], t, (4, shape[1])), full[3:7])
    np.testing.assert_array_equal(dequantize(rows[[8, 1]], t, (2, shape[1])), full[[8, 1]])


def test_float_types():
    rng = np.random.default_rng(7)
    values = rng.standard_normal((5, 12)).astype(np.float32)

    f32 = values.view(np.uint8).reshape(-1)
    out = dequantize(f32, GGMLType.F32, values.shape)
    np.testing.assert_array_equal(out, values)
    assert np.shares_memory(out, f32)  # F32 is a zero-copy view

    half = values.astype("<f2")
    np.testing.assert_array_equal(
        dequantize(half.view(np.uint8).reshape(-1), GGMLType.F16, values.shape), half.astype(np.float32)
    )

    bf16 = (values.view("<u4") >> 16).astype("<u2")  # truncation: exactly representable back
    truncated = (values.view("<u4") & 0xFFFF0000).view(np.float32)
    ours = dequantize(bf16.view(np.uint8).reshape(-1), GGMLType.BF16, values.shape)
    np.testing.assert_array_equal(ours, truncated)
    np.testing.assert_array_equal(ours, reference(bf16.view(np.uint8), GGMLType.BF16, values.shape))


def test_known_q8_0_block():
    # d = 0.5, qs = -16..15: y = q * d
    block = np.concatenate([np.array([0.5], "<f2").view(np.uint8), np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
    np.testing.assert_array_equal(dequantize(block, GGMLType.Q8_0, (32,)), np.arange(-16, 16) * 0.5)


def test_sizes_and_errors():
    assert tensor_nbytes(GGMLType.Q4_K, (576, 1536)) == 576 * 6 * 144
    assert tensor_nbytes(GGMLType.F16, (3, 5)) == 30
    with pytest.raises(ModelFormatError, match="row length 33 .* multiple of its block size 32"):
        tensor_nbytes(GGMLType.Q8_0, (2, 33))
    with pytest.raises(ModelFormatError, match="IQ2_XXS is not supported"):
        tensor_nbytes(GGMLType.IQ2_XXS, (1, 256))
    with pytest.raises(ModelFormatError, match="needs 34 bytes, got 33"):
        dequantize(np.zeros(33, np.uint8), GGMLType.Q8_0, (32,))
