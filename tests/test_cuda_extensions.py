"""Self-Extend and StreamingLLM on the CUDA backend (engine/backends/cuda/extension.py) against the numpy backend.

CPU tests (no mark): the CUDA path's host logic with numpy standing in for CuPy (the key tables the kernels
store keys with; the composed attention over an activation-dtype cache). GPU tests (marker `cuda`): a tiny random
model (training context 256) with a prompt past the Self-Extend window / the StreamingLLM sinks + window, so the
grouped and evicted relations are exercised: prefill logits and cache rows close to the CPU backend's, greedy
decode equal (the tolerances of tests/test_cuda_model.py), the fused decode step equal to the composed one,
StreamingLLM never reading evicted keys, and `engine eval ppl` / `passkey` with --device cuda.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from engine import dca as dca_ops
from engine import tiled_attention as T
from engine.backends.cuda import extension
from engine.config import RopeConfig
from engine.kvcache import KVCache
from engine.rope import RotaryTable, rotate_with
from engine.self_extend import SelfExtendConfig
from engine.streaming import StreamingConfig
from engine.weights.bf16 import from_bf16_bits, to_bf16_bits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import VARIANTS, make_tiny_model  # noqa: E402
from gpu_greedy import GREEDY, assert_follows_cpu, greedy_on_gpu  # noqa: E402
from prenorm_emulation import DECODE_STEP_TOL, PRENORMED_TOL, staging_only  # noqa: E402

DTYPES = ("f16", "bf16")
SELF_EXTEND = {"grp_attn_n": 4, "grp_attn_w": 48}
STREAMING = {"streaming_sinks": 4, "streaming_window": 60}
EXTENSIONS = {"self-extend": SELF_EXTEND, "streaming": STREAMING}
CONTEXT = 512
PROMPT = 400  # past W = 48 and S + R = 64: grouped keys and evicted keys in most pairs
# tests/test_cuda_model.py's, from its numpy emulation of the activation rounding
LOGITS_TOL = {"f16": 1e-2, "bf16": 3e-2}
FUSED_TOL = {"f16": 1e-3, "bf16": 3e-3}
ROUND = {"f16": lambda x: x.astype(np.float16).astype(np.float32),
         "bf16": lambda x: from_bf16_bits(to_bf16_bits(x))}


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# ---- CPU: the CUDA path's host logic, numpy standing in for CuPy -----------------------------------------

@pytest.mark.parametrize("scheme", [SelfExtendConfig(4, 12), SelfExtendConfig(3, 7), StreamingConfig(4, 20)])
def test_key_tables_rotate_each_row_to_its_cached_position(scheme):
    """The kernels rotate the key of row j by row j of the tables they get: with the key tables that is the
    rotation at the scheme's cached key position (the numpy backend's cache), YaRN's cos/sin factor once."""
    rope = RopeConfig(dim=24, scaling="yarn", factor=4.0, original_context=32)
    n = 150
    rotary = RotaryTable(rope, n)
    tables = (rotary.cos, rotary.sin)
    cos, sin = extension.key_tables(np, rotary, scheme, tables)
    assert cos.shape == rotary.cos.shape and cos.dtype == np.float32
    k = np.random.default_rng(1).standard_normal((n, 2, 32)).astype(np.float32)
    j = np.arange(n)
    np.testing.assert_array_equal(rotate_with(k, cos[j], sin[j], rope.dim), T.rotate_keys(k, j, rotary, scheme))
    assert (cos is tables[0]) == isinstance(scheme, StreamingConfig)  # StreamingLLM caches at j: the tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", [SelfExtendConfig(4, 12), StreamingConfig(3, 25)])
