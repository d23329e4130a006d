"""Fused DCA flash attention on tensor cores (kernels/dca_flash_attn.cu, kernels/dca_decode.cu).

Prefill: ``flash_attention`` — one kernel, online softmax, the query rotation picked per key tile,
GQA without copies, optionally split over the keys (then merged by ``dca_combine``). Two builds of it:
mma.sync (kernels/dca_flash_attn.cu, any sm_80+ GPU) and warpgroup MMA (kernels/dca_flash_attn_sm90.cu,
Hopper only, chosen there by default). Decode:
``flash_decode`` — split-K over the chunk-aware cache plus the combine kernel; the split count comes
from the cache capacity, so the launch is fixed while the context grows (CUDA graphs). Decode also reads
q8_0 caches directly (kv_q8.DeviceQ8Rows, K and/or V: the dca_decode_q8_<D>_<K><V> builds); prefill takes
16-bit caches only (the backend dequantizes q8_0 rows first, kv_q8.py).

Layouts (the CUDA backend's): q (n, Hq, D) unrotated; k_cache, v_cache (capacity, Hkv, D) with keys
rotated at their key positions (j mod chunk_len under DCA); positions (n,) int32, increasing, the
absolute positions of the queries (query i sees keys 0..positions[i]); cos_t, sin_t
(n_positions, rope_dim/2) float32. Elements fp16 (cupy.float16) or bf16 — CuPy has no bfloat16
dtype, so bf16 arrays travel as uint16 bit patterns (an ml_dtypes ``bfloat16`` dtype is accepted
too). The output has q's dtype. Supported: head_dim 64 or 128, rope_dim a multiple of 32 up to
head_dim, decode groups (Hq/Hkv) up to 16; ``unsupported_reason`` says why not, for the caller's
fallback to the SIMT kernel (kernels/attention.cu).
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import ConfigError, DeviceError
from . import pdl
from .kernels import function
from .kv_q8 import NULL, is_q8
from .splits import key_splits, sm_count
from .weights import row_stride

THREADS = 128  # 4 warps per block, both attention kernels
COMBINE_THREADS = 256  # 8 warps per merged row
# head_dim -> (m-tiles of 16 rows per warp, keys per tile) of the mma.sync prefill kernel, and -> (keys per tile,
# consumer warpgroups of 64 rows, K/V buffers) of the sm_90a wgmma one: the fastest measured on an H200 (the
# other configurations and their times: dev/cuda/attention.py); only these are built
PREFILL_TILES = {64: (2, 128), 128: (2, 64)}
WGMMA_TILES = {64: (128, 3, 3), 128: (128, 2, 3)}
PREFILL_KERNELS = ("auto", "mma", "wgmma")
# head_dim -> (keys per warp tile, cp.async stages a warp) of the decode kernel with 16-bit caches, and with a q8_0
# cache (a tile of its rows is half the bytes): the fastest measured on an H100 (dev/cuda/attention.py decode-variants)
DECODE_CONFIG = {64: (32, 2), 128: (16, 2)}
DECODE_Q8_CONFIG = {64: (32, 2), 128: (32, 2)}
DECODE_GROUP_LIMIT = 16  # query heads per KV head: one mma m-tile


# looked up by dtype: str(dtype) costs microseconds, and every prefill layer asks three times
_ELEMENT_TYPES = {np.dtype(np.float16): "f16", np.dtype(np.uint16): "bf16"}


def element_type(x) -> str:
    """'f16' or 'bf16' for a CuPy array of fp16, or of bf16 bits (uint16 / a 'bfloat16' dtype)."""
    found = _ELEMENT_TYPES.get(x.dtype)
    if found is not None:
        return found
    name = str(x.dtype)
    if name == "bfloat16":
        return "bf16"
    raise ConfigError(f"flash attention takes fp16 or bf16 (uint16 bits) arrays, got {name}")


def unsupported_reason(head_dim: int, rope_dim: int, n_heads: int, n_kv: int, decode: bool = False) -> str | None:
    """Why the fused kernels cannot serve this shape (the caller then uses the SIMT kernel), or None."""
    if head_dim not in PREFILL_TILES:
        return f"head_dim {head_dim} (the fused kernels are built for 64 and 128)"
    if rope_dim % 32 or not 0 < rope_dim <= head_dim:
        return f"rope_dim {rope_dim} (must be a multiple of 32, at most head_dim {head_dim})"
    if n_kv <= 0 or n_heads % n_kv:
        return f"{n_heads} query heads is not a multiple of {n_kv} KV heads"
    if decode and n_heads // n_kv > DECODE_GROUP_LIMIT:
        return f"GQA group {n_heads // n_kv} (the decode kernel takes up to {DECODE_GROUP_LIMIT})"
    return None


def _check(cp, q, k_cache, v_cache, positions, cos_t, sin_t, rope_dim: int, decode: bool) -> str:
    if q.ndim != 3 or k_cache.ndim != 3 or k_cache.shape != v_cache.shape:
        raise ConfigError(f"flash attention: q {q.shape} must be (n, Hq, D) and the caches {k_cache.shape}, "
                          f"{v_cache.shape} one (capacity, Hkv, D) shape")
    n, n_heads, head_dim = q.shape
    if k_cache.shape[2] != head_dim:
        raise ConfigError(f"flash attention: query head_dim {head_dim} differs from the cache's {k_cache.shape[2]}")
    dtype = element_type(q)
    if not decode and (is_q8(k_cache) or is_q8(v_cache)):
        raise ConfigError("flash attention: the prefill kernels read 16-bit caches (dequantize q8_0 rows first)")
    for cache in (k_cache, v_cache):
        if not is_q8(cache) and element_type(cache) != dtype:
            raise ConfigError(f"flash attention: q ({q.dtype}) and a 16-bit cache ({cache.dtype}) must share one "
                              "element type")
    reason = unsupported_reason(head_dim, rope_dim, n_heads, k_cache.shape[1], decode)
    if reason is not None:
        raise DeviceError(f"the fused attention kernels do not support {reason}")
    if positions.shape != (n,) or positions.dtype != cp.int32:
        raise ConfigError(f"flash attention: positions must be ({n},) int32, got {positions.shape} {positions.dtype}")
    if cos_t.ndim != 2 or cos_t.shape != sin_t.shape or cos_t.shape[1] != rope_dim // 2 \
            or cos_t.dtype != cp.float32 or sin_t.dtype != cp.float32:
        raise ConfigError(f"flash attention: cos/sin tables must be (n_positions, {rope_dim // 2}) float32, "
                          f"got {cos_t.shape} {cos_t.dtype} and {sin_t.shape} {sin_t.dtype}")
    arrays = [(name, arr) for name, cache in (("k_cache", k_cache), ("v_cache", v_cache))
              for arr in ((cache.q, cache.d) if is_q8(cache) else (cache,))]
    for name, arr in arrays + [("cos", cos_t), ("sin", sin_t)]:
        if not arr.flags.c_contiguous:
            raise ConfigError(f"flash attention: {name} must be C-contiguous")
    return dtype


_smem_opt_in: dict[int, int] = {}  # id(kernel) -> dynamic shared memory it may use (kernels are cached)


def _launch(fn, grid, args, smem: int, threads: int = THREADS, waits: bool = False) -> None:
    """fn over grid; waits: its kernel executes pdl_wait before touching what earlier kernels write (dca_decode.cu's
    decode and combine kernels), so it is launched dependent while pdl.ENABLED; the prefill kernels do not wait."""
    if smem + fn.shared_size_bytes > 48 * 1024 and _smem_opt_in.get(id(fn), 0) < smem:  # above 48 KiB: an opt-in
        fn.max_dynamic_shared_size_bytes = smem
        _smem_opt_in[id(fn)] = smem
    if waits:
        pdl.launch(fn, grid, (threads,), args, smem)
    else:
        fn(grid, (threads,), args, shared_mem=smem)


def prefill_build(head_dim: int, tiles: tuple[int, int]) -> tuple[str, str, str]:
    """(file, kernel, instance) of the mma.sync prefill kernel of one configuration (m-tiles per warp, keys per
    tile)."""
    m_tiles, block_keys = tiles
    return ("dca_flash_attn", f"dca_flash_{head_dim}_{m_tiles}_{block_keys}",
            f"DCA_FLASH({head_dim}, {m_tiles}, {block_keys})")


def wgmma_build(head_dim: int, tiles: tuple[int, int, int]) -> tuple[str, str, str]:
    """(file, kernel, instance) of the sm_90a prefill kernel of one configuration (keys per tile, consumer
    warpgroups, buffers)."""
    block_keys, warpgroups, stages = tiles
    return ("dca_flash_attn_sm90", f"dca_flash_wg_{head_dim}_{block_keys}_{warpgroups}_{stages}",
            f"DCA_FLASH_WG({head_dim}, {block_keys}, {warpgroups}, {stages})")


def decode_config(head_dim: int, k_q8: bool = False, v_q8: bool = False,
                  config: tuple[int, int] | None = None) -> tuple[int, int]:
    """(keys per warp tile, stages) of the decode kernel for these caches: config (a measurement variant), else the
    production build's (DECODE_CONFIG, DECODE_Q8_CONFIG)."""
    return config or (DECODE_Q8_CONFIG if k_q8 or v_q8 else DECODE_CONFIG)[head_dim]


