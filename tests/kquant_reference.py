"""A slow, plain reference for the K-quant encoders (tests only): engine/convert/kquants.py as it was
before it was made fast, one numpy operation per statement of ggml-quants.c's quantize_row_q{4,5,6}_K_ref,
every sub-block of the input at once, in float32, sums as explicit left-to-right loops over rows.
tests/test_kquants.py checks it against llama.cpp's bytes (tests/golden/kquants.npz) and then the
engine's encoders against it on shapes and values the golden rows do not cover."""
from __future__ import annotations

import numpy as np

from engine.weights.quant import QK_K

GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: a group below this absmax is all zero
_F32 = np.float32


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """x: float32 with a multiple of 256 elements -> (n_blocks, 144) uint8: d, dmin, scales[12], qs[128]."""
    d, dmin, sc, mn, q = _encode_affine(x, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)  # q (n, 8, 32)
    qs = q[:, 0::2] | (q[:, 1::2] << 4)  # (n, 4, 32): group g = sub-blocks 2g (low nibble), 2g+1 (high)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qs.reshape(-1, 128)], axis=1)


def encode_q5_k(x: np.ndarray) -> np.ndarray:
    """x: float32 with a multiple of 256 elements -> (n_blocks, 176) uint8: d, dmin, scales[12], qh[32], qs[128]."""
    d, dmin, sc, mn, q = _encode_affine(x, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)  # q (n, 8, 32) 0..31
    low = q & 15
    qs = low[:, 0::2] | (low[:, 1::2] << 4)
    qh = np.bitwise_or.reduce((q >> 4) << _SUB_BLOCK_BITS, axis=1)  # (n, 32): bit s = fifth bit of sub-block s
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qh, qs.reshape(-1, 128)],
                          axis=1)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """x: float32 with a multiple of 256 elements -> (n_blocks, 210) uint8: ql[128], qh[64], scales[16], d."""
    xs = _sub_blocks(x, 16)  # (16, n_sub)
    scales, L = _make_qx_quants(xs, nmax=32)  # (n_sub,), (16, n_sub) values 0..63
    scales = scales.reshape(-1, 16)  # (n, 16)
    n = scales.shape[0]
    max_scale = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)  # (n, 1) first largest
    zero = np.abs(max_scale)[:, 0] < GROUP_MAX_EPS  # such a super-block is written as zero bytes
    iscale = _F32(-128) / np.where(zero[:, None], _F32(1), max_scale)
    d = _f16(_F32(1) / iscale)  # (n, 1)
    sc = np.minimum(127, _nearest_int(iscale * scales)).astype(np.int8)  # (n, 16)
    d_sub = (d.astype(np.float32) * sc).reshape(-1)  # (n_sub,)
    redo = d_sub != 0  # a zero scale keeps make_qx_quants' quants, as the C code does
    requantized = np.clip(_nearest_int(xs / np.where(redo, d_sub, _F32(1))), -32, 31) + 32
    q = np.where(redo, requantized, L).astype(np.uint8).T.reshape(n, 2, 4, 32)  # (block, half, quarter, l)
    ql = (q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)  # (n, 2, 2, 32): ql[l], ql[l+32] of each half
    qh = np.bitwise_or.reduce((q >> 4) << _Q6_HIGH_SHIFTS, axis=2)  # (n, 2, 32)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)
    out[zero] = 0
    return out


_SUB_BLOCK_BITS = np.arange(8, dtype=np.uint8)[None, :, None]
_Q6_HIGH_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]


# ---------------------------------------------------------------------------------------
# Q4_K / Q5_K: make_qkx2_quants per sub-block, 6-bit scales and mins, requantization


