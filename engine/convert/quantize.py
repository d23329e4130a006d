"""float32 rows -> ggml tensor bytes: F32, F16, BF16, the 32-wide block quantizers Q8_0, Q5_0, Q5_1,
Q4_0, Q4_1, and the K-quants Q6_K, Q5_K, Q4_K (``kquants``).

The block quantizers follow ggml-quants.c (``quantize_row_*_ref``) in float32 arithmetic, so their
bytes equal llama.cpp's and gguf-py's ``gguf.quants.quantize`` (the tests check byte equality):

    Q8_0  d = max|x| / 127;  q = roundf(x / d)               (round half away from zero), int8
    Q5_0  d = x[argmax|x|] / -16;  q = min(31, trunc(x/d + 16.5)), low nibbles as Q4_0, fifth bits in qh
    Q5_1  d = (max - min) / 31, m = min;  q = trunc((x - m)/d + 0.5), as Q5_0
    Q4_0  d = x[argmax|x|] / -8;  q = min(15, trunc(x/d + 8.5)), low nibble = x[j], high = x[j+16]
    Q4_1  d = (max - min) / 15, m = min;  q = min(15, trunc((x - m)/d + 0.5)), same nibble order

where ``1/d`` is taken as 0 for an all-zero block and d, m are stored as fp16 (round to nearest even).
BF16 rounds to nearest even and keeps NaN quiet, as ``ggml_compute_fp32_to_bf16``.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..weights.bf16 import to_bf16_bits
from ..weights.quant import GGMLType, block_layout
from .kquants import encode_q4_k, encode_q5_k, encode_q6_k

BLOCK = 32  # elements per Q8_0 / Q5_x / Q4_x block


def encode_rows(x: np.ndarray, t: GGMLType) -> np.ndarray:
    """x: (n_rows, n_cols) float32 -> (n_rows, bytes_per_row) uint8 holding the rows as type t."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_rows, n_cols = x.shape
    encode = _ENCODERS.get(t)
    if encode is None:
        raise ConfigError(f"cannot write tensors of type {GGMLType(t).name} (writable: "
                          f"{', '.join(w.name for w in _ENCODERS)})")
    block = block_layout(t)[0]
    if n_cols % block:
        raise ConfigError(f"row length {n_cols} is not a multiple of the {GGMLType(t).name} block size {block}")
    with np.errstate(over="ignore"):  # fp16 overflow is checked where it matters (_encode_f16)
        return encode(x).reshape(n_rows, -1)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n, 1) float32 -> (n, 2) uint8 little-endian fp16."""
    return v.astype("<f2").view(np.uint8)


def _reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    out = np.zeros_like(d)
    np.divide(np.float32(1), d, out=out, where=d != 0)
    return out


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf, exactly: trunc, then one step away from zero when the dropped fraction is >= 0.5."""
    whole = np.trunc(v)
    return whole + np.copysign(np.abs(v - whole) >= 0.5, v)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n_blocks, 32) uint8 values 0..15 -> (n_blocks, 16): byte j = q[j] | q[j+16] << 4."""
    return q[:, :16] | (q[:, 16:] << 4)


def _encode_q8_0(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # (n, 1)
    q = _round_half_away(blocks * _reciprocal_or_zero(d)).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)  # (n, 34)


def _encode_q4_0(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, BLOCK)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)  # (n, 1)
    d = signed_max / np.float32(-8)
    q = np.trunc(blocks * _reciprocal_or_zero(d) + np.float32(8.5)).astype(np.uint8)
    np.minimum(q, 15, out=q)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)  # (n, 18)


def _encode_q5_0(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, BLOCK)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)  # (n, 1)
    d = signed_max / np.float32(-16)
    q = np.trunc(blocks * _reciprocal_or_zero(d) + np.float32(16.5)).astype(np.uint8)
    np.minimum(q, 31, out=q)
    return np.concatenate([_f16_bytes(d), _fifth_bits(q), _pack_nibbles(q & 15)], axis=1)  # (n, 22)


def _encode_q5_1(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, BLOCK)
    low = blocks.min(axis=1, keepdims=True)
    d = (blocks.max(axis=1, keepdims=True) - low) / np.float32(31)
    q = np.trunc((blocks - low) * _reciprocal_or_zero(d) + np.float32(0.5)).astype(np.uint8)  # C: (uint8_t), no clamp
    return np.concatenate([_f16_bytes(d), _f16_bytes(low), _fifth_bits(q), _pack_nibbles(q & 15)], axis=1)  # (n, 24)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """(n_blocks, 32) uint8 -> (n_blocks, 4): little-endian uint32 qh, bit j = bit 4 of q[j]."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _encode_q4_1(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, BLOCK)
    low = blocks.min(axis=1, keepdims=True)
    d = (blocks.max(axis=1, keepdims=True) - low) / np.float32(15)
    q = np.trunc((blocks - low) * _reciprocal_or_zero(d) + np.float32(0.5)).astype(np.uint8)
    np.minimum(q, 15, out=q)
    return np.concatenate([_f16_bytes(d), _f16_bytes(low), _pack_nibbles(q)], axis=1)  # (n, 20)


def _encode_f16(x: np.ndarray) -> np.ndarray:
    half = x.astype("<f2")
    overflowed = np.isinf(half) & np.isfinite(x)
    if overflowed.any():
        raise ConfigError(f"value {x[overflowed][0]:g} is beyond the F16 range (+-65504); use bf16 or f32")
    return half.view(np.uint8)


_ENCODERS = {
    GGMLType.F32: lambda x: x.astype("<f4").view(np.uint8),
    GGMLType.F16: _encode_f16,
    GGMLType.BF16: lambda x: to_bf16_bits(x).astype("<u2").view(np.uint8),
    GGMLType.Q8_0: _encode_q8_0,
    GGMLType.Q6_K: encode_q6_k,
    GGMLType.Q5_K: encode_q5_k,
    GGMLType.Q5_1: _encode_q5_1,
    GGMLType.Q5_0: _encode_q5_0,
    GGMLType.Q4_K: encode_q4_k,
    GGMLType.Q4_1: _encode_q4_1,
    GGMLType.Q4_0: _encode_q4_0,
}
