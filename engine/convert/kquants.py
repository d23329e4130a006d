"""float32 rows -> K-quant bytes (Q4_K, Q5_K, Q6_K): llama.cpp's reference quantizers, vectorized.

Each follows ggml-quants.c (``quantize_row_q4_K_ref`` / ``q5_K_ref`` / ``q6_K_ref``, the path
llama-quantize takes without an importance matrix) operation by operation in float32, so the
bytes equal llama.cpp's on an x86-64 build (tests/golden/kquants.npz, written by
tools/golden_kquants.py):

    Q4_K / Q5_K  super-block of 256 = 8 sub-blocks of 32; per sub-block an affine fit
                 x ~ scale * L - min (``make_qkx2_quants``: weights sqrt(mean x^2) + |x|, a search
                 of nstep+1 candidate scales (nmax + rmin + rdelta*is) / (max - min), each refined by
                 weighted least squares); scales and mins quantized to 6 bits against the block's
                 largest (fp16 d = max_scale/63, dmin = max_min/63), then L recomputed with them.
    Q6_K         super-block of 256 = 16 sub-blocks of 16; per sub-block a signed scale
                 (``make_qx_quants``, rmse_type 1: weights x^2, 18 candidate scales -(32 + 0.1*is)/max),
                 scales quantized to int8 against the largest (fp16 d = max_scale/-128), L recomputed.

Vectorization: the super-blocks are encoded a pass at a time (AFFINE_/Q6_K_SUPER_BLOCKS_PER_PASS),
every sub-block of a pass at once, in scratch arrays reused across candidates and laid out (elements
of a sub-block, sub-blocks), so that each per-sub-block sum is ``np.add.reduce`` over rows: a
left-to-right running sum (the C loops' order; numpy's pairwise ``sum`` along a contiguous axis
would round differently). The C code's data-dependent updates (a better candidate replaces scale
and min -- and the min feeds the next candidate) are masked updates (``putmask``); the winning
candidate's iscale (and min) is carried instead of its quants, which are rounded from it once at the
end with the same float32 operations. ``nearest_int`` is ggml's bit trick, which is round half to
even (``np.rint``) below 2^22: the searches use ``np.rint`` where a bound proves every value below
2^21 (always for Q6_K: |iscale * x| <= 33), else the bit trick, whose results beyond are not
rounding. Fits computed for sub-blocks where the C code would not use them (a singular system, a
zero sum) are garbage that is never taken, so division warnings are silenced. Bit-exactness
assumes the reference is compiled without FMA contraction of these loops (x86-64 ggml-base is; an
aarch64 build may contract and then differ in the last bit of a sum, hence occasionally in a quant).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..weights.quant import QK_K

GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: a group below this absmax is all zero
# Super-blocks encoded at once (measured best on a 2-core EPYC). Q4_K / Q5_K's search makes ~30 numpy calls
# on (n_sub,) arrays per candidate scale, whose overhead large passes amortize ((32, 8192) float32 working
# arrays, 1 MiB each); Q6_K's makes few, and its (16, 2048) arrays (128 KiB) stay in L2.
AFFINE_SUPER_BLOCKS_PER_PASS = 1024
Q6_K_SUPER_BLOCKS_PER_PASS = 128
_F32 = np.float32


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """x: float32 with a multiple of 256 elements -> (n_blocks, 144) uint8: d, dmin, scales[12], qs[128]."""
    return _in_passes(x, 144, _q4_k_pass, AFFINE_SUPER_BLOCKS_PER_PASS)


def encode_q5_k(x: np.ndarray) -> np.ndarray:
    """x: float32 with a multiple of 256 elements -> (n_blocks, 176) uint8: d, dmin, scales[12], qh[32], qs[128]."""
    return _in_passes(x, 176, _q5_k_pass, AFFINE_SUPER_BLOCKS_PER_PASS)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """x: float32 with a multiple of 256 elements -> (n_blocks, 210) uint8: ql[128], qh[64], scales[16], d."""
    return _in_passes(x, 210, _q6_k_pass, Q6_K_SUPER_BLOCKS_PER_PASS)


def _in_passes(x: np.ndarray, block_bytes: int, encode_pass: Callable[[np.ndarray], np.ndarray],
               per_pass: int) -> np.ndarray:
    """Encode the super-blocks of x per_pass at a time (each is encoded independently of the others)."""
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK_K)  # (n, 256)
    out = np.empty((blocks.shape[0], block_bytes), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):  # as in C, fits are computed where they are not taken
        for start in range(0, blocks.shape[0], per_pass):
            out[start:start + per_pass] = encode_pass(blocks[start:start + per_pass])
    return out


def _q4_k_pass(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) uint8."""
    d, dmin, sc, mn, q = _encode_affine(blocks, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)  # q (n, 8, 32)
    qs = q[:, 0::2] | (q[:, 1::2] << 4)  # (n, 4, 32): group g = sub-blocks 2g (low nibble), 2g+1 (high)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qs.reshape(-1, 128)], axis=1)


