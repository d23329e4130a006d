"""The fused DCA attention kernels' development driver: every configuration checked against the numpy
reference, then timed on the GPU (llm.c's dev/cuda shape; production builds only the defaults,
engine/backends/cuda/flash_attention.py PREFILL_TILES / WGMMA_TILES).

Check (part "variants"): each configuration of VARIANTS / WGMMA_VARIANTS, DCA on a random GQA case with
chunk boundaries inside tiles, bf16, against engine/dca.py's blockwise float32 reference (max |err|).
Speed: for each shape (query heads x KV heads x head_dim, with that shape's DCA chunk settings) and length:
ms and TFLOP/s of the fused prefill kernel with DCA and as plain causal attention — the default build
(wgmma on Hopper) and the mma.sync build, and every other configuration of each; when torch is importable,
in the same run,
torch SDPA plain causal (K/V expanded to all heads) and the reference implementations' three-call
DCA (per query chunk: intra causal, successive and inter flash calls, merged by log-sum-exp; the
three query rotations are prepared outside the timed region). FLOPs are counted as causal attention
(4 * n^2/2 * head_dim * Hq) for every method. Then decode: GB/s of the split-K kernel reading a
128k-token cache (K and V bytes / time), DCA and plain, timed eagerly (host launch work included: a
floor of ~95 us per call was seen) and replayed from a CUDA graph (kernel time, as the engine runs
it). A cross-check compares the fused kernel with the three-call composition on one 16k DCA input.

    python dev/cuda/attention.py [--lengths 4096,...] [--shapes 32x8x128,9x3x64] [--json out.json]

Measured on an H200 (fp16 DCA, 32k tokens; full tables in docs/results.md): mma.sync 9x3x64 4.83 ms with
(2, 128) vs 5.17 with (2, 64); 32x8x128 32.8 ms with (2, 64) vs 35.8 with (2, 32). wgmma 9x3x64 2.96 ms with
(128, 3, 3), 2.97 with (128, 3, 4), 3.90 with (128, 2, 3); 32x8x128 21.5 ms with (128, 2, 3), 22.7 with
(64, 2, 3). Queries rotated once per relation outside the kernel (three precomputed copies) cost 5-6%
over rotating them in the kernel; that variant was removed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.backends.cuda import flash_attention as fa  # noqa: E402
from engine.config import DCAConfig, RopeConfig  # noqa: E402
from engine.dca import blockwise_attention, rotate_keys  # noqa: E402
from engine.rope import RotaryTable  # noqa: E402
from engine.weights.bf16 import from_bf16_bits, to_bf16_bits  # noqa: E402

# every configuration measured: head_dim -> (m-tiles per warp, keys per tile) of the mma.sync kernel, and
# -> (keys per tile, consumer warpgroups, K/V buffers) of the sm_90a one; the first of each is production's
VARIANTS = {64: ((2, 128), (2, 64), (1, 64)), 128: ((2, 64), (2, 32), (1, 64), (1, 48))}
WGMMA_VARIANTS = {64: ((128, 3, 3), (128, 3, 4), (128, 2, 3)), 128: ((128, 2, 3), (64, 2, 3), (64, 2, 4))}
assert all(VARIANTS[d][0] == t for d, t in fa.PREFILL_TILES.items())
assert all(WGMMA_VARIANTS[d][0] == t for d, t in fa.WGMMA_TILES.items())

# name -> (Hq, Hkv, head_dim, chunk_size, local_window): Llama-style 4k-trained heads, and SmolLM2 (8k)
SHAPES = {"32x8x128": (32, 8, 128, 3072, 512), "32x8x64": (32, 8, 64, 3072, 512), "9x3x64": (9, 3, 64, 6144, 1024),
          "32x32x128": (32, 32, 128, 3072, 512)}  # the last: Llama-2-7B's MHA (decode variants)
# decode variants (part decode-variants): (keys per warp tile, stages per warp); production is fa.decode_config
DECODE_VARIANTS = ((16, 2), (16, 3), (16, 4), (32, 2), (32, 3), (64, 2))
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


def timed_ms(cp, fn, budget_s: float = 0.15, max_reps: int = 50) -> float:
    """Mean ms of fn() over enough repetitions to fill about budget_s (after one warm-up call)."""
    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = cp.cuda.get_elapsed_time(start, end) / 1e3
    reps = max(2, min(max_reps, math.ceil(budget_s / max(once, 1e-6))))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / reps


def causal_flops(n: int, n_heads: int, head_dim: int) -> float:
    return 4.0 * n * n / 2 * head_dim * n_heads


def bf16_bits(cp, x):
    return to_bf16_bits(x, cp)


def tables(cp, head_dim: int, n_positions: int):
    rot = RotaryTable(RopeConfig(theta=10000.0, dim=head_dim), n_positions)
    return cp.asarray(rot.cos), cp.asarray(rot.sin)


def torch_methods(n_heads: int, head_dim: int, n: int, chunk_len: int):
    """(sdpa, three_call) closures over random bf16 torch tensors, or None without torch + CUDA."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    q, k, v = (torch.randn(1, n_heads, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q_succ, q_inter = q.clone(), q.clone()  # stand-ins for the successive / inter rotations

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def three_call():
        return three_call_dca(torch, (q, q_succ, q_inter), k, v, chunk_len)

    return sdpa, three_call


