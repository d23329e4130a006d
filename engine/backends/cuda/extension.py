"""Self-Extend and StreamingLLM on the CUDA backend: passes of the fused flash-attention kernel, or a composed path.

  keys       written by the kernels that write every key: store_kv (prefill) and the fused decode step's qkv
             (fused.py), given *key tables* instead of the rotary tables: row j of a key table holds the cos/sin
             of the scheme's cached key position of j (Self-Extend floor(j/G); StreamingLLM j, the rotary tables
             themselves), and the kernels (chunk_len 0) rotate the key of row j by row j. So the cache holds the
             keys the numpy backend's holds, in the activation dtype.
  attention  fused (``fused_attention``): each relation of the scheme is one pass of the mma.sync prefill kernel
             (flash_attention.flash_attention with rot_positions / window / partials), the passes' split partials
             merged by one dca_combine.
               Self-Extend (G, W)  group: the cached keys as they are, query i sees keys j <= i - W (its position
                                   shifted by W) rotated at floor(i/G) + W - floor(W/G);
                                   neighbour: the keys from i - W + 1 on, rotated on from floor(j/G) to j into a
                                   scratch copy, window W, query rotated at i.
               StreamingLLM (S, R) sinks: keys 0..S-1, query rotated at min(i, S + R - 1);
                                   window: keys from S on (their rows offset by S), window R, query at i.
             Composed, where the kernels do not serve the call (``fused_reason``: the attention temperature, a
             head_dim or GQA shape of no fused build):
             tiled_attention.blockwise_attention, the numpy backend's algorithm, over CuPy arrays: the cached
             keys and values stay on the GPU and are read one key tile at a time, cast to fp32; scores, the
             relations' choice, masks and the online softmax are CuPy fp32 (cuBLAS batched GEMMs). The key spans,
             relations and masks come from the scheme on the host (small arrays, uploaded per tile), so
             StreamingLLM reads only the sinks and the window of each query tile.
  decode     one token (``decode_attention``): the same passes with their positions computed on the device from
             the token's position slot (kernels/elementwise.cu: self_extend_window, which also copies the
             neighbour rows into W-row scratches, and streaming_plan), launches and splits fixed by the cache
             capacity, so the fused step is captured as a CUDA graph (graph.py) and its output can be staged for
             the output projection (combine's out_staged). Where the composed path runs, the step runs eagerly
             (``graph_ready``).

Host positions (``attention``, prompts): the new rows are at cache.length .. cache.length + n - 1 when it runs
(Llama.forward runs a forward before it commits it), which gives the passes without reading the device positions
back.

Memory beyond engine/memory.py's plan (which does not know the attention in force): fused, the passes' fp32
partials (4 x Hq x D bytes a token and key slice) and Self-Extend's neighbour keys (the batch + W rows of one
layer, and their fp32 rotation temporaries, ~7x those rows' bytes, while they are made; in decode W rows of keys
and of values); composed, a prefill batch's fp32 output (4 x Hq x D bytes a token, then its activation copy) and a
few SCORES_BYTES of tiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import dca as dca_ops
from ...rope import RotaryTable, attention_factor, checked_positions, rotate_with
from ...self_extend import GROUP, NEIGHBOUR, SelfExtendConfig
from ...streaming import StreamingConfig
from ...tiled_attention import Arrays, PositionScheme, blockwise_attention
from ...weights.bf16 import from_bf16_bits
from . import flash_attention as flash
from .weights import to_activation

# tiles on the GPU: larger than the numpy backend's (fewer launches, each busier). A query tile's scores against a
# key tile take Hq * block_q * BLOCK_K * 4 bytes: block_q is the largest power of two (16 .. 1024) within SCORES_BYTES
BLOCK_K = 1024
SCORES_BYTES = 64 << 20


def query_tile_rows(n_heads: int) -> int:
    """Queries per tile for n_heads query heads: scores within SCORES_BYTES (32 heads: 512 rows)."""
    rows = 1024
    while rows > 16 and n_heads * rows * BLOCK_K * 4 > SCORES_BYTES:
        rows //= 2
    return rows


def is_extension(layout) -> bool:
    """Is the attention layout a Self-Extend / StreamingLLM scheme (not a DCAConfig, not None)?"""
    return isinstance(layout, PositionScheme)


def chunk_len_of(layout) -> int:
    """The chunk_len argument of the kernels that store keys: DCA's, else 0 (the key of row j rotated by row j
    of the tables they get: CudaBackend.key_tables)."""
    return 0 if layout is None or is_extension(layout) else layout.chunk_len


class DeviceArrays(Arrays):
    """The tiled algorithm's tiles as CuPy arrays: activations (fp16, or bf16 bit patterns) read as fp32."""

    def __init__(self, cp):
        self.xp = cp

    def float32(self, x):
        if x.dtype == np.uint16:  # bf16 bit patterns
            return from_bf16_bits(x, self.xp)
        return x.astype(np.float32, copy=False)

    def upload(self, host: np.ndarray):
        return self.xp.asarray(host)


