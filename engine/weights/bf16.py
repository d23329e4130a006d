"""bfloat16 as 16-bit patterns (neither numpy nor CuPy has a bfloat16 dtype), for numpy or CuPy arrays (xp).

    to_bf16_bits(x)      float -> uint16 bits, rounded to nearest even (as ggml and torch round); NaN stays a
                         quiet NaN (its payload dropped)
    from_bf16_bits(b)    uint16 bits -> float32, exact (into `out` when given)
"""
from __future__ import annotations

import numpy as np


def to_bf16_bits(x, xp=np):
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    bits = xp.where(is_nan, (bits & 0xFFFF0000) | 0x00400000, bits)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(xp.uint16)


def from_bf16_bits(bits, xp=np, out=None):
    """bits -> float32; into `out` (float32, bits' shape) when given, without a temporary."""
    if out is None:
        return (xp.asarray(bits).astype(xp.uint32) << 16).view(xp.float32)
    widened = out.view(xp.uint32)
    xp.copyto(widened, bits)
    widened <<= 16
    return out
