"""Kernel choice and launch geometry of the one-token matrix products (kernels/gemv.cu).

    gemv(x, m, dtype)                          y = m @ x (act_t, or fp32 for an output head)
    gemv_add(a, m, x, dtype, staged, prenorm)  x += m @ a (fp32 residual, in place); staged: a already quantized;
                                               prenorm: also the next product's input (below)
    qkv(x, norm, eps, wq, wk, wv, biases, ..., prenormed)  rmsnorm + Q/K/V (+ biases) + key rotation + cache store
    gate_up(x, norm, eps, wg, wu, out, dtype, out_staged, prenormed)  rmsnorm + silu(gate) * up (+ out quantized)
    quantize_input(x, staged, dtype)           x quantized as the int8 GEMVs stage it (tests, dev/cuda)
    head(x, norm, eps, m, logits, dtype, prenormed)  rmsnorm + output head (fp32 logits)

Arguments are device arrays and ``DeviceMatrix``es; each call is one launch on the current stream
(capturable in a CUDA graph), a dependent one while pdl.ENABLED (pdl.py: each gemv.cu kernel asks for its
first weight rows, then waits for the kernel before it). Geometry: 256 threads a block, one warp per task
(row or row pair); each block takes ``tasks_per_block`` tasks (a multiple of 8; qkv: as many rows, its key pairs
counted twice, ``qkv_blocks``) so that the grid is about BLOCKS_PER_SM blocks per SM: every block stages (RMSNorm +)
quantizes its input once, so fewer, fuller blocks stage less, while one wave of them keeps every SM streaming
weights. Shared memory comes from the input width (``stage_bytes``); above 48 KB the kernel opts in to more, up to
the device's limit.

Numerics. Quantized weights (``INT8_TYPES``) read the input quantized to int8 per block of 32
(llama.cpp's q8_1: d = max|x|/127, q = rint(x/d), plus the block's float sum); ``reference`` is the
numpy model of that arithmetic (the tests compare the kernels with it tightly, and with the float
product at the quantization's own error). Float weights (F32, F16, BF16) read the input in fp32.

Staged inputs. A kernel whose output feeds an int8 GEMV can quantize it in its epilogue (common.cuh
store_q8_block: int8 values, then fp32 scales and sums per 32, ``staged_bytes``); the GEMV then copies those in
instead of quantizing per block: the same values (the kernels compute them as stage does), without the
staging's latency in every block (dev/cuda/NOTES.md v5: the 8B down product 30 -> 20 us). The decode step stages
the output projection's input in dca_combine and the down projection's in gate_up.

Prenormed inputs (NOTES.md v7). The RMSNorm-fused products' input rmsnorm(x) * w needs the whole residual's norm,
known only once the gemv_add writing x has finished; but q8 is scale-invariant, so that gemv_add (``Prenorm``)
quantizes u = x * w (fp32, w the next norm's weight) in its epilogue and writes each block's sum of x^2, and the
consumer (``Prenormed``) scales the block scales and sums by rsqrt(sum / d + eps). The int8 values are those of the
composed path's act_t(x * inv * w) but where act_t's rounding crosses a .5 boundary (``prenorm_outputs`` /
``prenormed_q8``: the numpy model of both ends). Where a 32-row group spans 2 blocks (8B: 16 rows a block), or 4
in a grid smaller than the SM count (SmolLM2: 8), those blocks are launched as one thread block cluster on Hopper
(``prenorm_cluster``, NOTES.md v22): the group's last block quantizes it after a cluster barrier, instead of a fence,
an atomic count and a re-read through L2 (arrivals).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from ...errors import DeviceError
from ...weights.quant import GGMLType, block_layout, dequantize
from . import pdl
from .kernels import function, per_type

THREADS = 256  # gemv.cu GEMV_THREADS
WARPS = THREADS // 32
# blocks per SM the grid aims at: measured best for a Llama-3-8B step's GEMVs on the H200 (dev/cuda/gemv.py:
# 249 us at 2, 261 at 4, 272 at 8, 290 at 1). gemv.cu's kernels are bounded for it (GEMV_MIN_BLOCKS: up to 128
# registers a thread, so more weight loads in flight a warp; dev/cuda/NOTES.md v15)
BLOCKS_PER_SM = 2
DEFAULT_SHARED = 48 * 1024  # dynamic shared memory a launch gets without opting in
INT8_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q6_K)
Q8_BLOCK = 32


def stage_bytes(ggml_type: GGMLType, cols: int) -> int:
    """Shared memory of a staged input of `cols` values: int8 values + fp32 scale and sum per 32, or fp32."""
    return cols + cols // 4 if ggml_type in INT8_TYPES else 4 * cols


@functools.cache
def _device_limits() -> tuple[int, int]:
    """(SM count, largest opt-in dynamic shared memory per block) of the current device."""
    import cupy as cp

    attributes = cp.cuda.Device().attributes
    return attributes["MultiProcessorCount"], attributes["MaxSharedMemoryPerBlockOptin"]


def tasks_per_block(n_tasks: int, blocks_per_sm: int | None = None, multiple: int = WARPS) -> int:
    """Tasks of one block: a multiple of `multiple` (the warps, or the 32 rows of a staged block), so that the grid
    is about blocks_per_sm (default BLOCKS_PER_SM) blocks per SM."""
    sms, _ = _device_limits()
    per_block = -(-n_tasks // (sms * (blocks_per_sm or BLOCKS_PER_SM)))
    return max(multiple, -(-per_block // multiple) * multiple)


def staged_bytes(n: int) -> int:
    """Bytes of a staged input of n values (n % 32 == 0): int8 values, fp32 scale and sum per 32."""
    return n + n // 4


# id of a kernel's Function (one per build and GPU, kept by kernels.function's cache) -> dynamic shared memory allowed
_opted_in: dict[int, int] = {}
INSTANCE_MACRO = "GEMV_KERNELS"  # gemv.cu's kernels, instantiated per weight type


def _launch(op: str, m, cols: int, n_tasks: int, args: tuple, dtype: str, per_block: int | None,
            cluster: int = 1, blocks: int | None = None) -> None:
    """Launch gemv.cu's `op` kernel for m's weight type (the build of `dtype`) over n_tasks tasks, staging `cols`
    inputs; its blocks in clusters of `cluster` (pdl.launch); `blocks` where the kernel divides its tasks otherwise
    than per_block a block."""
    kernel = f"{op}_{m.suffix}"
    fn = function("gemv", kernel, dtype, instance=per_type(INSTANCE_MACRO, m.suffix))
    shared = stage_bytes(m.ggml_type, cols)
    if shared > DEFAULT_SHARED and _opted_in.get(id(fn), DEFAULT_SHARED) < shared:
        limit = _device_limits()[1]
        if shared > limit:
            raise DeviceError(f"{kernel}: an input of {cols} values needs {shared} bytes of shared memory, "
                              f"above this device's {limit}")
        fn.max_dynamic_shared_size_bytes = shared
        _opted_in[id(fn)] = shared
    per_block = per_block or tasks_per_block(n_tasks)
    blocks = blocks or -(-n_tasks // per_block)
    pdl.launch(fn, (blocks,), (THREADS,), args + (np.int32(per_block),), shared, cluster=cluster)


def _row_bytes(m) -> np.int64:
    return np.int64(m.data.shape[1])


def gemv(x, m, y, dtype: str, per_block: int | None = None) -> None:
    """y (rows,) = m @ x; x (cols,) act_t; y act_t, or fp32 when m is an output head (m.f32_out)."""
    _launch("gemv", m, m.cols, m.rows,
            (m.data, _row_bytes(m), x, np.int32(m.rows), np.int32(m.cols), y, np.int32(m.f32_out)), dtype, per_block)


NULL = np.uint64(0)  # a null pointer argument


class Prenorm(NamedTuple):
    """gemv_add's prenorm outputs for the next RMSNorm-fused product: staged (staged_bytes(rows) uint8) the updated
    residual times next_norm (rows,) fp32 quantized, partials (prenorm_blocks(rows) fp32) its blocks' sums of
    squares; arrivals (rows/32 uint32, zero, and zero again after every launch) counts the blocks of each 32-row group
    that spans blocks (the last to store its rows quantizes the group)."""
    next_norm: Any
    staged: Any
    partials: Any
    arrivals: Any


class Prenormed(NamedTuple):
    """The input of qkv / gate_up / head as gemv_add's prenorm epilogue left it: staged bytes and n_partials partial
    sums of squares."""
    staged: Any
    partials: Any
    n_partials: int


def prenorm_per_block(rows: int) -> int:
    """Rows of a gemv_add block that writes prenorm outputs: the plain launch's (a 32-row group may span blocks)."""
    return tasks_per_block(rows)