@pytest.mark.parametrize("start,n", [(0, 140), (139, 1), (90, 50)])
def test_composed_attention_on_an_activation_cache_matches_the_reference(dtype, scheme, start, n):
    """extension.attention (what the CUDA backend runs) with numpy arrays: the cache in the activation dtype
    (fp16, or bf16 bits), the rows at cache.length .. + n - 1, the attention temperature, GQA."""
    rng = np.random.default_rng(start + n)
    n_k, n_heads, n_kv, head_dim = start + n, 6, 2, 32
    rotary = RotaryTable(RopeConfig(dim=head_dim), 256)
    q, k, v = (ROUND[dtype](rng.standard_normal(s).astype(np.float32))
               for s in [(n, n_heads, head_dim), (n_k, n_kv, head_dim), (n_k, n_kv, head_dim)])
    backend = SimpleNamespace(cp=np, dtype=dtype, rotary_tables=lambda r: (r.cos, r.sin))
    act = np.float16 if dtype == "f16" else np.uint16
    encode = (lambda x: x.astype(np.float16)) if dtype == "f16" else to_bf16_bits
    cache = KVCache(1, 256, n_kv, head_dim, dtype=act)
    cache.k[0, :n_k] = encode(T.rotate_keys(k, np.arange(n_k), rotary, scheme))
    cache.v[0, :n_k] = encode(v)
    cache.length = start
    out = extension.attention(backend, encode(q), cache, 0, rotary, scheme, temperature_length=64)
    assert out.dtype == act and out.shape == (n, n_heads, head_dim)
    positions = np.arange(start, start + n)
    ref = T.reference_attention(q, k, v, positions, rotary, scheme, logit_scale=dca_ops.temperature(positions, 64))
    got = from_bf16_bits(out) if dtype == "bf16" else out.astype(np.float32)
    assert rel_err(got, ref) < {"f16": 2e-3, "bf16": 2e-2}[dtype]