class DeviceRotary:
    """RotaryTable.rotate on CuPy arrays, at host positions, with the table's cos/sin on the device."""

    def __init__(self, cp, rotary: RotaryTable, cos, sin):
        self.cp = cp
        self.rope, self.n_positions = rotary.rope, rotary.n_positions
        self.cos, self.sin = cos, sin  # (n_positions, rope.dim/2) fp32, the backend's rotary_tables

    def rotate(self, x, positions: np.ndarray):
        """x (n, H, head_dim) CuPy, positions (n,) host ints -> x rotated (a new array of x's dtype)."""
        index = self.cp.asarray(checked_positions(x, positions, self.rope.dim, self.n_positions))
        return rotate_with(x, self.cos[index], self.sin[index], self.rope.dim)


def key_tables(cp, rotary: RotaryTable, scheme: PositionScheme, tables: tuple) -> tuple:
    """cos, sin (n_positions, rope.dim/2) fp32 whose row j rotates a key at absolute position j to the scheme's
    cached key position; `tables` (the rotary tables) when that is j itself."""
    every = np.arange(rotary.n_positions)
    cached = np.asarray(scheme.cached_key_positions(every))
    if np.array_equal(cached, every):
        return tables
    index = cp.asarray(cached)
    return tables[0][index], tables[1][index]


@dataclass(frozen=True)
class Pass:
    """One relation of a scheme as a pass of the flash kernel: query i sees rows max(0, positions[i] - window + 1)
    .. positions[i] of k / v (none if negative; window 0: from row 0), rotated at rot_positions[i]."""

    k: object  # (rows, Hkv, D) activations, keys rotated as the relation needs
    v: object  # (rows, Hkv, D)
    positions: np.ndarray  # (n,) host ints
    rot_positions: np.ndarray  # (n,) host ints
    window: int = 0

    def keys_per_block(self) -> int:
        """About how many keys a block of the kernel scans (its split count's hint): a window and a block's rows
        (at most 128 queries), else every key up to the last position."""
        last = int(self.positions[-1]) + 1
        return min(last, self.window + 128) if self.window else last


def self_extend_passes(backend, k, v, first: int, n: int, rotary: RotaryTable, scheme: SelfExtendConfig) -> list:
    """Queries at first .. first + n - 1 over k, v (rows 0 .. first + n - 1, keys cached at floor(j/G)): the group
    pass (none while no query is W past key 0) and the neighbour pass."""
    i = np.arange(first, first + n)
    window = scheme.window
    passes = []
    if first + n - 1 >= window:
        passes.append(Pass(k, v, i - window, scheme.query_positions(i)[GROUP]))
    lo = max(0, first - window + 1)
    j = np.arange(lo, first + n)
    cp = backend.cp
    exact = to_activation(cp, scheme.key_tile(NEIGHBOUR, DeviceArrays(cp).float32(k[lo:first + n]), j,
                                              DeviceRotary(cp, rotary, *backend.rotary_tables(rotary))),
                          backend.dtype)  # the keys rotated on to j, as the composed path's tiles
    passes.append(Pass(exact, v[lo:first + n], i - lo, i, window))
    return passes