def three_call_dca(torch, q_by_relation, k, v, chunk_len: int):
    """The reference implementations' DCA over torch's flash kernel: per query chunk, intra (causal),
    successive and inter calls, merged with their log-sum-exps. Tensors (1, H, n, D)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    q_intra, q_succ, q_inter = q_by_relation
    n = q_intra.shape[2]
    outs = []
    for c0 in range(0, n, chunk_len):
        c1 = min(c0 + chunk_len, n)
        parts = [flash(q_intra[:, :, c0:c1], k[:, :, c0:c1], v[:, :, c0:c1], 0.0, True, False)[:2]]
        if c0 >= chunk_len:
            parts.append(flash(q_succ[:, :, c0:c1], k[:, :, c0 - chunk_len:c0], v[:, :, c0 - chunk_len:c0],
                               0.0, False, False)[:2])
        if c0 >= 2 * chunk_len:
            parts.append(flash(q_inter[:, :, c0:c1], k[:, :, :c0 - chunk_len], v[:, :, :c0 - chunk_len],
                               0.0, False, False)[:2])
        lse = torch.stack([p[1] for p in parts])  # (parts, 1, H, rows)
        weights = torch.softmax(lse, dim=0).unsqueeze(-1)
        outs.append((torch.stack([p[0].float() for p in parts]) * weights).sum(0).to(q_intra.dtype))
    return torch.cat(outs, dim=2)


def bench_prefill(cp, shape: str, lengths, rows: list[dict]) -> None:
    for n in lengths:
        rows.append(_prefill_row(cp, shape, n))
        print(json.dumps(rows[-1]), flush=True)
        cp.get_default_memory_pool().free_all_blocks()
        _free_torch()


def _prefill_row(cp, shape: str, n: int) -> dict:
    n_heads, n_kv, head_dim, cs, w = SHAPES[shape]
    dca = DCAConfig(chunk_size=cs, local_window=w)
    cos_t, sin_t = tables(cp, head_dim, n + cs + 1)
    q = bf16_bits(cp, cp.random.standard_normal((n, n_heads, head_dim), dtype=cp.float32))
    k = bf16_bits(cp, cp.random.standard_normal((n, n_kv, head_dim), dtype=cp.float32))
    v = bf16_bits(cp, cp.random.standard_normal((n, n_kv, head_dim), dtype=cp.float32))
    pos = cp.arange(n, dtype=cp.int32)
    flops = causal_flops(n, n_heads, head_dim)

    def fused(**options):
        return lambda: fa.flash_attention(q, k, v, pos, cos_t, sin_t, rope_dim=head_dim, **options)

    methods = {"fused_dca": fused(dca=dca), "fused_causal": fused(dca=None),
               "mma_dca": fused(dca=dca, kernel="mma"), "mma_causal": fused(dca=None, kernel="mma")}
    for tiles in VARIANTS[head_dim][1:]:
        methods[f"mma_dca_{tiles[0]}x{tiles[1]}"] = fused(dca=dca, kernel="mma", tiles=tiles)
    if fa.wgmma_available(cp):
        for tiles in WGMMA_VARIANTS[head_dim][1:]:
            methods["wgmma_dca_" + "x".join(map(str, tiles))] = fused(dca=dca, kernel="wgmma", tiles=tiles)
    baselines = torch_methods(n_heads, head_dim, n, dca.chunk_len)
    if baselines is not None:
        methods["torch_sdpa_causal"], methods["torch_three_call_dca"] = baselines
    row = {"shape": shape, "n": n, "chunk_len": dca.chunk_len}
    for name, fn in methods.items():
        try:
            ms = timed_ms(cp, fn)
            row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        except Exception as exc:  # report and go on: one failing baseline must not hide the others
            row[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return row


def _free_torch() -> None:
    try:
        import torch

        torch.cuda.empty_cache()
    except ImportError:
        pass


def graph_ms(cp, fn, calls: int = 20, reps: int = 20) -> float:
    """Mean ms of one fn() replayed from a CUDA graph of `calls` calls (no host launch cost), the way
    the engine's decode step runs. Captured allocations come from a private pool, as in graph.py."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        fn()  # compiles, opts in to shared memory, warms the pool
        pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            try:
                for _ in range(calls):
                    fn()
            finally:
                graph = stream.end_capture()
        graph.launch(stream)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(reps):
            graph.launch(stream)
        end.record(stream)
        end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / (reps * calls)