def _q5_k_pass(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 176) uint8."""
    d, dmin, sc, mn, q = _encode_affine(blocks, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)  # q (n, 8, 32) 0..31
    low = q & 15
    qs = low[:, 0::2] | (low[:, 1::2] << 4)
    qh = np.bitwise_or.reduce((q >> 4) << _SUB_BLOCK_BITS, axis=1)  # (n, 32): bit s = fifth bit of sub-block s
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qh, qs.reshape(-1, 128)],
                          axis=1)


def _q6_k_pass(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) uint8."""
    subs = blocks.reshape(-1, 16)  # (n_sub, 16)
    largest = np.take_along_axis(subs, np.abs(subs).argmax(axis=1)[:, None], axis=1)[:, 0]  # (n_sub,) first max |x|
    xs = _sub_blocks(blocks, 16)  # (16, n_sub)
    scales, L = _make_qx_quants(xs, largest, nmax=32)  # (n_sub,), (16, n_sub) values 0..63
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


def _encode_affine(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(n, 256) float32 -> fp16 d, dmin (n, 1); 6-bit sc, mn (n, 8) uint8; quants q (n, 8, 32) uint8 0..nmax."""
    xs = _sub_blocks(blocks, 32)  # (32, n_sub)
    av_x = np.sqrt(_column_sums(xs * xs) / _F32(32))
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
    scale (m,), the_min (m,) (>= 0: x ~ scale * L - the_min), L (k, m) int32 in 0..nmax.

    L is not carried through the search: the winning candidate's iscale and min are, and L is
    rounded from them once at the end (the same float32 operations, so the same quants)."""
    x_min = x.min(axis=0)
    lo = np.minimum(x_min, 0)  # (m,) C: if (min > 0) min = 0; later the best candidate's min
    hi = x.max(axis=0)
    flat = hi == lo  # L = 0 (x - lo is 0), scale 0, the_min = -min
    searched = ~flat
    flat_one = flat.astype(np.float32)  # a flat sub-block's range is taken as 1 (it is 0; the C code returns early)
    sum_w = _column_sums(w)
    sum_x = _column_sums(w * x)
    lf, wl, work = np.empty_like(x), np.empty_like(x), np.empty_like(x)  # (k, m) scratch

    def span(origin: np.ndarray) -> np.ndarray:
        """max - min of the C code, for a min of origin (1 for flat sub-blocks)."""
        return (hi - origin) + flat_one

    def quants(iscale: np.ndarray, origin: np.ndarray, origin_span: np.ndarray) -> np.ndarray:
        """lf = clamp(nearest_int(iscale * (x - origin)), 0, nmax) as float32 (the C code's int L made float)."""
        np.subtract(x, origin, out=lf)
        np.multiply(lf, iscale, out=lf)
        # float32 rounding is monotonic: |iscale * (x - origin)| <= |iscale| * max(hi - origin, origin - x_min)
        reach = np.max(np.abs(iscale) * np.maximum(origin_span, origin - x_min))
        _nearest_int_values(lf, exact=not reach < _RINT_LIMIT)  # NaN: exact
        return np.clip(lf, 0, nmax, out=lf)

    def weighted_error(scale: np.ndarray, the_min: np.ndarray) -> np.ndarray:
        """sum over the sub-block of w * (scale * L + min - x)^2, L = lf."""
        np.multiply(lf, scale, out=work)
        np.add(work, the_min, out=work)
        np.subtract(work, x, out=work)
        np.square(work, out=work)
        np.multiply(work, w, out=work)
        return _column_sums(work)

    lo_span = span(lo)
    best_iscale = _F32(nmax) / lo_span
    best_lo = lo.copy()  # the min the best candidate's quants were rounded from
    scale = _F32(1) / best_iscale
    quants(best_iscale, lo, lo_span)
    best_error = weighted_error(scale, lo)
    for step in range(nstep + 1):
        lo_span = span(lo)
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / lo_span
        quants(iscale, lo, lo_span)
        np.multiply(w, lf, out=wl)
        sum_l = _column_sums(wl)
        sum_l2 = _column_sums(np.multiply(wl, lf, out=work))
        sum_xl = _column_sums(np.multiply(wl, x, out=work))
        D = sum_w * sum_l2 - sum_l * sum_l
        solvable = D > 0  # elsewhere the fit below is garbage, never taken
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive_min = this_min > 0
        np.putmask(this_min, positive_min, _F32(0))
        np.putmask(this_scale, positive_min, sum_xl / sum_l2)
        cur_error = weighted_error(this_scale, this_min)
        better = solvable & (cur_error < best_error) & searched
        np.putmask(best_error, better, cur_error)
        np.putmask(scale, better, this_scale)
        np.putmask(best_iscale, better, iscale)
        np.putmask(best_lo, better, lo)
        np.putmask(lo, better, this_min)  # the C code's min: the next candidate starts from it
    L = quants(best_iscale, best_lo, span(best_lo))
    return np.where(flat, _F32(0), scale), -lo, L.astype(np.int32)


# ---------------------------------------------------------------------------------------
# Q6_K: make_qx_quants (rmse_type 1, no importance weights) per sub-block


def _make_qx_quants(x: np.ndarray, largest: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) on every sub-block: x (k, m) float32, largest (m,)
    its first value of largest magnitude -> scale (m,) (x ~ scale * (L - nmax)), L (k, m) int32 in 0..2*nmax-1
    (all 0 for an all-zero sub-block).

    As in _make_qkx2_quants, the winning iscale is carried and L rounded from it once at the end."""
    zero = np.abs(largest) < GROUP_MAX_EPS
    largest = np.where(zero, _F32(1), largest)
    w = x * x
    wx = w * x
    lf, work = np.empty_like(x), np.empty_like(x)  # (k, m) scratch

    def quants(iscale: np.ndarray) -> np.ndarray:
        """lf = clamp(nearest_int(iscale * x), -nmax, nmax - 1) as float32; |iscale * x| <= nmax + 1, so rint."""
        np.multiply(x, iscale, out=lf)
        np.rint(lf, out=lf)
        return np.clip(lf, -nmax, nmax - 1, out=lf)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """sum of w*x*l and of w*l*l over each sub-block, l = quants(iscale)."""
        quants(iscale)
        sumlx = _column_sums(np.multiply(wx, lf, out=work))
        np.multiply(w, lf, out=work)
        np.multiply(work, lf, out=work)
        return sumlx, _column_sums(work)

    best_iscale = _F32(-nmax) / largest
    sumlx, suml2 = sums(best_iscale)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F32(1)), _F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F32(nmax) + _F32(0.1) * _F32(step)) / largest
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        np.putmask(best_iscale, better, iscale)
        np.putmask(scale, better, sumlx / suml2)  # garbage (not taken) where suml2 is 0
        np.putmask(best, better, scale * sumlx)
    L = quants(best_iscale) + _F32(nmax)
    return np.where(zero, _F32(0), scale), np.where(zero, 0, L.astype(np.int32))


# ---------------------------------------------------------------------------------------
# shared helpers


def _sub_blocks(blocks: np.ndarray, size: int) -> np.ndarray:
    """(n, 256) float32 super-blocks -> (size, n_sub): column s = sub-block s."""
    return np.ascontiguousarray(blocks.reshape(-1, size).T)


def _column_sums(terms: np.ndarray) -> np.ndarray:
    """(k, m) C-contiguous, m > 1 -> (m,): terms[0] + terms[1] + ... + terms[k-1], added in that order in
    float32 (the C loops' order). numpy reduces a non-contiguous axis row by row into the result, so this
    is a plain running sum; its pairwise summation applies only along a contiguous axis (m == 1)."""
    return np.add.reduce(terms, axis=0)


_RINT_LIMIT = _F32(1 << 21)  # below this magnitude ggml's nearest_int is round half to even (np.rint)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: float32 -> int32 through the 1.5 * 2^23 trick (round half to even below 2^22)."""
    bits = np.add(v, _F32(12582912), dtype=np.float32).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def _nearest_int_values(v: np.ndarray, exact: bool) -> None:
    """v (float32) <- nearest_int(v) as float32, in place: np.rint where every |v| < _RINT_LIMIT is known,
    else (``exact``) ggml's bit trick, whose results beyond 2^22 are not rounding."""
    if exact:
        np.copyto(v, _nearest_int(v), casting="unsafe")
    else:
        np.rint(v, out=v)


def _f16(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 (round to nearest even, GGML_FP32_TO_FP16)."""
    return v.astype(np.float16)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n, 1) fp16 -> (n, 2) uint8 little-endian."""
    return np.ascontiguousarray(v.astype("<f2")).view(np.uint8)
