"""ggml tensor types: block layouts and vectorized numpy dequantization.

Block formats follow llama.cpp's ggml-common.h (structs) and ggml-quants.c
(`dequantize_row_*`). Every quantized type stores a row as whole blocks of
`elements_per_block` values; a tensor of numpy shape (..., n_cols) is laid out row-major,
each row being n_cols / elements_per_block consecutive blocks. Dequantization views the
bytes as an (n_blocks, bytes_per_block) uint8 array and decodes all blocks at once.

Multi-byte fields are little-endian; `ggml_half` is IEEE fp16.
"""
from __future__ import annotations

import enum
from typing import Callable

import numpy as np

from ..errors import ModelFormatError
from .bf16 import from_bf16_bits


class GGMLType(enum.IntEnum):
    """llama.cpp's `enum ggml_type` (numbers are part of the GGUF format)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


QK_K = 256  # elements per K-quant super-block

# (elements_per_block, bytes_per_block) of the types this engine can dequantize.
_LAYOUTS: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),  # d, qs[16]
    GGMLType.Q4_1: (32, 2 + 2 + 16),  # d, m, qs[16]
    GGMLType.Q5_0: (32, 2 + 4 + 16),  # d, qh[4], qs[16]
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),  # d, m, qh[4], qs[16]
    GGMLType.Q8_0: (32, 2 + 32),  # d, qs[32] (int8)
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + 128),  # d, dmin, scales[12], qs[128]
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + 32 + 128),  # d, dmin, scales[12], qh[32], qs[128]
    GGMLType.Q6_K: (QK_K, 128 + 64 + 16 + 2),  # ql[128], qh[64], scales[16] (int8), d
}

SUPPORTED_TYPES: tuple[GGMLType, ...] = tuple(_LAYOUTS)


def _type_name(code: int) -> str:
    """A readable name for a ggml type number, known or not."""
    try:
        return GGMLType(code).name
    except ValueError:
        return f"unknown type {code}"


def block_layout(t: GGMLType | int) -> tuple[int, int]:
    """(elements_per_block, bytes_per_block) of a supported type."""
    layout = _LAYOUTS.get(t)  # IntEnum hashes like its int, so plain ints work too
    if layout is None:
        supported = ", ".join(s.name for s in SUPPORTED_TYPES)
        raise ModelFormatError(f"tensor type {_type_name(t)} is not supported (supported: {supported})")
    return layout


def tensor_nbytes(t: GGMLType | int, shape: tuple[int, ...]) -> int:
    """Bytes taken by a tensor of numpy `shape` (rows along the last dim) stored as type t."""
    per_block, block_bytes = block_layout(t)
    n_cols = shape[-1] if shape else 1
    if n_cols % per_block:
        raise ModelFormatError(
            f"row length {n_cols} of a {GGMLType(t).name} tensor is not a multiple of its block size {per_block}"
        )
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    return n_elements // per_block * block_bytes


# ---------------------------------------------------------------------------------------
# Field helpers. `blocks` is (n_blocks, bytes_per_block) uint8, C-contiguous.


def _f16_column(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` of every block as float32, shape (n_blocks, 1)."""
    return blocks[:, offset : offset + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2, k): [:, 0] = low nibbles, [:, 1] = high nibbles (uint8)."""
    out = np.empty((qs.shape[0], 2, qs.shape[1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[:, 0])
    np.right_shift(qs, 4, out=out[:, 1])
    return out


def _bits_lsb_first(field: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8k) uint8 bits, bit i = (little-endian integer >> i) & 1."""
    return np.unpackbits(field, axis=1, bitorder="little")


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte packed 6-bit scales and mins -> two (n_blocks, 8) uint8 arrays.

    ggml get_scale_min_k4: for j < 4: sc = q[j] & 63, m = q[j+4] & 63; for j >= 4:
    sc = (q[j+4] & 0xF) | ((q[j-4] >> 6) << 4), m = (q[j+4] >> 4) | ((q[j] >> 6) << 4).
    """
    s = scales
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty((s.shape[0], 8), dtype=np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


# ---------------------------------------------------------------------------------------
# Per-type decoders: blocks (n_blocks, bytes_per_block) uint8 -> out (n_blocks,
# elements_per_block) float32, written in place (one pass over the output).


def _decode_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16_column(blocks, 0)
    np.multiply(blocks[:, 2:34].view(np.int8), d, out=out)


def _decode_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16_column(blocks, 0)
    q = _nibbles(blocks[:, 2:18]).reshape(-1, 32).view(np.int8)  # y[j], y[j+16]
    q -= 8
    np.multiply(q, d, out=out)


def _decode_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16_column(blocks, 0)
    m = _f16_column(blocks, 2)
    np.multiply(_nibbles(blocks[:, 4:20]).reshape(-1, 32), d, out=out)
    out += m


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: value i = nibble i | bit i of the uint32 qh << 4, shape (n_blocks, 32) uint8."""
    q = _nibbles(qs).reshape(-1, 32)
    q |= _bits_lsb_first(qh) << 4
    return q


def _decode_q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16_column(blocks, 0)
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:22]).view(np.int8)
    q -= 16
    np.multiply(q, d, out=out)