def decode_build(head_dim: int, k_q8: bool = False, v_q8: bool = False,
                 config: tuple[int, int] | None = None) -> tuple[str, str, str]:
    """(file, kernel, instance) of the decode kernel for 16-bit caches, or for a q8_0 K and/or V cache. config:
    (keys per warp tile, stages) of a measurement variant (dev/cuda/attention.py; its kernel takes the q8_0 builds'
    arguments whatever the caches), default the production build (decode_config)."""
    keys, stages = decode_config(head_dim, k_q8, v_q8, config)
    if config is not None:
        return ("dca_decode", f"dca_decode_cfg_{head_dim}_{keys}_{stages}_{int(k_q8)}{int(v_q8)}",
                f"DCA_DECODE_CFG({head_dim}, {keys}, {stages}, {int(k_q8)}, {int(v_q8)})")
    if not (k_q8 or v_q8):
        return "dca_decode", f"dca_decode_{head_dim}", f"DCA_DECODE({head_dim}, {keys}, {stages})"
    return ("dca_decode", f"dca_decode_q8_{head_dim}_{int(k_q8)}{int(v_q8)}",
            f"DCA_DECODE_Q8({head_dim}, {keys}, {stages}, {int(k_q8)}, {int(v_q8)})")


DECODE_CACHE_KINDS = ((False, False), (True, True), (True, False), (False, True))  # (K q8_0, V q8_0)