def streaming_passes(k, v, first: int, n: int, scheme: StreamingConfig) -> list:
    """Queries at first .. first + n - 1 over k, v (keys cached at j): the sinks' pass and the window's (keys from
    S on, none while no query is past the sinks)."""
    i = np.arange(first, first + n)
    sinks, window = scheme.sinks, scheme.window
    passes = []
    if sinks:
        passes.append(Pass(k[:sinks], v[:sinks], np.minimum(i, sinks - 1), scheme.query_positions(i)[1]))
    if first + n > sinks:
        passes.append(Pass(k[sinks:], v[sinks:], i - sinks, i, window))
    return passes


def fused_reason(head_dim: int, rope_dim: int, n_heads: int, n_kv: int, temperature_length: int | None) -> str | None:
    """Why the flash kernel's passes cannot serve a model's attention (the composed path then does), or None."""
    if temperature_length:
        return "the attention temperature (its scale follows the true positions, which the passes shift)"
    return flash.unsupported_reason(head_dim, rope_dim, n_heads, n_kv)


def graph_ready(model) -> bool:
    """Does the model's one-token attention read its position on the device (no extension, or the extension's
    passes), so that its decode step can be a CUDA graph and stage the output projection's input?"""
    c = model.config
    return model.extension is None or fused_reason(c.head_dim, model.rotary.rope.dim, c.n_heads, c.n_kv_heads,
                                                   model.temperature_length) is None


def fused_attention(backend, q, cache, layer: int, rotary: RotaryTable, scheme: PositionScheme):
    """attention() by passes of the flash kernel (module docstring) -> (n, Hq, D) activations."""
    cp = backend.cp
    n, n_heads, head_dim = q.shape
    first = cache.length
    k, v = cache.k[layer], cache.v[layer]  # (capacity, Hkv, D) 16-bit (extensions.require_16bit_cache)
    if isinstance(scheme, SelfExtendConfig):
        passes = self_extend_passes(backend, k, v, first, n, rotary, scheme)
    else:
        passes = streaming_passes(k, v, first, n, scheme)
    device = [(p.k, p.v, cp.asarray(p.positions, dtype=cp.int32), cp.asarray(p.rot_positions, dtype=cp.int32),
               p.window, p.keys_per_block()) for p in passes]
    return run_passes(backend, q, device, rotary)


def run_passes(backend, q, passes, rotary: RotaryTable, out_staged=None):
    """q (n, Hq, D) through the passes [(k, v, positions, rot_positions, window, keys per block)] (device arrays;
    flash_attention's pass arguments), merged -> (n, Hq, D) activations; out_staged: flash_attention.combine's."""
    cp = backend.cp
    n, n_heads, head_dim = q.shape
    splits = [flash.pass_splits(cp, n, n_heads, k.shape[1], head_dim, keys) for k, _, _, _, _, keys in passes]
    rows, total = n * n_heads, sum(splits)
    part_o = cp.empty((total, rows, head_dim), dtype=cp.float32)
    part_m = cp.empty((total, rows), dtype=cp.float32)
    part_l = cp.empty((total, rows), dtype=cp.float32)
    cos_t, sin_t = backend.rotary_tables(rotary)
    start = 0
    for (k, v, positions, rot_positions, window, _), count in zip(passes, splits):
        part = slice(start, start + count)
        flash.flash_attention(q, k, v, positions, cos_t, sin_t, rope_dim=rotary.rope.dim, rot_positions=rot_positions,
                              window=window, partials=(part_o[part], part_m[part], part_l[part]))
        start += count
    out = cp.empty(q.shape, dtype=q.dtype)
    flash.combine(part_o, part_m, part_l, out, rows, head_dim, total, flash.element_type(q), out_staged)
    return out