def _decode_q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _f16_column(blocks, 0)
    m = _f16_column(blocks, 2)
    np.multiply(_q5_values(blocks[:, 4:8], blocks[:, 8:24]), d, out=out)
    out += m


def _k_quant_affine(blocks: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """Q4_K/Q5_K: y = (d*sc) * q - (dmin*m) per sub-block of 32; q is (n_blocks, 8, 32)."""
    d = _f16_column(blocks, 0)  # (n, 1)
    dmin = _f16_column(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    sub_blocks = out.reshape(-1, 8, 32)
    np.multiply(q, (d * sc)[:, :, None], out=sub_blocks)
    sub_blocks -= (dmin * mn)[:, :, None]


def _decode_q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # qs holds 4 groups of 32 bytes; group g gives sub-block 2g (low nibbles), 2g+1 (high).
    qs = blocks[:, 16:144].reshape(-1, 32)  # (n*4, 32)
    _k_quant_affine(blocks, _nibbles(qs).reshape(-1, 8, 32), out)


def _decode_q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # As Q4_K, plus bit s of qh[l] is the fifth bit of element l of sub-block s.
    qs = blocks[:, 48:176].reshape(-1, 32)
    q = _nibbles(qs).reshape(-1, 8, 32)
    high = _bits_lsb_first(blocks[:, 16:48].reshape(-1, 1)).reshape(-1, 32, 8)  # (n, l, s)
    q |= high.transpose(0, 2, 1) << 4
    _k_quant_affine(blocks, q, out)


_Q6_HIGH_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]


def _decode_q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # Two halves h of 128 values; within a half, quarter k (32 values) takes
    #   low 4 bits: k=0: ql[l] & 0xF, k=1: ql[l+32] & 0xF, k=2: ql[l] >> 4, k=3: ql[l+32] >> 4
    #   high 2 bits: (qh[l] >> 2k) & 3
    # and every 16 consecutive outputs share one int8 scale.
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n * 2, 64)  # (n*2 halves, 64)
    q = _nibbles(ql).reshape(n, 2, 4, 32)  # quarters in order k = 2*nibble + (l >= 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    q |= ((qh >> _Q6_HIGH_SHIFTS) & 3) << 4  # values 0..63
    q = q.view(np.int8)
    q -= 32
    d = _f16_column(blocks, 208)  # (n, 1)
    scale = d * blocks[:, 192:208].view(np.int8)  # (n, 16) float32
    np.multiply(q.reshape(n, 16, 16), scale[:, :, None], out=out.reshape(n, 16, 16))


_BLOCK_DECODERS: dict[GGMLType, Callable[[np.ndarray, np.ndarray], None]] = {
    GGMLType.Q8_0: _decode_q8_0,
    GGMLType.Q4_0: _decode_q4_0,
    GGMLType.Q4_1: _decode_q4_1,
    GGMLType.Q5_0: _decode_q5_0,
    GGMLType.Q5_1: _decode_q5_1,
    GGMLType.Q4_K: _decode_q4_k,
    GGMLType.Q5_K: _decode_q5_k,
    GGMLType.Q6_K: _decode_q6_k,
}

# Blocks decoded per step: bounds the integer temporaries (~a few MB) while keeping numpy
# calls large enough that per-call overhead does not matter.
_BLOCKS_PER_STEP = 8192


def dequantize(raw: np.ndarray, t: GGMLType | int, shape: tuple[int, ...], out: np.ndarray | None = None
               ) -> np.ndarray:
    """Decode the bytes of a tensor (or of k whole rows of one) into float32 of `shape`.

    raw: uint8 array of exactly tensor_nbytes(t, shape) bytes (any shape, C-contiguous).
    out: a C-contiguous float32 array of `shape` to decode into (a reused scratch buffer), or None: then
    F32 comes back as a zero-copy (read-only if `raw` is) view and other types as a new array.
    Rows decode independently: decoding a row range gives the same values as the rows of the whole tensor.
    """
    t = GGMLType(t)
    shape = tuple(int(d) for d in shape)
    expected = tensor_nbytes(t, shape)
    flat = np.ascontiguousarray(raw).reshape(-1)
    if flat.dtype != np.uint8:
        raise TypeError(f"dequantize expects uint8 bytes, got {flat.dtype}")
    if flat.size != expected:
        raise ModelFormatError(
            f"{t.name} tensor of shape {shape} needs {expected} bytes, got {flat.size}"
        )
    if out is not None and (out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous):
        raise ValueError(f"dequantize: out must be C-contiguous float32 of shape {shape}, got {out.dtype} {out.shape}")
    if t == GGMLType.F32:
        values = flat.view("<f4").reshape(shape)
        if out is None:
            return values
        np.copyto(out, values)
        return out
    result = np.empty(shape, dtype=np.float32) if out is None else out
    if t == GGMLType.F16:
        np.copyto(result, flat.view("<f2").reshape(shape))
        return result
    if t == GGMLType.BF16:
        return from_bf16_bits(flat.view("<u2").reshape(shape), out=result)
    per_block, block_bytes = _LAYOUTS[t]
    decode = _BLOCK_DECODERS[t]
    blocks = flat.reshape(-1, block_bytes)
    decoded = result.reshape(blocks.shape[0], per_block)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_STEP):
        stop = start + _BLOCKS_PER_STEP
        decode(blocks[start:stop], decoded[start:stop])
    return result