def bench_decode(cp, shape: str, n_ctx: int, rows: list[dict]) -> None:
    n_heads, n_kv, head_dim, cs, w = SHAPES[shape]
    cos_t, sin_t = tables(cp, head_dim, n_ctx + cs + 1)
    k = bf16_bits(cp, cp.random.standard_normal((n_ctx, n_kv, head_dim), dtype=cp.float32))
    v = bf16_bits(cp, cp.random.standard_normal((n_ctx, n_kv, head_dim), dtype=cp.float32))
    q = bf16_bits(cp, cp.random.standard_normal((1, n_heads, head_dim), dtype=cp.float32))
    pos = cp.asarray([n_ctx - 1], dtype=cp.int32)
    n_bytes = 2 * n_ctx * n_kv * head_dim * 2
    splits = fa.decode_splits(cp, n_ctx, n_kv, 1, head_dim, "bf16")
    row = {"shape": shape, "decode_context": n_ctx, "splits": splits, "cache_MB": round(n_bytes / 1e6, 1)}
    for name, dca in (("decode_dca", DCAConfig(chunk_size=cs, local_window=w)), ("decode_causal", None)):
        def step():
            return fa.flash_decode(q, k, v, pos, cos_t, sin_t, rope_dim=head_dim, dca=dca, n_splits=splits)

        eager = timed_ms(cp, step, budget_s=0.05, max_reps=200)  # includes the host's launch work
        row[name] = {"eager_us": round(eager * 1e3, 1), "eager_GB/s": round(n_bytes / eager / 1e6, 1)}
        try:
            ms = graph_ms(cp, step)
            row[name].update({"graph_us": round(ms * 1e3, 1), "graph_GB/s": round(n_bytes / ms / 1e6, 1)})
        except Exception as exc:  # capture unsupported here: the eager number stands, marked as such
            row[name]["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
    rows.append(row)
    print(json.dumps(row), flush=True)


def bf16_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| of two bf16 bit-pattern arrays."""
    got, want = from_bf16_bits(got), from_bf16_bits(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


def act_values(cp, x, dtype: str):
    """float32 x as the activations' dtype: bf16 bit patterns or float16."""
    return bf16_bits(cp, x) if dtype == "bf16" else x.astype(cp.float16)


def act_rel_err(got: np.ndarray, want: np.ndarray, dtype: str) -> float:
    if dtype == "bf16":
        return bf16_rel_err(got, want)
    got, want = got.astype(np.float32), want.astype(np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def decode_inputs(cp, shape: str, n_ctx: int, dtype: str = "bf16"):
    """(n_heads, n_kv, head_dim, dca, q (1, Hq, D) in dtype, positions [n_ctx - 1], cos, sin) of a decode step of
    `shape` after n_ctx tokens."""
    n_heads, n_kv, head_dim, cs, w = SHAPES[shape]
    cos_t, sin_t = tables(cp, head_dim, n_ctx + cs + 1)
    q = act_values(cp, cp.random.standard_normal((1, n_heads, head_dim), dtype=cp.float32), dtype)
    pos = cp.asarray([n_ctx - 1], dtype=cp.int32)
    return n_heads, n_kv, head_dim, DCAConfig(chunk_size=cs, local_window=w), q, pos, cos_t, sin_t


def decode_caches(cp, n_ctx: int, n_kv: int, head_dim: int, dtype: str = "bf16"):
    """(dtype | "q8_0", (K, V) random caches of n_ctx tokens, their bytes), one kind after the other."""
    from engine.backends.cuda.kv_q8 import DeviceQ8Rows

    yield dtype, tuple(act_values(cp, cp.random.standard_normal((n_ctx, n_kv, head_dim), dtype=cp.float32), dtype)
                       for _ in range(2)), 4 * n_ctx * n_kv * head_dim
    yield "q8_0", tuple(DeviceQ8Rows(cp.random.randint(-127, 128, (n_ctx, n_kv, head_dim)).astype(cp.int8),
                                     (cp.random.random((n_ctx, n_kv, head_dim // 32)) * 0.02 + 0.001)
                                     .astype(cp.float16)) for _ in range(2)), \
        2 * n_ctx * n_kv * (head_dim + head_dim // 16)


def bench_decode_variants(cp, shape: str, n_ctx: int, rows: list[dict], dtype: str = "bf16",
                          configs=DECODE_VARIANTS) -> None:
    """Decode kernel configurations (DECODE_VARIANTS that fit shared memory) on a 16-bit (dtype) and on a q8_0 K+V
    cache of n_ctx tokens, DCA, activations in dtype: each checked against the production build (equal bit for bit
    where only the stages differ and the split count is the same; else within 16-bit rounding) and timed from a CUDA
    graph (kernel + combine), GB/s of the cache's bytes."""
    n_heads, n_kv, head_dim, dca, q, pos, cos_t, sin_t = decode_inputs(cp, shape, n_ctx, dtype)
    limit = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    for kind, (k, v), n_bytes in decode_caches(cp, n_ctx, n_kv, head_dim, dtype):
        q8 = kind == "q8_0"
        want = cp.asnumpy(fa.flash_decode(q, k, v, pos, cos_t, sin_t, rope_dim=head_dim, dca=dca))
        for config in configs:
            if fa.decode_smem(head_dim, q8, q8, config) > limit:
                continue
            splits = fa.decode_splits(cp, n_ctx, n_kv, 1, head_dim, dtype, q8, q8, config)

            def step(config=config, splits=splits):
                return fa.flash_decode(q, k, v, pos, cos_t, sin_t, rope_dim=head_dim, dca=dca, n_splits=splits,
                                       config=config)

            got = cp.asnumpy(step())
            err = act_rel_err(got, want, dtype)
            ms = graph_ms(cp, step)
            row = {"shape": shape, "dtype": dtype, "decode_context": n_ctx, "cache": kind, "keys": config[0], "stages": config[1],
                   "splits": splits, "us": round(ms * 1e3, 1), "GB/s": round(n_bytes / ms / 1e6, 1),
                   "max_err": err, "ok": err < 1e-2, "equal": bool(np.array_equal(got, want))}
            rows.append(row)
            print(json.dumps(row), flush=True)


def cross_check(cp) -> dict:
    """Fused DCA kernel vs the three-call composition over torch flash, 16k tokens, 9x3x64 (bf16)."""
    import torch

    n_heads, n_kv, head_dim, cs, w = SHAPES["9x3x64"]
    dca = DCAConfig(chunk_size=cs, local_window=w)
    n = 16384
    rot = RotaryTable(RopeConfig(theta=10000.0, dim=head_dim), n + cs + 1)
    cos, sin = torch.tensor(rot.cos, device="cuda"), torch.tensor(rot.sin, device="cuda")

    def rotate(x, positions):  # x (n, H, D) float32, rotate-half at positions (n,)
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        x1, x2 = x[..., :head_dim // 2], x[..., head_dim // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, n_heads, head_dim, device="cuda", generator=g).bfloat16()
    k = torch.randn(n, n_kv, head_dim, device="cuda", generator=g)
    v = torch.randn(n, n_kv, head_dim, device="cuda", generator=g).bfloat16()
    i = torch.arange(n, device="cuda")
    cl = dca.chunk_len
    k_rot = rotate(k, i % cl).bfloat16()
    q_pos = (i % cl, torch.clamp(cl + i % cl, max=cs), torch.full_like(i, min(2 * cl - 1, cs)))
    group = n_heads // n_kv
    as_heads = lambda x: x.permute(1, 0, 2).unsqueeze(0)  # (n, H, D) -> (1, H, n, D)
    q_rel = [as_heads(rotate(q.float(), p).bfloat16()).contiguous() for p in q_pos]
    want = three_call_dca(torch, q_rel, as_heads(k_rot.repeat_interleave(group, dim=1)).contiguous(),
                          as_heads(v.repeat_interleave(group, dim=1)).contiguous(), cl)[0].permute(1, 0, 2)

    to_cp = lambda t: cp.from_dlpack(t.contiguous().view(torch.int16)).view(cp.uint16)
    got = fa.flash_attention(to_cp(q), to_cp(k_rot), to_cp(v), cp.arange(n, dtype=cp.int32),
                             cp.asarray(rot.cos), cp.asarray(rot.sin), rope_dim=head_dim, dca=dca)
    got = torch.from_dlpack(got.view(cp.int16)).view(torch.bfloat16).float()
    err = (got - want.float()).abs()
    return {"cross_check": "fused vs three-call (16k, 9x3x64, bf16)", "max_abs": float(err.max()),
            "mean_abs": float(err.mean())}


def builds(cp) -> list[tuple[int, tuple[str, str, str], dict, int]]:
    """(head_dim, build, flash_attention options, dynamic shared memory) of every configuration this GPU runs."""
    out = [(d, fa.prefill_build(d, t), {"kernel": "mma", "tiles": t}, fa.prefill_smem(d, t))
           for d, ts in VARIANTS.items() for t in ts]
    if fa.wgmma_available(cp):
        out += [(d, fa.wgmma_build(d, t), {"kernel": "wgmma", "tiles": t}, fa.wgmma_smem(d, t))
                for d, ts in WGMMA_VARIANTS.items() for t in ts]
    return out


def check_variants(cp) -> list[dict]:
    """Every configuration against the float32 blockwise reference: DCA (chunk_len 48: boundaries inside every
    tile size), GQA 4, queries 100..399 against keys 0..399, bf16; max and mean |err|."""
    rng = np.random.default_rng(0)
    rows = []
    for head_dim, (_, kernel, _), options, _ in builds(cp):
        dca = DCAConfig(chunk_size=64, local_window=16)
        rotary = RotaryTable(RopeConfig(theta=10000.0, dim=head_dim), 400 + 65)
        q = rng.standard_normal((300, 16, head_dim)).astype(np.float32)
        k = rng.standard_normal((400, 4, head_dim)).astype(np.float32)
        v = rng.standard_normal((400, 4, head_dim)).astype(np.float32)
        k_rot = rotate_keys(k, np.arange(400), rotary, dca)
        bits = [bf16_bits(cp, cp.asarray(x)) for x in (q, k_rot, v)]
        as_f32 = [from_bf16_bits(cp.asnumpy(b)) for b in bits]
        positions = np.arange(100, 400)
        want = blockwise_attention(as_f32[0], as_f32[1], as_f32[2], positions, rotary, dca)
        got = fa.flash_attention(*bits, cp.asarray(positions.astype(np.int32)), cp.asarray(rotary.cos),
                                 cp.asarray(rotary.sin), rope_dim=head_dim, dca=dca, **options)
        err = np.abs(from_bf16_bits(cp.asnumpy(got)) - want)
        rows.append({"check": kernel, "max_abs": float(err.max()), "mean_abs": float(err.mean()),
                     "ok": bool(np.isfinite(err).all() and err.max() < 0.05 and err.mean() < 0.005)})
    return rows


def bench_decode_splits(cp, shape: str, n_ctx: int, rows: list[dict]) -> None:
    """The production decode build on a bf16 and a q8_0 cache of n_ctx tokens at several key-slice counts around
    decode_splits' choice (one wave of resident blocks): how the blocks' waves on the SMs set the time. Each count
    checked against the default's output (within bf16 rounding), timed from a CUDA graph (kernel + combine)."""
    n_heads, n_kv, head_dim, dca, q, pos, cos_t, sin_t = decode_inputs(cp, shape, n_ctx)
    for kind, (k, v), n_bytes in decode_caches(cp, n_ctx, n_kv, head_dim):
        q8 = kind == "q8_0"
        chosen = fa.decode_splits(cp, n_ctx, n_kv, 1, head_dim, "bf16", q8, q8)
        kernel = fa._kernel(fa.decode_build(head_dim, q8, q8), "bf16")
        slots = fa.sm_count(cp) * fa.blocks_per_sm(cp, kernel, fa.decode_smem(head_dim, q8, q8))
        want = cp.asnumpy(fa.flash_decode(q, k, v, pos, cos_t, sin_t, rope_dim=head_dim, dca=dca))
        for splits in sorted({max(1, chosen + d) for d in (-chosen // 2, -1, 0, 1, chosen)}
                             | {max(1, slots // n_kv), 2 * max(1, slots // n_kv)}):
            def step(splits=splits):
                return fa.flash_decode(q, k, v, pos, cos_t, sin_t, rope_dim=head_dim, dca=dca, n_splits=splits)

            err = bf16_rel_err(cp.asnumpy(step()), want)
            ms = graph_ms(cp, step)
            row = {"shape": shape, "decode_context": n_ctx, "cache": kind, "slots": slots, "splits": splits,
                   "blocks": splits * n_kv, "chosen": splits == chosen, "us": round(ms * 1e3, 1),
                   "GB/s": round(n_bytes / ms / 1e6, 1), "max_err": err, "ok": err < 1e-2}
            rows.append(row)
            print(json.dumps(row), flush=True)


def kernel_resources(cp) -> list[dict]:
    """Registers, local memory (spills) and dynamic shared memory of every fused kernel, bf16 builds."""
    from engine.backends.cuda.kernels import function

    out = []
    for _, (file, kernel, instance), _, smem in builds(cp):
        fn = function(file, kernel, "bf16", instance=instance)
        out.append({"kernel": kernel, "regs": fn.num_regs, "local_bytes": fn.local_size_bytes, "dyn_smem": smem})
    for d in fa.DECODE_CONFIG:
        file, kernel, instance = fa.decode_build(d)
        fn = function(file, kernel, "bf16", instance=instance)
        out.append({"kernel": kernel, "regs": fn.num_regs, "local_bytes": fn.local_size_bytes,
                    "static_smem": fn.shared_size_bytes, "dyn_smem": fa.decode_smem(d)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--decode-context", type=int, default=131072)
    ap.add_argument("--parts", default="variants,prefill,decode,check,resources",
                    help="comma list of variants (each configuration vs the numpy reference), prefill, decode, "
                         "decode-variants (DECODE_VARIANTS on bf16 and q8_0 caches at --decode-context), "
                         "decode-splits (key-slice counts around the production choice), "
                         "check (fused vs three-call), resources")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "f16"),
                    help="activations (and 16-bit caches) of decode-variants")
    ap.add_argument("--configs", default=",".join(f"{k}x{s}" for k, s in DECODE_VARIANTS),
                    help="decode-variants' configurations, KEYSxSTAGES")
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args(argv)
    import cupy as cp

    parts = set(args.parts.split(","))
    shapes = args.shapes.split(",")
    rows: list[dict] = []
    if "variants" in parts:
        for r in check_variants(cp):
            rows.append(r)
            print(json.dumps(r), flush=True)
    if "prefill" in parts:
        for shape in shapes:
            bench_prefill(cp, shape, [int(x) for x in args.lengths.split(",") if x], rows)
    if "decode" in parts:
        for shape in shapes:
            bench_decode(cp, shape, args.decode_context, rows)
    if "decode-variants" in parts:
        for shape in shapes:
            bench_decode_variants(cp, shape, args.decode_context, rows, args.dtype,
                                  [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")])
    if "decode-splits" in parts:
        for shape in shapes:
            bench_decode_splits(cp, shape, args.decode_context, rows)
    if "check" in parts:
        rows.append(cross_check(cp))
        print(json.dumps(rows[-1]), flush=True)
    if "resources" in parts:
        for r in kernel_resources(cp):
            rows.append(r)
            print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
