"""Each CUDA kernel against the numpy reference backend, on fresh random inputs (marker `cuda`).

Tolerances (relative L2 error ||gpu - ref|| / ||ref||): fp16 outputs 3e-3 (fp16 rounding ~5e-4 per
value plus fp16 inputs), fp32 outputs of fp32 math 1e-5, attention 3e-3 (fp16 q/k/v and output).
"""
from __future__ import annotations

import numpy as np
import pytest

from engine import dca as dca_ops
from engine.backends.numpy_backend import NumpyBackend
from engine.bench import synthetic_weight
from engine.config import DCAConfig, RopeConfig
from engine.rope import RotaryTable
from engine.sampling import SamplingParams, apply_repeat_penalty
from engine.weights.quant import GGMLType

pytestmark = pytest.mark.cuda

FP16_TOL = 3e-3
QUANT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
               GGMLType.Q4_K, GGMLType.Q6_K)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def cuda():
    from engine.backends.cuda import CudaBackend

    return CudaBackend()


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def fp16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(77, 256), (300, 512), (1, 768)])
def test_linear_gemv_and_gemm(cuda, rng, ggml_type, rows, cols):
    from engine.backends.cuda.weights import upload_weight

    tensor = synthetic_weight("blk.0.ffn_up", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
    w_ref = tensor.dequantize()
    w_dev = upload_weight(cuda.cp, tensor.name, tensor)
    for n in (1, 5, 130):
        x = fp16(rng.standard_normal((n, cols)))
        got = cuda.to_numpy(cuda.linear(cuda.cp.asarray(x.astype(np.float16)), w_dev))
        assert got.shape == (n, rows)
        assert rel_err(got, x @ w_ref.T) < FP16_TOL, (ggml_type.name, n)
    # the fp16 scratch holds exactly the dequantized weights (up to fp16 rounding)
    assert rel_err(cuda.cp.asnumpy(cuda.matrices.dequantize(w_dev)), w_ref) < 1e-3


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_output_head_logits_are_fp32(cuda, rng, ggml_type):
    from engine.backends.cuda.weights import upload_weight

    tensor = synthetic_weight("output", ggml_type, (1000, 256), rng, 1 / 16)
    w_dev = upload_weight(cuda.cp, "output", tensor)
    for n in (1, 7):
        x = fp16(rng.standard_normal((n, 256)))
        got = cuda.linear(cuda.cp.asarray(x.astype(np.float16)), w_dev)
        assert got.dtype == cuda.cp.float32
        tol = 1e-5 if n == 1 else 1e-3  # GEMV: fp32 math on exact weights; GEMM: fp16-rounded weights
        assert rel_err(cuda.to_numpy(got), x @ tensor.dequantize().T) < tol


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_embedding_from_every_table_type(cuda, rng, ggml_type):
    from engine.backends.cuda.weights import upload_weight

    tensor = synthetic_weight("token_embd", ggml_type, (333, 256), rng, 1.0)
    ids = rng.integers(0, 333, 41)
    got = cuda.to_numpy(cuda.embedding(upload_weight(cuda.cp, "token_embd", tensor), cuda.tokens(ids)))
    np.testing.assert_allclose(got, tensor.dequantize()[ids], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n,d", [(1, 576), (37, 64), (5, 1000), (9, 37), (1000, 576)])
def test_rmsnorm_add_swiglu(cuda, rng, n, d):
    ref = NumpyBackend()
    cp = cuda.cp
    x = rng.standard_normal((n, d)).astype(np.float32) * 3
    w = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    assert rel_err(cuda.to_numpy(cuda.rmsnorm(cp.asarray(x), cp.asarray(w), 1e-5)), ref.rmsnorm(x, w, 1e-5)) < FP16_TOL
    x16 = fp16(x)
    assert rel_err(cuda.to_numpy(cuda.rmsnorm(cp.asarray(x16.astype(np.float16)), cp.asarray(w), 1e-6)),
                   ref.rmsnorm(x16, w, 1e-6)) < FP16_TOL
    y = fp16(rng.standard_normal((n, d)))
    summed = cuda.add(cp.asarray(x), cp.asarray(y.astype(np.float16)))
    assert summed.dtype == cp.float32
    np.testing.assert_allclose(cuda.to_numpy(summed), x + y, rtol=1e-6, atol=1e-6)
    gate, up = fp16(4 * rng.standard_normal((n, d))), fp16(rng.standard_normal((n, d)))
    got = cuda.swiglu(cp.asarray(gate.astype(np.float16)), cp.asarray(up.astype(np.float16)))
    assert rel_err(cuda.to_numpy(got), ref.swiglu(gate, up)) < FP16_TOL


@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_fused_groups_and_accumulating_products(cuda, rng, ggml_type):
    """Q/K/V-like and gate/up-like matrices stored as one (weights.fuse): each part still works alone
    (GEMV), linear_group is one GEMM whose column views equal the separate products, and add_linear
    accumulates into the fp32 residual."""
    from engine.backends.cuda.weights import fuse, fused_whole, upload_weight

    cp = cuda.cp
    cols = 512  # a multiple of the K-quant block
    tensors = [synthetic_weight(f"blk.0.attn_{s}", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
               for s, rows in (("q", 96), ("k", 32), ("v", 40))]
    parts = [upload_weight(cp, t.name, t) for t in tensors]
    whole = fuse(cp, parts)
    assert whole is not None and whole.rows == 168 and fused_whole(parts) is whole
    assert fused_whole(parts[:2]) is None and fused_whole([parts[1], parts[0], parts[2]]) is None
    for n in (1, 3, 77):
        x = fp16(rng.standard_normal((n, cols)))
        outs = cuda.linear_group(cp.asarray(x.astype(np.float16)), parts)
        for t, out in zip(tensors, outs):
            assert rel_err(cuda.to_numpy(out), x @ t.dequantize().T) < FP16_TOL, (ggml_type.name, n, t.name)
    other = upload_weight(cp, "blk.0.ffn_up", synthetic_weight("blk.0.ffn_up", GGMLType.F16, (64, 256), rng, 0.1))
    assert fuse(cp, [parts[0], other]) is None  # already fused / different row lengths: left alone

    down = synthetic_weight("blk.0.ffn_down", ggml_type, (cols, 256), rng, 1 / 16)
    w_down = upload_weight(cp, down.name, down)
    for n in (1, 5, 130):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        a = fp16(rng.standard_normal((n, 256)))
        got = cuda.add_linear(cp.asarray(x), cp.asarray(a.astype(np.float16)), w_down)
        assert got.dtype == cp.float32
        assert rel_err(cuda.to_numpy(got), x + a @ down.dequantize().T) < 1e-3, (ggml_type.name, n)


def test_kept_fp16_copies_and_f16_weights_as_stored(cuda, rng):
    """keep_fp16 (small models): prefill GEMMs read kept fp16 copies (a fused whole's copy serves its
    parts) and give what the scratch path gives; over budget nothing is kept; F16 weights are read as
    stored, without a copy."""
    from engine.backends.cuda.weights import MatrixOps, fuse, upload_weight

    cp = cuda.cp
    ops = MatrixOps(cp)
    tensors = [synthetic_weight(f"blk.0.ffn_{s}", GGMLType.Q4_K, (rows, 512), rng, 1 / 16)
               for s, rows in (("gate", 96), ("up", 96))]
    parts = [upload_weight(cp, t.name, t) for t in tensors]
    whole = fuse(cp, parts)
    down_t = synthetic_weight("blk.0.ffn_down", GGMLType.Q8_0, (64, 512), rng, 1 / 16)
    down = upload_weight(cp, down_t.name, down_t)
    x = cp.asarray(fp16(rng.standard_normal((40, 512))).astype(np.float16))
    before = [cp.asnumpy(ops.linear(x, m)) for m in (whole, parts[1], down)]
    assert ops.keep_fp16([whole, down], budget_bytes=100) == 0 and whole.fp16 is None
    assert ops.keep_fp16([whole, down], budget_bytes=1 << 20) == 2 * 512 * (192 + 64)
    assert ops.dequantize(parts[1]).data.ptr == whole.fp16[96:].data.ptr  # a view of the whole's copy
    after = [cp.asnumpy(ops.linear(x, m)) for m in (whole, parts[1], down)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    f16 = upload_weight(cp, "blk.0.attn_q", synthetic_weight("blk.0.attn_q", GGMLType.F16, (72, 256), rng, 0.1))
    assert ops.dequantize(f16).data.ptr == f16.data.data.ptr


@pytest.mark.parametrize("n,f", [(1, 1536), (33, 40), (7, 37), (300, 96)])
def test_swiglu_on_the_halves_of_one_product(cuda, rng, n, f):
    ref = NumpyBackend()
    both = fp16(4 * rng.standard_normal((n, 2 * f)))
    dev = cuda.cp.asarray(both.astype(np.float16))
    got = cuda.swiglu(dev[:, :f], dev[:, f:])
    assert got.flags.c_contiguous and got.shape == (n, f)
    assert rel_err(cuda.to_numpy(got), ref.swiglu(both[:, :f], both[:, f:])) < FP16_TOL


@pytest.mark.parametrize("head_dim,rope_dim,dca", [
    (64, 64, DCAConfig(chunk_size=48, local_window=16)),
    (16, 16, None),
    (128, 64, DCAConfig(chunk_size=28, local_window=8)),  # partial rotary; chunk_len 20
    (24, 24, None),  # rope_dim % 16 != 0: the one-pair-per-thread kernel
])
def test_rotate_keys_and_store(cuda, rng, head_dim, rope_dim, dca):
    cp = cuda.cp
    rotary = RotaryTable(RopeConfig(theta=10000.0, dim=rope_dim), 500)
    start, n, heads = 37, 50, 3
    k = fp16(rng.standard_normal((n, heads, head_dim)))
    v = fp16(rng.standard_normal((n, heads, head_dim)))
    positions = np.arange(start, start + n)
    ref = dca_ops.rotate_keys(k, positions, rotary, dca)
    got = cuda.rotate_keys(cp.asarray(k.astype(np.float16)), cuda.positions(start, n), rotary, dca)
    assert rel_err(cuda.to_numpy(got), ref) < FP16_TOL
    cache = cuda.new_cache(2, 128, heads, head_dim)
    cache.length = start
    cuda.store_kv(cache, 1, got, cp.asarray(v.astype(np.float16)), cuda.positions(start, n))
    np.testing.assert_array_equal(cp.asnumpy(cache.k[1, start:start + n]), cp.asnumpy(got))
    np.testing.assert_array_equal(cp.asnumpy(cache.v[1, start:start + n]).astype(np.float32), v)
    assert not cp.asnumpy(cache.k[0]).any() and not cp.asnumpy(cache.k[1, :start]).any()

    # K and V as the column views of one fused (n, Q + K + V) product, as the model passes them
    row = heads * head_dim
    qkv = cp.asarray(fp16(rng.standard_normal((n, 40 + 2 * row))).astype(np.float16))
    k_view = qkv[:, 40:40 + row].reshape(n, heads, head_dim)
    v_view = qkv[:, 40 + row:].reshape(n, heads, head_dim)
    k_np, v_np = (cp.asnumpy(a).astype(np.float32) for a in (k_view, v_view))
    got = cuda.rotate_keys(k_view, cuda.positions(start, n), rotary, dca)
    assert got.flags.c_contiguous
    assert rel_err(cuda.to_numpy(got), dca_ops.rotate_keys(k_np, positions, rotary, dca)) < FP16_TOL
    cuda.store_kv(cache, 0, got, v_view, cuda.positions(start, n))
    np.testing.assert_array_equal(cp.asnumpy(cache.k[0, start:start + n]), cp.asnumpy(got))
    np.testing.assert_array_equal(cp.asnumpy(cache.v[0, start:start + n]).astype(np.float32), v_np)


ATTENTION_CASES = [
    # (Hq, Hkv, D, dca, cached, new, capacity, temperature_length)
    (9, 3, 64, DCAConfig(chunk_size=48, local_window=16), 0, 150, 160, None),   # chunk_len 32 = tile
    (9, 3, 64, DCAConfig(chunk_size=28, local_window=8), 0, 133, 140, None),    # boundaries inside tiles
    (4, 4, 16, DCAConfig(chunk_size=28, local_window=8), 100, 77, 200, None),   # MHA, chunked prefill
    (8, 1, 128, DCAConfig(chunk_size=40, local_window=10), 0, 97, 97, 50),      # GQA 8, temperature
    (32, 8, 64, None, 0, 70, 80, None),                                         # GQA 4, plain causal
    (9, 3, 64, DCAConfig(chunk_size=48, local_window=16), 300, 1, 2000, None),  # decode, many splits
    (6, 2, 32, None, 999, 1, 1024, None),                                       # decode, no DCA
    (9, 3, 64, DCAConfig(chunk_size=100, local_window=20), 2500, 1, 4096, 60),  # decode, long, temperature
    (12, 4, 64, DCAConfig(chunk_size=48, local_window=16), 640, 5, 700, None),  # few queries, splits
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[f"case{i}" for i in range(len(ATTENTION_CASES))])
def test_attention_matches_blockwise_reference(cuda, rng, case):
    from engine.backends.cuda.attention import attention

    n_heads, n_kv, head_dim, dca, cached, new, capacity, temp_len = case
    cp = cuda.cp
    total = cached + new
    rotary = RotaryTable(RopeConfig(theta=10000.0, dim=head_dim), dca.chunk_size + 1 if dca else total)
    q = fp16(rng.standard_normal((new, n_heads, head_dim)))
    k = fp16(rng.standard_normal((total, n_kv, head_dim)))
    v = fp16(rng.standard_normal((total, n_kv, head_dim)))
    k_rot = fp16(dca_ops.rotate_keys(k, np.arange(total), rotary, dca))
    positions = np.arange(cached, total)
    scale = None if temp_len is None else dca_ops.temperature(positions, temp_len)
    ref = dca_ops.blockwise_attention(q, k_rot, v, positions, rotary, dca, logit_scale=scale)
    cache_k = cp.asarray(rng.standard_normal((capacity, n_kv, head_dim)).astype(np.float16))  # garbage past total
    cache_v = cp.asarray(rng.standard_normal((capacity, n_kv, head_dim)).astype(np.float16))
    cache_k[:total] = cp.asarray(k_rot.astype(np.float16))
    cache_v[:total] = cp.asarray(v.astype(np.float16))
    cos_t, sin_t = cuda.rotary_tables(rotary)
    got = attention(cp, cp.asarray(q.astype(np.float16)), cache_k, cache_v, cuda.positions(cached, new), cos_t,
                    sin_t, head_dim, dca, temp_len, capacity, keys_hint=total)
    assert rel_err(cuda.to_numpy(got), ref) < FP16_TOL


def host_candidates(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Token ids the chain can draw and their probabilities (engine/sampling.py's steps)."""
    ids = np.argsort(-logits, kind="stable")[:p.top_k]
    vals = logits[ids]
    probs = np.exp(vals - vals[0]) / np.exp(vals - vals[0]).sum()
    n_keep = min(int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1, len(ids))
    ids, vals, probs = ids[:n_keep], vals[:n_keep], probs[:n_keep]
    keep = probs >= p.min_p * probs[0]
    ids, vals = ids[keep], vals[keep]
    final = np.exp((vals - vals[0]) / p.temperature)
    return ids, final / final.sum()


def test_device_greedy_with_repeat_penalty(cuda, rng):
    from engine.backends.cuda.sampling import DeviceSampler

    cp = cuda.cp
    for trial in range(20):
        logits = rng.standard_normal(5000).astype(np.float32) * 3
        history = list(rng.integers(0, 5000, 40)) + [int(np.argmax(logits))] * 3  # the best token repeated
        params = SamplingParams(temperature=0.0, repeat_penalty=1.0 + 0.5 * (trial % 3), repeat_last_n=16)
        sampler = DeviceSampler(cp, params, history)
        position = cp.zeros(1, dtype=cp.int32)
        sampler.launch(cp.asarray(logits[None]), position, advance=True)
        expected = int(np.argmax(apply_repeat_penalty(logits.astype(np.float64), history, params.repeat_penalty,
                                                      params.repeat_last_n)))
        assert int(sampler.token.get()[0]) == expected
        assert int(position.get()[0]) == 1
        assert int(sampler.ring_count.get()[0]) == (17 if params.repeat_penalty != 1.0 else 0)


def test_device_sampling_distribution(cuda, rng):
    from engine.backends.cuda.sampling import DeviceSampler

    cp = cuda.cp
    logits = np.sort(rng.standard_normal(300).astype(np.float32))[::-1].copy()
    rng.shuffle(logits)
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.9, min_p=0.05, seed=3)
    ids, probs = host_candidates(logits.astype(np.float64), params)
    sampler = DeviceSampler(cp, params, [])
    position = cp.zeros(1, dtype=cp.int32)
    device_logits = cp.asarray(logits[None])
    draws = []
    for _ in range(3000):
        sampler.launch(device_logits, position, advance=False)
        draws.append(int(sampler.token.get()[0]))
    draws = np.array(draws)
    assert set(draws) <= set(ids.tolist())
    freq = np.array([(draws == i).mean() for i in ids])
    assert np.abs(freq - probs).max() < 0.035
    # the same seed draws the same tokens
    again = DeviceSampler(cp, params, [])
    again.launch(device_logits, position, advance=False)
    assert int(again.token.get()[0]) == draws[0]


def test_device_top_k_on_a_flat_distribution_scans_the_whole_vocabulary(cuda, rng):
    """5000 logits within 1 of each other overflow the shared-memory pool: the full scan must still pick
    only among the exact top-k."""
    from engine.backends.cuda.sampling import DeviceSampler

    cp = cuda.cp
    logits = rng.uniform(0.0, 1.0, 5000).astype(np.float32)
    params = SamplingParams(temperature=1.5, top_k=7, top_p=1.0, min_p=0.0, seed=5)
    sampler = DeviceSampler(cp, params, [])
    position = cp.zeros(1, dtype=cp.int32)
    device_logits = cp.asarray(logits[None])
    top = set(np.argsort(-logits, kind="stable")[:7].tolist())
    draws = set()
    for _ in range(300):
        sampler.launch(device_logits, position, advance=False)
        draws.add(int(sampler.token.get()[0]))
    assert draws <= top and len(draws) >= 5


def test_kv_cache_beyond_gpu_memory_is_a_clear_error(cuda):
    from engine.errors import DeviceError

    with pytest.raises(DeviceError, match=r"needs [\d.]+ GiB of GPU memory but only [\d.]+ GiB is free; .*-c/--ctx-size"):
        cuda.new_cache(30, 10**9, 3, 64)  # ~720 GiB