def decode_attention(backend, q, cache, layer: int, positions, rotary: RotaryTable, scheme: PositionScheme,
                     out_staged=None):
    """q (1, Hq, D) unrotated activations of the token at the device position slot `positions` (1,) int32, its row
    already stored: the passes with their positions made on the device (module docstring) -> (1, Hq, D)."""
    cp = backend.cp
    k, v = cache.k[layer], cache.v[layer]  # (capacity, Hkv, D)
    capacity, n_kv, head_dim = k.shape
    plan = cp.empty(4, dtype=cp.int32)  # positions and rotation positions of pass 0, of pass 1
    if isinstance(scheme, SelfExtendConfig):
        window = scheme.window
        k_near, v_near = (cp.empty((window, n_kv, head_dim), dtype=k.dtype) for _ in range(2))
        cos_t, sin_t = backend.rotary_tables(rotary)
        rope_dim = rotary.rope.dim
        backend.launch_1d("elementwise", "self_extend_window", window * n_kv * (2 * head_dim - rope_dim // 2),
                          (k, v, positions, cos_t, sin_t, k_near, v_near, plan, np.int32(window),
                           np.int32(scheme.group_size), np.int32(n_kv), np.int32(head_dim), np.int32(rope_dim),
                           np.float32(1.0 / attention_factor(rotary.rope))))
        passes = [(k, v, plan[0:1], plan[1:2], 0, capacity), (k_near, v_near, plan[2:3], plan[3:4], 0, window)]
    else:
        sinks, window = scheme.sinks, scheme.window
        backend.launch_1d("elementwise", "streaming_plan", 1, (positions, plan, np.int32(sinks), np.int32(window)))
        passes = [(k[:sinks], v[:sinks], plan[0:1], plan[1:2], 0, sinks)] if sinks else []
        passes.append((k[sinks:], v[sinks:], plan[2:3], plan[3:4], window, window + 128))
    return run_passes(backend, q, passes, rotary, out_staged)


def attention(backend, q, cache, layer: int, rotary: RotaryTable, scheme: PositionScheme,
              temperature_length: int | None, positions=None, out_staged=None):
    """q (n, Hq, D) unrotated activations of the rows at cache.length .. cache.length + n - 1, attending the
    cached keys under `scheme` -> (n, Hq, D) activations. Given the device position slot `positions` (1,) of a
    one-token call, the passes take their positions from it (decode_attention: graph-ready; out_staged: its)."""
    if fused_reason(q.shape[2], rotary.rope.dim, q.shape[1], cache.k[layer].shape[1], temperature_length) is None:
        if q.shape[0] == 1 and positions is not None:
            return decode_attention(backend, q, cache, layer, positions, rotary, scheme, out_staged)
        return fused_attention(backend, q, cache, layer, rotary, scheme)
    return composed_attention(backend, q, cache, layer, rotary, scheme, temperature_length)


def composed_attention(backend, q, cache, layer: int, rotary: RotaryTable, scheme: PositionScheme,
                       temperature_length: int | None):
    """attention() by the tiled algorithm over CuPy arrays (module docstring) -> (n, Hq, D) activations."""
    cp = backend.cp
    n = q.shape[0]
    positions = np.arange(cache.length, cache.length + n)  # (n,) host
    logit_scale = dca_ops.temperature(positions, temperature_length) if temperature_length else None
    end = cache.length + n
    out = blockwise_attention(q, cache.k[layer, :end], cache.v[layer, :end], positions,
                              DeviceRotary(cp, rotary, *backend.rotary_tables(rotary)), scheme,
                              logit_scale=logit_scale, block_q=query_tile_rows(q.shape[1]), block_k=BLOCK_K,
                              arrays=DeviceArrays(cp))
    return to_activation(cp, out, backend.dtype)  # (n, Hq, D) fp32 -> activations