def emulated_pass(q, p, cos, sin, rope_dim: int):
    """What flash_attention does with a Pass (its docstring), in float64 numpy: -> unnormalized o (n, Hq, D) and the
    natural-log max m, sum l (n, Hq) of the scores of the keys query i sees."""
    n, n_heads, head_dim = q.shape
    k, v = (from_bf16_bits(x).astype(np.float64) if x.dtype == np.uint16 else x.astype(np.float64) for x in (p.k, p.v))
    group = n_heads // k.shape[1]
    q_rot = rotate_with(q.astype(np.float64), cos[p.rot_positions], sin[p.rot_positions], rope_dim)
    o, m, l = np.zeros(q.shape), np.full((n, n_heads), -np.inf), np.zeros((n, n_heads))
    for i in range(n):
        lo = max(0, p.positions[i] - p.window + 1) if p.window else 0
        keys = np.arange(lo, p.positions[i] + 1)
        if len(keys) == 0:
            continue
        for h in range(n_heads):
            scores = k[keys, h // group] @ q_rot[i, h] / math.sqrt(head_dim)
            m[i, h] = scores.max()
            weights = np.exp(scores - m[i, h])
            l[i, h], o[i, h] = weights.sum(), weights @ v[keys, h // group]
    return o, m, l


@pytest.mark.parametrize("scheme", [SelfExtendConfig(4, 12), SelfExtendConfig(3, 7), SelfExtendConfig(1, 5),
                                    StreamingConfig(4, 20), StreamingConfig(0, 9), StreamingConfig(3, 200)], ids=repr)
@pytest.mark.parametrize("start,n", [(0, 140), (139, 1), (90, 50), (0, 3), (2, 1)])
def test_passes_merged_equal_the_reference(scheme, start, n):
    """The passes extension.fused_attention gives the flash kernel (self_extend_passes, streaming_passes), run as
    its docstring says (emulated_pass) and merged as dca_combine merges partials: the scheme's attention, YaRN's
    cos/sin factor included (Self-Extend's neighbour keys rotated on from their cached positions, fp16 cache)."""
    rng = np.random.default_rng(start + n)
    n_k, n_heads, n_kv, head_dim = start + n, 6, 2, 32
    rope = RopeConfig(dim=head_dim, scaling="yarn", factor=4.0, original_context=64)
    rotary = RotaryTable(rope, 256)
    q, k, v = (ROUND["f16"](rng.standard_normal(s).astype(np.float32))
               for s in [(n, n_heads, head_dim), (n_k, n_kv, head_dim), (n_k, n_kv, head_dim)])
    k_cache = T.rotate_keys(k, np.arange(n_k), rotary, scheme).astype(np.float16)
    backend = SimpleNamespace(cp=np, dtype="f16", rotary_tables=lambda r: (r.cos, r.sin))
    if isinstance(scheme, SelfExtendConfig):
        passes = extension.self_extend_passes(backend, k_cache, v.astype(np.float16), start, n, rotary, scheme)
    else:
        passes = extension.streaming_passes(k_cache, v.astype(np.float16), start, n, scheme)
    parts = [emulated_pass(q, p, rotary.cos, rotary.sin, rope.dim) for p in passes]
    m = np.max([part[1] for part in parts], axis=0)
    weights = [np.exp(part[1] - m) for part in parts]  # 0 for a pass where a query sees no key
    o = sum(part[0] * w[..., None] for part, w in zip(parts, weights))
    l = sum(part[2] * w for part, w in zip(parts, weights))
    ref = T.reference_attention(q, k, v, np.arange(start, n_k), rotary, scheme)
    assert rel_err(o / l[..., None], ref) < 2e-3  # the fp16 cache's rounding


def test_backend_key_tables_only_for_extensions_and_made_once():
    """CudaBackend.key_tables (numpy standing in for CuPy): the rotary tables themselves for plain attention and
    DCA (whose kernels take chunk_len), a scheme's own tables, kept per (rotary table, scheme)."""
    import weakref

    from engine.backends.cuda import CudaBackend
    from engine.config import DCAConfig

    backend = CudaBackend.__new__(CudaBackend)
    backend.cp, backend._tables, backend._key_tables = np, weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
    rotary = RotaryTable(RopeConfig(dim=16), 64)
    dca = DCAConfig(48, 16)
    plain = backend.rotary_tables(rotary)
    assert backend.key_tables(rotary, None) is plain and backend.key_tables(rotary, dca) is plain
    assert backend.key_tables(rotary, StreamingConfig(4, 20)) is plain
    grouped = backend.key_tables(rotary, SelfExtendConfig(4, 8))
    assert backend.key_tables(rotary, SelfExtendConfig(4, 8)) is grouped
    np.testing.assert_array_equal(grouped[0], rotary.cos[np.arange(64) // 4])
    np.testing.assert_array_equal(grouped[1], rotary.sin[np.arange(64) // 4])
    assert backend.key_tables(rotary, SelfExtendConfig(2, 8)) is not grouped
    assert [extension.chunk_len_of(x) for x in (None, dca, SelfExtendConfig(4, 8), StreamingConfig(4, 20))] == [
        0, dca.chunk_len, 0, 0]


def test_query_tiles_keep_the_scores_within_their_budget():
    for n_heads in (1, 4, 32, 64, 10_000):
        rows = extension.query_tile_rows(n_heads)
        assert 16 <= rows <= 1024 and (rows == 16 or n_heads * rows * extension.BLOCK_K * 4 <= extension.SCORES_BYTES)
    assert extension.query_tile_rows(32) == 512


# ---- GPU: the flash kernel's passes against the reference ---------------------------------------------------

PASS_SCHEMES = [SelfExtendConfig(4, 48), SelfExtendConfig(3, 100), StreamingConfig(4, 60), StreamingConfig(0, 100),
                StreamingConfig(3, 130)]
PASS_TOL = {"f16": 3e-3, "bf16": 2e-2}  # the composed path's (above), Self-Extend's re-rotated keys rounded once more


def device_case(cp, dtype, scheme, rotary, k, v, first):
    """A stand-in CUDA backend and one-layer cache (1024 rows) of the activation dtype holding k (n_k, Hkv, D) at
    the scheme's cached positions and v, length `first` -> (backend, cache, encode: float32 -> activations)."""
    encode = (lambda x: x.astype(np.float16)) if dtype == "f16" else to_bf16_bits
    k_cache = np.zeros((1, 1024) + k.shape[1:], dtype=np.float16 if dtype == "f16" else np.uint16)
    v_cache = k_cache.copy()
    k_cache[0, :len(k)] = encode(T.rotate_keys(k, np.arange(len(k)), rotary, scheme))
    v_cache[0, :len(v)] = encode(v)
    tables = (cp.asarray(rotary.cos), cp.asarray(rotary.sin))
    backend = SimpleNamespace(cp=cp, dtype=dtype, rotary_tables=lambda r: tables,
                              launch_1d=lambda file, kernel, n, args: extension_launch(cp, dtype, file, kernel, n, args))
    return backend, SimpleNamespace(k=cp.asarray(k_cache), v=cp.asarray(v_cache), length=first), encode


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3, 64, "yarn"), (32, 8, 128, "plain"), (8, 8, 128, "plain")], ids=str)
@pytest.mark.parametrize("scheme", PASS_SCHEMES, ids=repr)
@pytest.mark.parametrize("first,n", [(0, 700), (500, 200), (699, 1), (0, 40), (1, 1)])
def test_fused_passes_match_the_reference(dtype, heads, scheme, first, n):
    """extension.fused_attention (the flash kernel's passes merged by one combine) against the numpy backend's
    attention (tiled_attention.blockwise_attention, float32 on the host; test_passes_merged_equal_the_reference
    ties the passes to the float64 reference): prompts, chunked prefill past the windows, one-token decode, prompts
    within the windows; GQA groups 3, 4 and 1; head_dim 64 (YaRN's cos/sin factor) and 128."""
    cp = pytest.importorskip("cupy")
    n_heads, n_kv, head_dim, scaling = heads
    rope = RopeConfig(dim=head_dim, scaling="yarn", factor=4.0, original_context=256) if scaling == "yarn" \
        else RopeConfig(dim=head_dim)
    rotary = RotaryTable(rope, 1024)
    rng = np.random.default_rng([first, n, head_dim, n_heads])
    n_k = first + n
    q, k, v = (ROUND[dtype](rng.standard_normal(s).astype(np.float32))
               for s in [(n, n_heads, head_dim), (n_k, n_kv, head_dim), (n_k, n_kv, head_dim)])
    backend, cache, encode = device_case(cp, dtype, scheme, rotary, k, v, first)
    assert extension.fused_reason(head_dim, rope.dim, n_heads, n_kv, None) is None
    out = extension.fused_attention(backend, cp.asarray(encode(q)), cache, 0, rotary, scheme)
    got = from_bf16_bits(cp.asnumpy(out)) if dtype == "bf16" else cp.asnumpy(out).astype(np.float32)
    stored = cp.asnumpy(cache.k[0, :n_k])
    cached = from_bf16_bits(stored) if dtype == "bf16" else stored.astype(np.float32)
    ref = T.blockwise_attention(q, cached, v, np.arange(first, n_k), rotary, scheme)
    err = rel_err(got, ref)
    print(f"{scheme} {heads} {dtype} first {first} n {n}: rel err {err:.2e}")
    assert err < PASS_TOL[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", PASS_SCHEMES, ids=repr)
def test_decode_passes_equal_the_prompt_passes(dtype, scheme):
    """extension.decode_attention (positions made on the device from the token's slot: self_extend_window,
    streaming_plan) equals fused_attention for that one token (positions from the host), at positions before, at
    and past the windows and sinks (YaRN's cos/sin factor on the re-rotated neighbour keys)."""
    cp = pytest.importorskip("cupy")
    n_heads, n_kv, head_dim = 8, 2, 64
    rotary = RotaryTable(RopeConfig(dim=head_dim, scaling="yarn", factor=4.0, original_context=256), 1024)
    rng = np.random.default_rng(3)
    n_k = 400
    k, v = (ROUND[dtype](rng.standard_normal((n_k, n_kv, head_dim)).astype(np.float32)) for _ in range(2))
    backend, cache, encode = device_case(cp, dtype, scheme, rotary, k, v, 0)
    for position in (0, 2, 3, 4, 47, 48, 49, 59, 63, 64, 99, 100, 129, 130, 133, 134, 399):
        q = cp.asarray(encode(ROUND[dtype](rng.standard_normal((1, n_heads, head_dim)).astype(np.float32))))
        cache.length = position
        host = cp.asnumpy(extension.fused_attention(backend, q, cache, 0, rotary, scheme))
        slot = cp.asarray([position], dtype=cp.int32)
        device = cp.asnumpy(extension.decode_attention(backend, q, cache, 0, slot, rotary, scheme))
        got, ref = ((from_bf16_bits(x) if dtype == "bf16" else x.astype(np.float32)) for x in (device, host))
        assert rel_err(got, ref) < 1e-3 * (8 if dtype == "bf16" else 1), f"position {position}"


def extension_launch(cp, dtype, file, kernel, n_threads, args):
    """CudaBackend.launch_1d for a stand-in backend."""
    from engine.backends.cuda import ELEMENTWISE_THREADS
    from engine.backends.cuda.kernels import function

    function(file, kernel, dtype)((-(-n_threads // ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,), args)


@pytest.mark.cuda
def test_pass_arguments_are_checked():
    """flash_attention's pass arguments: no DCA chunks, not the wgmma kernel, a window >= 0, rot_positions like
    positions, partials of at least one slice."""
    cp = pytest.importorskip("cupy")
    from engine.backends.cuda import flash_attention as fa
    from engine.config import DCAConfig
    from engine.errors import ConfigError

    q = cp.zeros((4, 8, 64), dtype=cp.float16)
    kv = cp.zeros((16, 2, 64), dtype=cp.float16)
    positions = cp.arange(4, dtype=cp.int32)
    tables = (cp.zeros((16, 32), dtype=cp.float32),) * 2
    parts = (cp.zeros((2, 32, 64), dtype=cp.float32), cp.zeros((2, 32), dtype=cp.float32),
             cp.zeros((2, 32), dtype=cp.float32))
    bad = [{"window": 4, "dca": DCAConfig(8, 4)}, {"window": 4, "kernel": "wgmma"}, {"window": -1},
           {"rot_positions": cp.arange(3, dtype=cp.int32)}, {"rot_positions": cp.arange(4, dtype=cp.int64)},
           {"partials": tuple(p[:0] for p in parts)}, {"partials": (parts[0], parts[1], parts[2][:, :8])}]
    for options in bad:
        with pytest.raises(ConfigError):
            fa.flash_attention(q, kv, kv, positions, *tables, rope_dim=64, **options)
    assert fa.flash_attention(q, kv, kv, positions, *tables, rope_dim=64, window=2, partials=parts) is None
    one = tuple(p[:1] for p in parts)  # one slice: the kernel leaves partials all the same
    assert fa.flash_attention(q, kv, kv, positions, *tables, rope_dim=64, window=2, partials=one) is None


# ---- GPU: the tiny model against the CPU backend ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("gguf")
    paths = {}
    for variant in ("gqa", "d64", "qwen2"):
        made = make_tiny_model(tmp_path_factory.mktemp(variant), VARIANTS[variant], gguf_types=("q8_0",), hf=False)
        paths[variant] = made["q8_0"]
    return paths


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["gqa", "d64"])
@pytest.mark.parametrize("method", sorted(EXTENSIONS))
def test_prefill_logits_and_cache_match_cpu(tiny, method, variant, dtype):
    flags = EXTENSIONS[method]
    ids = np.random.default_rng(2).integers(3, 384, PROMPT).tolist()
    cpu = engine.load(tiny[variant], device="cpu", context=CONTEXT, **flags)
    gpu = engine.load(tiny[variant], device="cuda", context=CONTEXT, dtype=dtype, **flags)
    assert gpu.extension == cpu.extension is not None and gpu.dca is None
    cpu_cache, gpu_cache = cpu.new_cache(), gpu.new_cache()
    cpu_logits = cpu.model.forward(np.asarray(ids), cpu_cache)
    gpu_logits = gpu.backend.to_numpy(gpu.model.forward(np.asarray(ids), gpu_cache))
    err = rel_err(gpu_logits, cpu_logits)
    print(f"{method} {variant} {dtype}: prefill logits rel err {err:.2e}")
    assert err < LOGITS_TOL[dtype]
    for name in ("k", "v"):  # keys rotated at the scheme's cached positions, as the CPU caches them
        got = gpu.backend.to_numpy(getattr(gpu_cache, name)[:, :PROMPT])
        assert rel_err(got, getattr(cpu_cache, name)[:, :PROMPT]) < LOGITS_TOL[dtype]
    plain = engine.load(tiny[variant], device="cpu", context=CONTEXT, dca="off").logits(ids)
    assert rel_err(gpu_logits, plain) > 10 * err  # the method is in force (plain RoPE: 0.5 .. 1.0 away here)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["gqa", "d64", "qwen2"])
@pytest.mark.parametrize("method", sorted(EXTENSIONS))
def test_greedy_decode_matches_cpu(tiny, method, variant, dtype):
    """Prefill past the window, then 24 decode steps (the fused GEMVs, eager): the CPU's greedy tokens, or a
    divergence only where the CPU's top-2 logits are within the activation dtype's error."""
    flags = EXTENSIONS[method]
    prompt = np.random.default_rng(5).integers(3, 384, PROMPT).tolist()
    cpu = engine.load(tiny[variant], device="cpu", context=CONTEXT, **flags)
    gpu = engine.load(tiny[variant], device="cuda", context=CONTEXT, dtype=dtype, **flags)
    cpu_tokens = list(cpu.generate_ids(prompt, 24, GREEDY, stop_ids=[]))
    gpu_tokens, cache, decoder = greedy_on_gpu(gpu, prompt, 24)
    # head_dim 64 (d64, qwen2): the flash kernel's passes, a CUDA graph; 16 (gqa): the composed path, eager steps
    assert (decoder.state.graph is not None) == (variant != "gqa") and cache.length == PROMPT + 23
    assert len(cpu_tokens) == len(gpu_tokens) == 24
    assert_follows_cpu(cpu, prompt, cpu_tokens, gpu_tokens, dtype, f"{method} {variant} {dtype}")
    if decoder.state.graph is not None:  # the replayed graph computes what the same step computes eagerly
        assert greedy_on_gpu(gpu, prompt, 24, use_graph=False)[0] == gpu_tokens


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(EXTENSIONS))
def test_decode_steps_logits_match_cpu(tiny, method, dtype):
    """Token by token after the prefill, the one-token forward's logits (the fused step) stay close to the CPU's:
    within the int8 GEMV input's distance (tests/prenorm_emulation.py DECODE_STEP_TOL)."""
    flags = EXTENSIONS[method]
    ids = np.random.default_rng(7).integers(3, 384, PROMPT + 8)
    cpu = engine.load(tiny["d64"], device="cpu", context=CONTEXT, **flags)
    gpu = engine.load(tiny["d64"], device="cuda", context=CONTEXT, dtype=dtype, **flags)
    cpu_cache, gpu_cache = cpu.new_cache(), gpu.new_cache()
    cpu.model.forward(ids[:PROMPT], cpu_cache, logits_for="none")
    gpu.model.forward(ids[:PROMPT], gpu_cache, logits_for="none")
    for t in range(PROMPT, PROMPT + 8):
        cpu_row = cpu.model.forward(ids[t:t + 1], cpu_cache)
        gpu_row = gpu.backend.to_numpy(gpu.model.forward(ids[t:t + 1], gpu_cache))
        err = rel_err(gpu_row, cpu_row)
        assert err < DECODE_STEP_TOL[dtype], f"{method} {dtype}: step {t} rel err {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(EXTENSIONS))
@pytest.mark.parametrize("prenormed", ["prenormed", "staged"])
def test_fused_decode_step_equals_composed(tiny, method, dtype, prenormed):
    """The fused step (qkv kernel storing through the key tables) computes what the composed blocks do: to summation
    order with every RMSNorm-fused product staging its input, within the prenormed inputs' rounding
    (tests/prenorm_emulation.py PRENORMED_TOL, measured on this model too) with them."""
    from engine.backends.cuda.fused import FusedBlocks

    llm = engine.load(tiny["d64"], device="cuda", context=CONTEXT, dtype=dtype, **EXTENSIONS[method])
    model, backend, c = llm.model, llm.backend, llm.config
    assert isinstance(model.decode_blocks, FusedBlocks) and all(model.decode_blocks.fused_attention)
    assert model.decode_blocks.normed_head  # Q8_0: the extensions keep the prenormed inputs
    if prenormed == "staged":
        staging_only(model.decode_blocks)
    tol = (PRENORMED_TOL["logits"], PRENORMED_TOL["rows"]) if prenormed == "prenormed" else (FUSED_TOL[dtype],) * 2
    prompt = np.random.default_rng(6).integers(3, 384, PROMPT)
    caches = [backend.new_cache(c.n_layers, CONTEXT, c.n_kv_heads, c.head_dim) for _ in range(2)]
    for cache in caches:
        model.forward(prompt, cache, logits_for="none")
    token, position = backend.tokens([77]), backend.positions(PROMPT, 1)
    fused = backend.to_numpy(model.compute(token, position, caches[0], "last"))
    model.decode_blocks = model  # the composed blocks
    composed = backend.to_numpy(model.compute(token, position, caches[1], "last"))
    assert rel_err(fused, composed) < tol[0]
    for name in ("k", "v"):
        rows = [backend.to_numpy(getattr(cache, name)[:, PROMPT]) for cache in caches]
        assert rel_err(rows[0], rows[1]) < tol[1]


@pytest.mark.cuda
@pytest.mark.parametrize("n_new", [1, 50])
def test_streaming_never_reads_evicted_keys(tiny, n_new):
    """NaN in the device cache rows every new query has evicted (between the sinks and the windows) change
    nothing: StreamingLLM's attention reads only sinks + window, in prefill and decode."""
    llm = engine.load(tiny["d64"], device="cuda", context=CONTEXT, **STREAMING)
    sinks, window = STREAMING["streaming_sinks"], STREAMING["streaming_window"]
    ids = np.random.default_rng(8).integers(3, 384, PROMPT + n_new)
    cache = llm.new_cache()
    llm.model.forward(ids[:PROMPT], cache, logits_for="none")
    clean = llm.backend.to_numpy(llm.model.forward(ids[PROMPT:], cache))
    cache.truncate(PROMPT)
    evicted = slice(sinks, PROMPT - window + 1)  # hidden from the query at PROMPT and every later one
    cache.k[:, evicted] = math.nan
    cache.v[:, evicted] = math.nan
    poisoned = llm.backend.to_numpy(llm.model.forward(ids[PROMPT:], cache))
    np.testing.assert_array_equal(poisoned, clean)


EVAL_ARGS = {"ppl": ["--lengths", "512", "--windows", "1"],
             "passkey": ["--lengths", "512", "--depths", "0,1", "--trials", "1", "-n", "4"],
             "ruler": ["--lengths", "700", "--tasks", "niah_single_1", "--samples", "1"]}


@pytest.mark.cuda
@pytest.mark.parametrize("command", sorted(EVAL_ARGS))
def test_eval_runs_the_methods_on_cuda(tiny, tmp_path, command):
    """engine eval ppl|passkey|ruler --method self-extend,streaming --device cuda: every cell runs with the
    settings the CPU's run uses; perplexity within the fp16 logits' error of the CPU's, the same prompts."""
    from engine.eval.commands import eval_group

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and {i % 13}." for i in range(3000)))
    args = EVAL_ARGS[command] + (["--text", str(text)] if command == "ppl" else [])
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{command}-{device}.json"
        result = CliRunner().invoke(eval_group, [command, "-m", str(tiny["gqa"]), "--device", device,
                                                 "--method", "self-extend,streaming", "--json", str(out), *args])
        assert result.exit_code == 0, result.output
        runs[device] = json.loads(out.read_text())
    assert runs["cuda"]["device"] == "cuda" and runs["cuda"]["complete"]
    cpu_cells, gpu_cells = runs["cpu"]["cells"], runs["cuda"]["cells"]
    assert [c["method"] for c in gpu_cells] == [c["method"] for c in cpu_cells]
    assert {c["method"] for c in gpu_cells} == {"self-extend", "streaming"}
    for cpu_cell, gpu_cell in zip(cpu_cells, gpu_cells):
        if command == "ppl":
            assert (gpu_cell["self_extend"], gpu_cell["streaming"]) == (cpu_cell["self_extend"], cpu_cell["streaming"])
            assert gpu_cell["nll"] == pytest.approx(cpu_cell["nll"], rel=1e-2)
        else:
            prompts = [[r["prompt_tokens"] for r in cell["results"]] for cell in (cpu_cell, gpu_cell)]
            assert prompts[0] == prompts[1]