def launched_builds() -> list[tuple[str, str, str]]:
    """Every (file, kernel, instance) production launches: the default configurations."""
    return ([prefill_build(d, t) for d, t in PREFILL_TILES.items()] + [wgmma_build(d, t) for d, t in WGMMA_TILES.items()]
            + [decode_build(d, *kinds) for d in DECODE_CONFIG for kinds in DECODE_CACHE_KINDS])


def _kernel(build: tuple[str, str, str], dtype: str):
    file, kernel, instance = build
    return function(file, kernel, dtype, instance=instance)


def _dca_args(dca) -> tuple[np.int32, np.int32]:
    return (np.int32(dca.chunk_len), np.int32(dca.chunk_size)) if dca is not None else (np.int32(0), np.int32(0))


def combine(part_o, part_m, part_l, out, rows: int, head_dim: int, n_splits: int, dtype: str,
            out_staged=None) -> None:
    """out (rows, D) = the merged split-K partials (S, rows, D), (S, rows), (S, rows) of every attention kernel
    (log2 units; split 0 always holds key 0); D <= 128. out_staged: also out quantized for an int8 GEMV
    (gemv.staged_bytes(rows * D) uint8; D % 32 == 0)."""
    if out_staged is not None and head_dim % 32:
        raise DeviceError(f"attention: a staged output needs head_dim % 32 == 0, got {head_dim}")
    _launch(function("dca_decode", "dca_combine", dtype), (rows,),
            (part_o, part_m, part_l, out, np.uint64(0) if out_staged is None else out_staged, np.int32(rows),
             np.int32(head_dim), np.int32(n_splits)), 0, threads=COMBINE_THREADS, waits=True)