def _encode_affine(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x -> fp16 d, dmin (n, 1); 6-bit sc, mn (n, 8) uint8; quants q (n, 8, 32) uint8 0..nmax."""
    xs = _sub_blocks(x, 32)  # (32, n_sub)
    av_x = np.sqrt(_running_sum(xs * xs) / _F32(32))
    scales, mins, L = _make_qkx2_quants(xs, av_x + np.abs(xs), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)  # (n, 8)
    n = scales.shape[0]
    max_scale = np.maximum(scales.max(axis=1, keepdims=True), 0)  # (n, 1); C starts the max at 0
    max_min = np.maximum(mins.max(axis=1, keepdims=True), 0)
    sc = _six_bit_levels(scales, max_scale)
    mn = _six_bit_levels(mins, max_min)
    d, dmin = _f16(max_scale / _F32(63)), _f16(max_min / _F32(63))
    d_sub = (d.astype(np.float32) * sc).reshape(-1)  # (n_sub,)
    dm_sub = (dmin.astype(np.float32) * mn).reshape(-1)
    redo = d_sub != 0  # a zero scale keeps the search's quants, as the C code does
    requantized = np.clip(_nearest_int((xs + dm_sub) / np.where(redo, d_sub, _F32(1))), 0, nmax)
    q = np.where(redo, requantized, L).astype(np.uint8).T.reshape(n, 8, 32)
    return d, dmin, sc, mn, q


def _six_bit_levels(values: np.ndarray, largest: np.ndarray) -> np.ndarray:
    """(n, 8) float32 scales or mins, (n, 1) their max (>= 0) -> (n, 8) uint8 levels 0..63."""
    inverse = np.where(largest > 0, _F32(63) / np.where(largest > 0, largest, _F32(1)), _F32(0))
    return np.minimum(_nearest_int(inverse * values).astype(np.uint8), 63)  # C: uint8_t (wraps), then MIN


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit scales and mins -> (n, 12) bytes, the inverse of ggml's get_scale_min_k4."""
    packed = np.empty((sc.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return packed


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants (use_mad false) on every sub-block: x, w (k, m) float32 ->
    scale (m,), the_min (m,) (>= 0: x ~ scale * L - the_min), L (k, m) int32 in 0..nmax."""
    lo = np.minimum(x.min(axis=0), 0)  # (m,) C: if (min > 0) min = 0
    hi = x.max(axis=0)
    flat = hi == lo  # L = 0, scale 0, the_min = -min
    sum_w = _running_sum(w)
    sum_x = _running_sum(w * x)
    iscale = _F32(nmax) / np.where(flat, _F32(1), hi - lo)
    scale = _F32(1) / iscale
    L = _quants(iscale * (x - lo), 0, nmax)  # (k, m) float32 integers
    best_error = _running_sum(w * _squared(scale * L + lo - x))
    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / np.where(flat, _F32(1), hi - lo)
        lf = _quants(iscale * (x - lo), 0, nmax)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _running_sum(wl), _running_sum(wl * lf), _running_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        solvable = D > 0
        D = np.where(solvable, D, _F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive_min = this_min > 0
        this_min = np.where(positive_min, _F32(0), this_min)
        this_scale = np.where(positive_min, sum_xl / np.where(positive_min, sum_l2, _F32(1)), this_scale)
        cur_error = _running_sum(w * _squared(this_scale * lf + this_min - x))
        better = solvable & (cur_error < best_error) & ~flat
        np.copyto(L, lf, where=better)
        np.copyto(best_error, cur_error, where=better)
        np.copyto(scale, this_scale, where=better)
        np.copyto(lo, this_min, where=better)  # the C code's min: the next candidate starts from it
    return np.where(flat, _F32(0), scale), -lo, np.where(flat, 0, L).astype(np.int32)


# ---------------------------------------------------------------------------------------
# Q6_K: make_qx_quants (rmse_type 1, no importance weights) per sub-block


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) on every sub-block: x (k, m) float32 ->
    scale (m,) (x ~ scale * (L - nmax)), L (k, m) int32 in 0..2*nmax-1 (all 0 for an all-zero sub-block)."""
    largest = np.take_along_axis(x, np.abs(x).argmax(axis=0)[None, :], axis=0)[0]  # (m,) first of largest |x|
    zero = np.abs(largest) < GROUP_MAX_EPS
    largest = np.where(zero, _F32(1), largest)
    w = x * x
    wx = w * x

    def candidate(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lf = _quants(iscale * x, -nmax, nmax - 1)
        return lf, _running_sum(wx * lf), _running_sum(w * lf * lf)

    l, sumlx, suml2 = candidate(_F32(-nmax) / largest)
    L = l + nmax
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F32(1)), _F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = candidate(-(_F32(nmax) + _F32(0.1) * _F32(step)) / largest)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        np.copyto(L, l + nmax, where=better)
        np.copyto(scale, sumlx / np.where(better, suml2, _F32(1)), where=better)
        np.copyto(best, scale * sumlx, where=better)
    return np.where(zero, _F32(0), scale), np.where(zero, 0, L).astype(np.int32)


# ---------------------------------------------------------------------------------------
# shared helpers


def _sub_blocks(x: np.ndarray, size: int) -> np.ndarray:
    """float32 values (a multiple of QK_K of them) -> (size, n_sub): column s = sub-block s."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    assert flat.size % QK_K == 0, flat.size
    return np.ascontiguousarray(flat.reshape(-1, size).T)


def _running_sum(terms: np.ndarray) -> np.ndarray:
    """(k, m) -> (m,): terms[0] + terms[1] + ... + terms[k-1], added in that order in float32."""
    total = terms[0].copy()
    for row in terms[1:]:
        total += row
    return total


def _squared(v: np.ndarray) -> np.ndarray:
    return v * v


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: float32 -> int32 through the 1.5 * 2^23 trick (round half to even below 2^22)."""
    bits = np.add(v, _F32(12582912), dtype=np.float32).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def _quants(v: np.ndarray, low: int, high: int) -> np.ndarray:
    """nearest_int(v) clamped to [low, high], as float32 (the C code's int L converted back to float)."""
    q = _nearest_int(v)
    np.clip(q, low, high, out=q)
    return q.astype(np.float32)


def _f16(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 (round to nearest even, GGML_FP32_TO_FP16)."""
    return v.astype(np.float16)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n, 1) fp16 -> (n, 2) uint8 little-endian."""
    return np.ascontiguousarray(v.astype("<f2")).view(np.uint8)
