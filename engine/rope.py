"""Rotary position embedding: inverse frequencies under each scaling, cos/sin tables, rotation.

Convention inside the engine: HF "rotate-half" on the first ``rope.dim`` dims of a head,
pairing dim t with dim t + rope.dim/2 (t < rope.dim/2); dims beyond ``rope.dim`` pass through.

Scalings (``RopeConfig.scaling``), all expressed on the inverse frequencies
inv_freq[t] = theta ** (-2t/dim), t = 0..dim/2-1:

- none:    unchanged
- linear:  position interpolation, inv_freq / factor
- ntk:     static NTK-aware base change, theta' = theta * factor ** (dim/(dim-2))
- dynamic: HF dynamic NTK, theta' = theta * (factor*context/original - (factor-1)) ** (dim/(dim-2))
           when the context in use exceeds ``original_context``, else unchanged
- yarn:    HF/YaRN: per-frequency mix of interpolation (inv_freq/factor) and extrapolation
           (inv_freq) along a linear ramp between the dims that make beta_fast and beta_slow
           rotations over ``original_context``; cos and sin are multiplied by ``attention_factor``
- llama3:  HF llama3 rule: wavelengths above original/low_freq_factor are divided by factor,
           below original/high_freq_factor kept, smoothly interpolated in between

``freq_factors`` (the GGUF ``rope_freqs`` tensor) divide the base frequencies before any
scaling, as llama.cpp's ``ggml_rope_ext`` does. They already encode the llama3 rule, so the
combination with ``scaling="llama3"`` is refused.
"""
from __future__ import annotations

import math

import numpy as np

from .config import RopeConfig
from .errors import ConfigError, ContextError


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """theta ** (-2t/dim) for t = 0..dim/2-1, float64."""
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _ntk_theta(rope: RopeConfig, context: int | None) -> float:
    """The RoPE base after static or dynamic NTK scaling (unchanged for the other scalings)."""
    if rope.scaling not in ("ntk", "dynamic"):
        return rope.theta
    if rope.dim <= 2:
        raise ConfigError(f"NTK RoPE scaling needs a RoPE dimension above 2, got {rope.dim}")
    exponent = rope.dim / (rope.dim - 2)
    if rope.scaling == "ntk":
        return rope.theta * rope.factor ** exponent
    if rope.scaling == "dynamic" and context is not None and context > rope.original_context:
        return rope.theta * (rope.factor * context / rope.original_context - (rope.factor - 1)) ** exponent
    return rope.theta


def _yarn_inv_freq(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    """Mix interpolated and extrapolated frequencies along the YaRN ramp (HF, truncate=True)."""
    dim = rope.dim

    def correction_dim(n_rotations: float) -> float:
        # dimension whose wavelength fits n_rotations times into the original context
        return dim * math.log(rope.original_context / (n_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as HF does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
    return inv_freq / rope.factor * ramp + inv_freq * extrapolation_weight


def _llama3_inv_freq(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    """HF llama3 frequency rule."""
    low_freq_wavelen = rope.original_context / rope.llama3_low_freq_factor
    high_freq_wavelen = rope.original_context / rope.llama3_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_context / wavelen - rope.llama3_low_freq_factor) / (
        rope.llama3_high_freq_factor - rope.llama3_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def inv_freq(rope: RopeConfig, context: int | None = None) -> np.ndarray:
    """Inverse frequencies, (rope.dim//2,) float64. ``context``: the context length in use (dynamic NTK)."""
    if rope.freq_factors is not None and rope.scaling == "llama3":
        raise ConfigError("rope_freqs (frequency factors) already encode llama3 scaling; "
                          "use RoPE scaling 'none' with them, not 'llama3'")
    if context is not None and context <= 0:
        raise ConfigError(f"RoPE context length must be positive, got {context}")
    freqs = _base_inv_freq(_ntk_theta(rope, context), rope.dim)  # (dim/2,)
    if rope.freq_factors is not None:
        freqs = freqs / np.asarray(rope.freq_factors, dtype=np.float64)
    if rope.scaling == "linear":
        return freqs / rope.factor
    if rope.scaling == "yarn":
        return _yarn_inv_freq(rope, freqs)
    if rope.scaling == "llama3":
        return _llama3_inv_freq(rope, freqs)
    return freqs


def attention_factor(rope: RopeConfig) -> float:
    """Multiplier of cos and sin: YaRN's mscale (0.1*ln(factor)+1, or yarn_attn_factor); 1.0 otherwise."""
    if rope.scaling != "yarn":
        return 1.0
    if rope.yarn_attn_factor is not None:
        return float(rope.yarn_attn_factor)
    return 1.0 if rope.factor <= 1 else 0.1 * math.log(rope.factor) + 1.0


class RotaryTable:
    """cos/sin for positions 0..n_positions-1.

    cos, sin: (n_positions, rope.dim//2) float32, computed in float64 (angles p * inv_freq),
    already multiplied by ``attention_factor(rope)``.
    """

    def __init__(self, rope: RopeConfig, n_positions: int, context: int | None = None):
        if n_positions <= 0:
            raise ConfigError(f"rotary table needs a positive number of positions, got {n_positions}")
        self.rope = rope
        self.n_positions = int(n_positions)
        self.inv_freq = inv_freq(rope, context)  # (dim/2,) float64
        angles = np.arange(self.n_positions, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        mscale = attention_factor(rope)
        self.cos = (np.cos(angles) * mscale).astype(np.float32)  # (n_positions, dim/2)
        self.sin = (np.sin(angles) * mscale).astype(np.float32)  # (n_positions, dim/2)

    def rotate(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate x (n, H, head_dim) at positions (n,): a new array of x's dtype.

        Math in float32 for float16/float32 input, float64 for float64 input.
        """
        positions = checked_positions(x, positions, self.rope.dim, self.n_positions)
        return rotate_with(x, self.cos[positions], self.sin[positions], self.rope.dim)


def checked_positions(x, positions, rope_dim: int, n_positions: int) -> np.ndarray:
    """positions (n,) host integers for rotating x (n, H, head_dim >= rope_dim) with a table of n_positions;
    ConfigError / ContextError when they do not fit."""
    if x.ndim != 3 or x.shape[2] < rope_dim:
        raise ConfigError(f"rotate expects x of shape (n, heads, head_dim >= {rope_dim}), got {x.shape}")
    positions = np.asarray(positions)
    if positions.dtype.kind not in "iu":
        raise ConfigError(f"rotate: positions must be integers, got dtype {positions.dtype}")
    if positions.shape != (x.shape[0],):
        raise ConfigError(f"rotate: positions shape {positions.shape} does not match x's {x.shape[0]} rows")
    outside = (positions < 0) | (positions >= n_positions)
    if outside.any():
        raise ContextError(f"RoPE position {int(positions[outside][0])} is outside the rotary table "
                           f"(0..{n_positions - 1})")
    return positions


def rotate_with(x, cos, sin, rope_dim: int):
    """Rotate x (n, H, head_dim) by the rows cos, sin (n, rope_dim/2) float32 of its positions: a new array of
    x's dtype, numpy or CuPy alike (the arrays' own methods only). Math in float32 (float64 for float64 x)."""
    half = rope_dim // 2
    compute = np.result_type(x.dtype, np.float32)
    cos = cos.astype(compute)[:, None, :]  # (n, 1, dim/2)
    sin = sin.astype(compute)[:, None, :]
    x1 = x[..., :half].astype(compute)  # (n, H, dim/2)
    x2 = x[..., half:rope_dim].astype(compute)
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rope_dim] = x2 * cos + x1 * sin
    return out