def prefill_smem(head_dim: int, tiles: tuple[int, int]) -> int:
    """Dynamic shared memory of the prefill kernel: rotated queries + 2 stages of K and V tiles."""
    m_tiles, block_keys = tiles
    return (4 * 16 * m_tiles) * head_dim * 2 + 4 * block_keys * head_dim * 2


def wgmma_available(cp) -> bool:
    """The sm_90a kernel runs on compute capability 9.0 exactly (its instructions are Hopper's alone)."""
    return cp.cuda.Device().compute_capability == "90"


def wgmma_smem(head_dim: int, tiles: tuple[int, int, int]) -> int:
    """Dynamic shared memory of the wgmma kernel: 1 KiB of alignment slack, each consumer warpgroup's 64 rotated
    rows, the K and V buffers, two mbarriers a buffer."""
    block_keys, warpgroups, stages = tiles
    return 1024 + warpgroups * 64 * head_dim * 2 + 2 * stages * block_keys * head_dim * 2 + 16 * stages


def prefill_splits(cp, n_blocks: int, n_keys_hint: int, block_keys: int) -> int:
    """Key slices that fill two blocks per SM when few row blocks exist (chunked prefill against a long cache),
    slices of at least 8 tiles (splits.key_splits)."""
    return key_splits(n_blocks, 2 * sm_count(cp), n_keys_hint, 8 * block_keys, 64)