def prenorm_blocks(rows: int, per_block: int | None = None) -> int:
    """The partial sums a prenorm gemv_add over `rows` writes: its grid."""
    return -(-rows // (per_block or prenorm_per_block(rows)))


CLUSTER_HANDOFF = True  # off: every group across blocks handed off through arrivals (profile_decode --no-cluster)


def prenorm_cluster(per_block: int, blocks: int) -> int:
    """The blocks of a prenorm gemv_add's thread block cluster: 32 / per_block where each 32-row group spans that
    many whole blocks (per_block 8 or 16; rows % 32 == 0, so the grid is whole clusters) and the device launches
    clusters; else 1 (the groups across blocks handed off through arrivals). Clusters of 4 only where the grid
    leaves SMs free: measured on the H100 (NOTES.md v22), the 1B products' 256 blocks of 8 rows in clusters of 4
    were slower (a cluster's blocks must be resident at once in one GPC), SmolLM2's 72 faster."""
    if not CLUSTER_HANDOFF or per_block >= Q8_BLOCK or Q8_BLOCK % per_block or not pdl.clusters_available():
        return 1
    cluster = Q8_BLOCK // per_block
    return cluster if cluster == 2 or blocks <= _device_limits()[0] else 1


def gemv_add(a, m, x, dtype: str, per_block: int | None = None, staged=None, prenorm: Prenorm | None = None) -> None:
    """x (rows,) fp32 += act_t(m @ a), a (cols,) act_t; staged: a quantized ahead (staged_bytes(cols) uint8, as
    quantize_input writes it; int8 types only), read instead of a. prenorm: then also x * prenorm.next_norm
    quantized into prenorm.staged and each block's sum of x^2 into prenorm.partials (rows % 32 == 0, per_block
    default prenorm_per_block(rows), a multiple of 8), for a consumer's Prenormed input."""
    if staged is not None and m.ggml_type not in INT8_TYPES:
        raise DeviceError(f"gemv_add: a staged input needs an int8 weight type, not {m.ggml_type.name}")
    cluster = 1
    if prenorm is not None:
        per_block = per_block or prenorm_per_block(m.rows)
        if m.rows % 32 or per_block % WARPS:
            raise DeviceError(f"gemv_add: prenorm outputs need whole groups of 32 rows and blocks of a multiple of "
                              f"{WARPS} rows ({m.rows} rows, {per_block} a block)")
        cluster = prenorm_cluster(per_block, prenorm_blocks(m.rows, per_block))
    next_norm, out_staged, partials, arrivals = prenorm if prenorm is not None else (NULL,) * 4
    _launch("gemv_add", m, m.cols, m.rows,
            (m.data, _row_bytes(m), a, NULL if staged is None else staged, np.int32(m.rows), np.int32(m.cols), x,
             next_norm, out_staged, partials, arrivals), dtype, per_block, cluster)


def _prenormed_args(prenormed: Prenormed | None, m, d: int) -> tuple:
    """(in_staged, partials, n_partials) kernel arguments of a consumer reading `prenormed` (or none)."""
    if prenormed is None:
        return NULL, NULL, np.int32(0)
    if m.ggml_type not in INT8_TYPES or d % 32:
        raise DeviceError(f"a prenormed input needs an int8 weight type and d % 32 == 0, not {m.ggml_type.name}, "
                          f"d = {d}")
    return prenormed.staged, prenormed.partials, np.int32(prenormed.n_partials)


def quantize_input(x, staged, dtype: str) -> None:
    """staged (staged_bytes(n) uint8) = x (n,) act_t quantized per 32 as the int8 GEMVs stage it."""
    n = x.shape[-1]
    blocks = -(-n // (32 * WARPS))
    function("elementwise", "quantize_input", dtype)((blocks,), (THREADS,), (x, np.int32(n), staged))


def qkv(x, norm, eps, wq, wk, wv, biases, q_out, cache_k, cache_v, position, cos_t, sin_t, n_heads: int, n_kv: int,
        head_dim: int, rope_dim: int, chunk_len: int, dtype: str, per_block: int | None = None,
        prenormed: Prenormed | None = None) -> None:
    """h = rmsnorm(x) * norm; q_out = wq @ h (unrotated); the key row (wk @ h, rotated at position[0]) and the
    value row (wv @ h) stored at row position[0] of the layer's cache. wq, wk, wv: one stored type. biases:
    (bq, bk, bv) fp32 device vectors added to the rows before the rotation (qwen2), or None. prenormed: h read from
    the previous gemv_add's prenorm outputs (x * norm quantized) instead of staged from x."""
    d = wq.cols
    n_q, n_k, n_v = n_heads * head_dim, n_kv * (head_dim - rope_dim // 2), n_kv * head_dim
    per_block = per_block or tasks_per_block(n_q + 2 * n_v)  # rows (as many key rows as value rows)
    bq, bk, bv = biases if biases is not None else (NULL, NULL, NULL)
    _launch("qkv", wq, d, n_q + n_k + n_v,
            (x, norm, np.float32(eps), np.int32(d), wq.data, wk.data, wv.data, bq, bk, bv, _row_bytes(wq), q_out,
             cache_k, cache_v, position, cos_t, sin_t, np.int32(n_heads), np.int32(n_kv), np.int32(head_dim),
             np.int32(rope_dim), np.int32(chunk_len)) + _prenormed_args(prenormed, wq, d), dtype, per_block,
            blocks=qkv_blocks(n_q, n_k, n_v, per_block))


def qkv_blocks(n_q: int, n_k: int, n_v: int, per_block: int) -> int:
    """qkv's grid: blocks of equal rows (gemv.cu qkv_task_range): per_block query tasks, per_block // 2 key tasks (a
    rotary pair is two rows) or per_block value tasks a block."""
    per_key_block = max(1, per_block // 2)
    return -(-n_q // per_block) + -(-n_k // per_key_block) + -(-n_v // per_block)


def gate_up(x, norm, eps, wg, wu, out, dtype: str, per_block: int | None = None, out_staged=None,
            prenormed: Prenormed | None = None) -> None:
    """h = rmsnorm(x) * norm; out (ffn,) act_t = silu(wg @ h) * (wu @ h). wg, wu: one stored type. out_staged:
    also out quantized (staged_bytes(ffn) uint8) for an int8 down projection (ffn % 32 == 0). prenormed: h read from
    the previous gemv_add's prenorm outputs instead of staged from x."""
    if out_staged is not None:
        per_block = per_block or tasks_per_block(wg.rows, multiple=32)
        if per_block % 32 or wg.rows % 32:
            raise DeviceError(f"gate_up: a staged output needs whole blocks of 32 rows ({wg.rows} rows, {per_block} "
                              f"a block)")
    _launch("gateup", wg, wg.cols, wg.rows,
            (x, norm, np.float32(eps), np.int32(wg.cols), wg.data, wu.data, _row_bytes(wg), np.int32(wg.rows), out,
             NULL if out_staged is None else out_staged) + _prenormed_args(prenormed, wg, wg.cols), dtype, per_block)


# head_ring (gemv.cu): the head's rows streamed into shared memory by the bulk copy engine, for these weight types on
# GPUs of compute capability >= 9.0; RING_ROWS rows a stage, RING_STAGES stages, one block of RING_THREADS an SM
# (dev/cuda/gemv_tma.py: 8 x 4 the fastest for the 8B head, 180.6 -> 154.3 us on an H100)
RING_TYPES = (GGMLType.Q6_K,)
RING_ROWS, RING_STAGES, RING_THREADS = 8, 4, 288


@functools.cache
def _compute_capability() -> int:
    """The current device's compute capability as major * 10 + minor (90 for Hopper)."""
    import cupy as cp

    return int(cp.cuda.Device().compute_capability)


def ring_shared_bytes(m) -> int:
    """Dynamic shared memory of head_ring over m: the staged input (rounded to 128), the stages, their mbarriers."""
    return -(-stage_bytes(m.ggml_type, m.cols) // 128) * 128 + RING_STAGES * (RING_ROWS * int(m.data.shape[1]) + 16)


def ring_fits(m) -> bool:
    """Whether head_ring can stream m's rows: an int8 weight type, 16-byte rows (bulk copies), d % 32 == 0, a GPU
    of compute capability >= 9.0 and the stages within its shared memory."""
    return (m.ggml_type in INT8_TYPES and int(m.data.shape[1]) % 16 == 0 and m.cols % 32 == 0
            and _compute_capability() >= 90 and ring_shared_bytes(m) <= _device_limits()[1])


def head_uses_ring(m) -> bool:
    """Whether head() streams m's rows through head_ring by default: a type measured faster so, where it fits."""
    return m.ggml_type in RING_TYPES and ring_fits(m)


def head(x, norm, eps, m, logits, dtype: str, per_block: int | None = None,
         prenormed: Prenormed | None = None, ring: bool | None = None) -> None:
    """logits (rows,) fp32 = m @ (rmsnorm(x) * norm); prenormed: that input read from the last gemv_add's prenorm
    outputs. ring: stream the rows through head_ring (default head_uses_ring(m); the same logits bit for bit)."""
    args = ((x, norm, np.float32(eps), np.int32(m.cols), m.data, _row_bytes(m), np.int32(m.rows), logits)
            + _prenormed_args(prenormed, m, m.cols))
    if not (head_uses_ring(m) if ring is None else ring):
        _launch("head", m, m.cols, m.rows, args, dtype, per_block)
        return
    if not ring_fits(m):
        raise DeviceError(f"head_ring cannot stream {m.name} ({m.ggml_type.name}, {m.data.shape[1]}-byte rows) on "
                          f"this GPU (compute capability {_compute_capability()})")
    fn = function("gemv", f"head_ring_{m.suffix}", dtype, instance=per_type(INSTANCE_MACRO, m.suffix))
    shared = ring_shared_bytes(m)
    if _opted_in.get(id(fn), DEFAULT_SHARED) < shared:
        fn.max_dynamic_shared_size_bytes = shared
        _opted_in[id(fn)] = shared
    sms = _device_limits()[0]
    per_block = per_block or -(-m.rows // sms)
    pdl.launch(fn, (-(-m.rows // per_block),), (RING_THREADS,),
               args + (np.int32(per_block), np.int32(RING_ROWS), np.int32(RING_STAGES)), shared)


# ---- the numpy model of the kernels' arithmetic ----------------------------------------------------------

def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (..., n) float32, n % 32 == 0 -> int8 q (..., n), scale d and float sum s (..., n/32), as gemv.cu
    stages it: d = max|x| / 127 (fp32), q = rint(x / d) (0 where d == 0)."""
    blocks = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, Q8_BLOCK)
    d = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float32)
    safe = np.where(d > 0, d, np.float32(1))[..., None]
    q = np.where(d[..., None] > 0, np.rint(blocks / safe), 0).astype(np.int8)
    return q.reshape(x.shape), d, blocks.sum(axis=-1, dtype=np.float64)


def _block_offsets(tensor) -> np.ndarray | None:
    """(rows, cols/32) per-block constant the kernel adds in float (Q4_1: m; Q4_K: -dmin*m), else None."""
    qs_bytes = {GGMLType.Q4_1: (4, 20), GGMLType.Q4_K: (16, 144)}.get(GGMLType(tensor.ggml_type))
    if qs_bytes is None:
        return None
    start, end = qs_bytes
    raw = np.array(tensor.raw, np.uint8).reshape(-1, block_layout(tensor.ggml_type)[1])
    raw[:, start:end] = 0  # every q = 0: each value decodes to its block's offset
    return dequantize(raw.reshape(-1), tensor.ggml_type, tensor.shape)[:, ::Q8_BLOCK]


def prenorm_outputs(x: np.ndarray, next_norm: np.ndarray, per_block: int) -> tuple[np.ndarray, np.ndarray]:
    """What gemv_add's prenorm epilogue writes for the updated residual x (rows,) fp32: the staged bytes of
    u = x * next_norm (fp32) quantized (staged_bytes(rows) uint8: int8 q, fp32 d, fp32 s) and the partial sums of
    x^2 over each block of per_block rows (float64 here; the kernel sums in fp32)."""
    x = np.asarray(x, np.float32)
    q, d, s = quantize_q8(x * np.asarray(next_norm, np.float32))
    staged = np.concatenate([q.view(np.uint8), d.astype(np.float32).view(np.uint8),
                             s.astype(np.float32).view(np.uint8)])
    squares = x.astype(np.float64) ** 2
    partials = np.array([squares[i:i + per_block].sum() for i in range(0, len(x), per_block)])
    return staged, partials


def prenormed_q8(staged: np.ndarray, partials: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What qkv / gate_up / head compute from a prenormed input (prenorm_outputs' staged bytes and partials): the
    int8 values of x * w as stored, their scales and sums times s = rsqrt(sum(partials) / d + eps) (fp32)."""
    n = len(staged) * 4 // 5
    q = np.asarray(staged[:n]).view(np.int8)
    scales = np.asarray(staged[n:]).view(np.float32)
    s = np.float32(1 / np.sqrt(np.float32(np.sum(partials) / n) + np.float32(eps)))
    return q, scales[:n // 32] * s, scales[n // 32:] * s


def reference(x: np.ndarray | None, tensor, q8: tuple | None = None) -> np.ndarray:
    """The numpy model of a quantized-weight GEMV: x (cols,) float32 (the act_t values the kernel reads), a
    loader WeightTensor (rows, cols) -> (rows,) float64. Float weight types: the plain product. q8: the input
    already quantized (q, d, s as quantize_q8 or prenormed_q8 give them; x None), for the int8 types."""
    w = dequantize(tensor.raw, tensor.ggml_type, tensor.shape).astype(np.float64)
    if q8 is not None:
        q, d, s = q8
    elif GGMLType(tensor.ggml_type) not in INT8_TYPES:
        return w @ np.asarray(x, np.float32).astype(np.float64)
    else:
        q, d, s = quantize_q8(np.asarray(x, np.float32))
    x_hat = (q.astype(np.float64).reshape(-1, Q8_BLOCK) * d[:, None]).reshape(-1)
    offsets = _block_offsets(tensor)
    if offsets is None:
        return w @ x_hat
    off = offsets.astype(np.float64)
    return (w - np.repeat(off, Q8_BLOCK, axis=1)) @ x_hat + off @ s