def pass_splits(cp, n: int, n_heads: int, n_kv: int, head_dim: int, n_keys: int) -> int:
    """Key slices of a scheme's pass (flash_attention with partials) of n queries over n_keys keys: prefill_splits
    (one is enough: the kernel leaves partials wherever it is given their buffers)."""
    m_tiles, block_keys = PREFILL_TILES[head_dim]
    row_blocks = math.ceil(n * (n_heads // n_kv) / (64 * m_tiles))
    return prefill_splits(cp, row_blocks * n_kv, max(n_keys, 1), block_keys)


def flash_attention(q, k_cache, v_cache, positions, cos_t, sin_t, *, rope_dim: int, dca=None,
                    temperature_length: int = 0, n_keys_hint: int | None = None, n_splits: int | None = None,
                    tiles: tuple[int, ...] | None = None, kernel: str = "auto", rot_positions=None,
                    window: int = 0, partials=None):
    """DCA (dca: DCAConfig) or plain causal (dca=None) attention of n queries -> (n, Hq, D), q's dtype. q's rows
    may be strided (a view of a fused QKV product, each query's heads contiguous): the kernels read it in place.

    temperature_length: the training length L for DCA's attention temperature (0: off).
    n_keys_hint: keys the last query sees (positions[-1] + 1, known to the host) — used to split the
    keys when there are few row blocks; n_splits overrides. kernel: "wgmma" (Hopper), "mma" (sm_80+),
    "auto" = wgmma where it runs. tiles: the kernel's configuration, (m-tiles per warp, keys per tile) for
    mma, (keys per tile, consumer warpgroups, buffers) for wgmma (defaults PREFILL_TILES, WGMMA_TILES; others
    are measurement variants, dev/cuda/attention.py).

    A pass of a position scheme without chunks (extension.py; dca None, the mma kernel): rot_positions (n,) int32
    rotates query i at rot_positions[i] instead of positions[i], which then only bound its keys (a negative one:
    no key); window > 0 keeps the keys j > positions[i] - window. partials: (part_o, part_m, part_l) fp32 of
    shapes (S, n*Hq, D), (S, n*Hq), (S, n*Hq): the S key slices' unnormalized partials are left there for the
    caller's combine (of several passes), and nothing is returned.
    """
    import cupy as cp

    dtype = _check(cp, q, k_cache, v_cache, positions, cos_t, sin_t, rope_dim, decode=False)
    if rot_positions is not None or window != 0 or partials is not None:  # a scheme's pass
        _check_pass(cp, q, positions, rot_positions, window, partials, dca, kernel)
        kernel = "mma"
    n, n_heads, head_dim = q.shape
    out = cp.empty(q.shape, dtype=q.dtype) if partials is None else NULL
    if n == 0:
        return None if partials is not None else out
    q_stride = row_stride(q, q.dtype)  # a view of a fused QKV product is read in place
    if q_stride is None:
        q, q_stride = cp.ascontiguousarray(q), n_heads * head_dim
    plan = prefill_launch(cp, n, n_heads, k_cache.shape[1], head_dim, q_stride, rope_dim, dca, temperature_length,
                          dtype, n_keys_hint=n_keys_hint,
                          n_splits=partials[0].shape[0] if partials is not None else n_splits,
                          tiles=tiles, kernel=kernel, window=window)
    if partials is not None:
        plan.launch(q, k_cache, v_cache, positions, cos_t, sin_t, NULL, partials, rot_positions)
        return None
    part = split_partials(cp, plan.n_splits, n * n_heads, head_dim)
    plan.launch(q, k_cache, v_cache, positions, cos_t, sin_t, out, part, rot_positions)
    if plan.n_splits > 1:
        combine(*part, out, n * n_heads, head_dim, plan.n_splits, dtype)
    return out


class PrefillLaunch:
    """One prefill attention launch's configuration (prefill_launch): the kernel, grid, shared memory, threads, key
    splits and scalar arguments, which every layer of a prompt shares; ``launch`` runs it on one layer's arrays."""

    def __init__(self, fn, grid: tuple[int, int, int], smem: int, threads: int, wgmma: bool, n_splits: int,
                 scalars: tuple):
        self.fn, self.grid, self.smem, self.threads = fn, grid, smem, threads
        self.wgmma, self.n_splits, self.scalars = wgmma, n_splits, scalars

    def launch(self, q, k_cache, v_cache, positions, cos_t, sin_t, out, partials, rot_positions=None) -> None:
        """q (rows q_stride apart), the caches, positions and tables as flash_attention takes them; out, or NULL
        with the n_splits slices' partials (part_o, part_m, part_l), or three NULLs for one split."""
        if self.wgmma:  # no rot_positions (scheme passes run the mma kernel)
            args = (q, k_cache, v_cache, positions, cos_t, sin_t, out, *partials) + self.scalars
        else:
            args = (q, k_cache, v_cache, positions, NULL if rot_positions is None else rot_positions, cos_t, sin_t,
                    out, *partials) + self.scalars
        _launch(self.fn, self.grid, args, self.smem, threads=self.threads)


def prefill_launch(cp, n: int, n_heads: int, n_kv: int, head_dim: int, q_stride: int, rope_dim: int, dca,
                   temperature_length: int, dtype: str, *, n_keys_hint: int | None = None,
                   n_splits: int | None = None, tiles: tuple[int, ...] | None = None, kernel: str = "auto",
                   window: int = 0) -> PrefillLaunch:
    """The launch of n > 0 queries of n_heads heads (rows q_stride elements apart) over n_kv KV heads of head_dim:
    flash_attention's arguments (its docstring), checked."""
    if kernel not in PREFILL_KERNELS:
        raise ConfigError(f"flash attention: kernel must be one of {PREFILL_KERNELS}, got {kernel!r}")
    if kernel == "wgmma" and not wgmma_available(cp):
        raise DeviceError("the wgmma attention kernel needs a Hopper GPU (compute capability 9.0)")
    use_wgmma = kernel == "wgmma" or (kernel == "auto" and wgmma_available(cp))
    tiles = (WGMMA_TILES if use_wgmma else PREFILL_TILES)[head_dim] if tiles is None else tuple(tiles)
    if len(tiles) != (3 if use_wgmma else 2):
        raise ConfigError(f"flash attention: {'wgmma' if use_wgmma else 'mma'} tiles {tiles} must be "
                          f"{'(keys, warpgroups, buffers)' if use_wgmma else '(m-tiles, keys)'}")
    # rows of a block: 64 per consumer warpgroup (wgmma), 64 per m-tile of its 4 warps (mma)
    block_keys, block_rows = (tiles[0], 64 * tiles[1]) if use_wgmma else (tiles[1], 64 * tiles[0])
    row_blocks = math.ceil(n * (n_heads // n_kv) / block_rows)
    if n_splits is None:
        n_splits = 1 if n_keys_hint is None else prefill_splits(cp, row_blocks * n_kv, n_keys_hint, block_keys)
    scalars = (np.int32(n), np.int32(n_heads), np.int32(n_kv), np.int32(rope_dim), *_dca_args(dca),
               np.float32(math.log2(math.e) / math.sqrt(head_dim)), np.int32(temperature_length or 0),
               np.int32(n_splits))
    grid = (n_kv, row_blocks, n_splits)
    if use_wgmma:  # + the producer warpgroup
        return PrefillLaunch(_kernel(wgmma_build(head_dim, tiles), dtype), grid, wgmma_smem(head_dim, tiles),
                             128 * (tiles[1] + 1), True, n_splits, scalars + (np.int32(q_stride),))
    return PrefillLaunch(_kernel(prefill_build(head_dim, tiles), dtype), grid, prefill_smem(head_dim, tiles),
                         THREADS, False, n_splits, scalars + (np.int32(window), np.int32(q_stride)))


def _check_pass(cp, q, positions, rot_positions, window: int, partials, dca, kernel: str) -> None:
    """The arguments of a position scheme's pass (flash_attention's docstring)."""
    if dca is not None:
        raise ConfigError("flash attention: rot_positions, window and partials are for passes without DCA chunks")
    if kernel == "wgmma":
        raise ConfigError("flash attention: the wgmma kernel takes no rot_positions, window or partials (use mma)")
    if window < 0:
        raise ConfigError(f"flash attention: window must be 0 (none) or positive, got {window}")
    if rot_positions is not None and (rot_positions.shape != positions.shape or rot_positions.dtype != cp.int32):
        raise ConfigError(f"flash attention: rot_positions must be {positions.shape} int32, got "
                          f"{rot_positions.shape} {rot_positions.dtype}")
    if partials is not None:
        n, n_heads, head_dim = q.shape
        part_o, part_m, part_l = partials
        splits = part_o.shape[0]
        if splits < 1 or part_o.shape != (splits, n * n_heads, head_dim) or part_m.shape != (splits, n * n_heads) \
                or part_l.shape != part_m.shape or not all(p.dtype == cp.float32 and p.flags.c_contiguous
                                                           for p in partials):
            raise ConfigError(f"flash attention: partials {part_o.shape}, {part_m.shape}, {part_l.shape} must be "
                              f"C-contiguous float32 slices of {n * n_heads} rows x {head_dim}")


def split_partials(cp, n_splits: int, rows: int, head_dim: int):
    """Split-K workspace (part_o, part_m, part_l), or null pointers for one split."""
    if n_splits == 1:
        return (np.uint64(0),) * 3
    return (cp.empty((n_splits, rows, head_dim), dtype=cp.float32), cp.empty((n_splits, rows), dtype=cp.float32),
            cp.empty((n_splits, rows), dtype=cp.float32))


def decode_smem(head_dim: int, k_q8: bool = False, v_q8: bool = False, config: tuple[int, int] | None = None) -> int:
    """Dynamic shared memory of the decode kernel (dca_decode.cu decode_body): three query rotations + 4 warps x
    the larger of their stages (decode_config) of K and V rows (a 16-bit tile, or q8_0 values + scales) and their
    fp32 output rows for the merge (16 x head_dim; padded with a q8_0 V)."""
    keys, stages = decode_config(head_dim, k_q8, v_q8, config)
    tile, raw = keys * head_dim * 2, keys * head_dim + keys * (head_dim // 32) * 2
    stage = (raw if k_q8 else tile) + (raw if v_q8 else tile)
    merge_stride = head_dim + (16 if head_dim == 128 else 8) if v_q8 else head_dim
    return 3 * 16 * head_dim * 2 + 4 * max(stages * stage, 16 * merge_stride * 4)


def blocks_per_sm(cp, kernel, smem: int) -> int:
    """Resident blocks of THREADS threads per SM, from shared memory (smem dynamic + the kernel's static + 1 KiB the
    system reserves a block), registers and threads."""
    rt = cp.cuda.runtime
    device = cp.cuda.Device().id
    regs_per_block = math.ceil(kernel.num_regs * 32 / 256) * 256 * (THREADS // 32)  # 256-register units a warp
    by_smem = (rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerMultiprocessor, device)
               // (smem + kernel.shared_size_bytes + 1024))
    by_regs = rt.deviceGetAttribute(rt.cudaDevAttrMaxRegistersPerMultiprocessor, device) // regs_per_block
    by_threads = rt.deviceGetAttribute(rt.cudaDevAttrMaxThreadsPerMultiProcessor, device) // THREADS
    return max(1, min(by_smem, by_regs, by_threads))


def decode_splits(cp, capacity: int, n_kv: int, n_queries: int = 1, head_dim: int = 128,
                  dtype: str = "f16", k_q8: bool = False, v_q8: bool = False,
                  config: tuple[int, int] | None = None) -> int:
    """Key slices of the decode kernel (the build for the caches' kinds; config: decode_build's): as many as fill
    one wave of resident blocks without spilling into a second, fixed by the cache capacity, slices of at least 4
    tiles (splits.key_splits, one_wave)."""
    kernel = _kernel(decode_build(head_dim, k_q8, v_q8, config), dtype)
    slots = sm_count(cp) * blocks_per_sm(cp, kernel, decode_smem(head_dim, k_q8, v_q8, config))
    keys = decode_config(head_dim, k_q8, v_q8, config)[0]
    return key_splits(n_kv * n_queries, slots, capacity, 4 * keys, slots, one_wave=True)


def flash_decode(q, k_cache, v_cache, positions, cos_t, sin_t, *, rope_dim: int, dca=None,
                 temperature_length: int = 0, n_splits: int | None = None, workspace=None, out_staged=None,
                 config: tuple[int, int] | None = None):
    """Decode attention: q (n, Hq, D) of tokens at positions (n,) against the cache -> (n, Hq, D).

    k_cache, v_cache: (capacity, Hkv, D) 16-bit arrays or q8_0 rows (kv_q8.DeviceQ8Rows), each on its own.
    n_splits: key slices (default decode_splits from the cache capacity). workspace: optional
    (part_o, part_m, part_l) float32 buffers of shapes (S, n*Hq, D), (S, n*Hq), (S, n*Hq), reused
    across steps (CUDA graphs); allocated here when None. out_staged: see combine. config: decode_build's
    measurement variant (dev/cuda/attention.py), default the production build.
    """
    import cupy as cp

    dtype = _check(cp, q, k_cache, v_cache, positions, cos_t, sin_t, rope_dim, decode=True)
    n, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    k_q8, v_q8 = is_q8(k_cache), is_q8(v_cache)
    if n_splits is None:
        n_splits = decode_splits(cp, k_cache.shape[0], n_kv, n, head_dim, dtype, k_q8, v_q8, config)
    out = cp.empty(q.shape, dtype=q.dtype)
    if n == 0:
        return out
    q = cp.ascontiguousarray(q)
    if workspace is None:
        workspace = (cp.empty((n_splits, n * n_heads, head_dim), dtype=cp.float32),
                     cp.empty((n_splits, n * n_heads), dtype=cp.float32),
                     cp.empty((n_splits, n * n_heads), dtype=cp.float32))
    part_o, part_m, part_l = workspace
    if part_o.shape != (n_splits, n * n_heads, head_dim) or part_m.shape != (n_splits, n * n_heads) \
            or part_l.shape != part_m.shape:
        raise ConfigError(f"flash decode: workspace shapes {part_o.shape}, {part_m.shape}, {part_l.shape} "
                          f"do not fit {n_splits} splits of {n * n_heads} rows x {head_dim}")
    chunk_len, chunk_size = _dca_args(dca)
    if k_q8 or v_q8 or config is not None:  # each cache: its values and scales (q8_0) or its rows and no scales
        caches = tuple(arg for cache in (k_cache, v_cache) for arg in ((cache.q, cache.d) if is_q8(cache)
                                                                         else (cache, NULL)))
    else:
        caches = (k_cache, v_cache)
    _launch(_kernel(decode_build(head_dim, k_q8, v_q8, config), dtype), (n_splits, n_kv, n),
            (q,) + caches + (positions, cos_t, sin_t, part_o, part_m, part_l, np.int32(n), np.int32(n_heads),
                             np.int32(n_kv), np.int32(rope_dim), chunk_len, chunk_size,
                             np.float32(math.log2(math.e) / math.sqrt(head_dim)), np.int32(temperature_length or 0),
                             np.int32(n_splits)),
            decode_smem(head_dim, k_q8, v_q8, config), waits=True)
    combine(part_o, part_m, part_l, out, n * n_heads, head_dim, n_splits, dtype, out_staged)
    return out
