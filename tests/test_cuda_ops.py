"""Each CUDA kernel against the numpy reference backend, on fresh random inputs (marker `cuda`).

Every op that handles activations runs in both activation dtypes (``dtype`` "f16" and "bf16"; bf16
arrays are uint16 bit patterns). Inputs are rounded to the activation dtype on the host first, so
the numpy reference sees exactly the values the kernel reads and the error left is the kernel's own.
Tolerances (relative L2 error ||gpu - ref|| / ||ref||): outputs rounded once to the activation dtype
3e-3 for fp16 (one rounding of N(0,1) values: 2.1e-4) and 1e-2 for bf16 (one rounding: 1.7e-3; a
value read with the wrong format or rounded twice is far off); fp32 outputs of fp32 math 1e-5;
GEMMs over weights rounded to the activation dtype 1e-3 (fp16) / 5e-3 (bf16: per-value relative
rounding error <= 2^-8 = 3.9e-3). GEMVs (n == 1) over quantized weights read their input as int8 per block
of 32 (gemv.cu): their reference is the numpy model of that arithmetic (gemv.reference, ``product_ref``).
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
from engine.weights.bf16 import from_bf16_bits, to_bf16_bits
from engine.weights.quant import GGMLType

pytestmark = pytest.mark.cuda

DTYPES = ("f16", "bf16")
TOL = {"f16": 3e-3, "bf16": 1e-2}  # outputs rounded once to the activation dtype
WEIGHT_TOL = {"f16": 1e-3, "bf16": 5e-3}  # products over weights rounded to the activation dtype
QUANT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
               GGMLType.Q4_K, GGMLType.Q6_K)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def backends():
    from engine.backends.cuda import CudaBackend

    return {dtype: CudaBackend(dtype=dtype) for dtype in DTYPES}


@pytest.fixture
def dtype():
    return "f16"  # tests parametrized over DTYPES override this


@pytest.fixture
def cuda(backends, dtype):
    return backends[dtype]


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def to_bits(x, dtype: str) -> np.ndarray:
    """Host floats -> the activation dtype's host array: float16, or bf16 bits (uint16, round to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    return x.astype(np.float16) if dtype == "f16" else to_bf16_bits(x)


def rounded(x, dtype: str) -> np.ndarray:
    """x rounded to the activation dtype, as float32 (the exact values the kernels read)."""
    bits = to_bits(x, dtype)
    return bits.astype(np.float32) if dtype == "f16" else from_bf16_bits(bits)


def product_ref(x, tensor) -> np.ndarray:
    """x (n, cols) @ W^T as the kernels compute it: for n == 1 over quantized weights the int8-input GEMV
    (gemv.reference), else the float product."""
    from engine.backends.cuda import gemv

    if x.shape[0] == 1 and tensor.ggml_type in gemv.INT8_TYPES:
        return gemv.reference(x[0], tensor)[None, :]
    return x @ tensor.dequantize().T


def upload(cuda, x):
    """Host floats -> a device activation array of the backend's dtype (rounded)."""
    return cuda.cp.asarray(to_bits(x, cuda.dtype))


def test_bf16_bits_round_to_nearest_even_and_come_back(backends):
    """The device conversion (weights.to_activation) and to_numpy agree with the host's bf16 rounding."""
    from engine.backends.cuda.weights import to_activation

    cuda = backends["bf16"]
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e-5, 65504.0 * 4, 0.0, -1.0e30], np.float32)
    x = np.concatenate([x, np.random.default_rng(0).standard_normal(1000).astype(np.float32)])
    got = to_activation(cuda.cp, cuda.cp.asarray(x), "bf16")
    assert got.dtype == cuda.cp.uint16
    np.testing.assert_array_equal(cuda.cp.asnumpy(got), to_bits(x, "bf16"))
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
    np.testing.assert_array_equal(cuda.to_numpy(got)[:4], [1.0, 1.0, 1.015625, -2.5])
    np.testing.assert_array_equal(cuda.to_numpy(got), rounded(x, "bf16"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(77, 256), (300, 512), (1, 768)])
def test_linear_gemv_and_gemm(cuda, rng, dtype, ggml_type, rows, cols):
    from engine.backends.cuda.weights import upload_weight

    tensor = synthetic_weight("blk.0.ffn_up", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
    w_ref = tensor.dequantize()
    w_dev = upload_weight(cuda.cp, tensor.name, tensor)
    for n in (1, 5, 130):
        x = rounded(rng.standard_normal((n, cols)), dtype)
        y = cuda.linear(upload(cuda, x), w_dev)
        assert y.dtype == cuda.act and y.shape == (n, rows)
        assert rel_err(cuda.to_numpy(y), product_ref(x, tensor)) < TOL[dtype], (ggml_type.name, n)
    assert cuda.matrices.gemm_path == "cublasGemmEx"
    # the scratch holds exactly the dequantized weights, up to rounding to the activation dtype
    scratch = cuda.matrices.dequantize(w_dev)
    assert scratch.dtype == cuda.act
    assert rel_err(cuda.to_numpy(scratch), w_ref) < WEIGHT_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_output_head_logits_are_fp32(cuda, rng, dtype, ggml_type):
    from engine.backends.cuda.weights import upload_weight

    tensor = synthetic_weight("output", ggml_type, (1000, 256), rng, 1 / 16)
    w_dev = upload_weight(cuda.cp, "output", tensor)
    for n in (1, 7):
        x = rounded(rng.standard_normal((n, 256)), dtype)
        got = cuda.linear(upload(cuda, x), w_dev)
        assert got.dtype == cuda.cp.float32
        # GEMV: fp32 math on exact weights (quantized ones: on the int8 input); GEMM: weights rounded to
        # the activation dtype
        tol = 1e-5 if n == 1 else WEIGHT_TOL[dtype]
        assert rel_err(cuda.to_numpy(got), product_ref(x, tensor)) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_embedding_from_every_table_type(cuda, rng, dtype, ggml_type):
    from engine.backends.cuda.weights import upload_weight

    tensor = synthetic_weight("token_embd", ggml_type, (333, 256), rng, 1.0)
    ids = rng.integers(0, 333, 41)
    got = cuda.to_numpy(cuda.embedding(upload_weight(cuda.cp, "token_embd", tensor), cuda.tokens(ids)))
    np.testing.assert_allclose(got, tensor.dequantize()[ids], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 576), (37, 64), (5, 1000), (9, 37), (1000, 576)])
def test_rmsnorm_add_swiglu(cuda, rng, dtype, n, d):
    ref = NumpyBackend()
    cp = cuda.cp
    x = rng.standard_normal((n, d)).astype(np.float32) * 3
    w = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    normed = cuda.rmsnorm(cp.asarray(x), cp.asarray(w), 1e-5)
    assert normed.dtype == cuda.act
    assert rel_err(cuda.to_numpy(normed), ref.rmsnorm(x, w, 1e-5)) < TOL[dtype]
    x_act = rounded(x, dtype)
    assert rel_err(cuda.to_numpy(cuda.rmsnorm(upload(cuda, x_act), cp.asarray(w), 1e-6)),
                   ref.rmsnorm(x_act, w, 1e-6)) < TOL[dtype]
    y = rounded(rng.standard_normal((n, d)), dtype)
    summed = cuda.add(cp.asarray(x), upload(cuda, y))
    assert summed.dtype == cp.float32
    np.testing.assert_allclose(cuda.to_numpy(summed), x + y, rtol=1e-6, atol=1e-6)
    gate, up = rounded(4 * rng.standard_normal((n, d)), dtype), rounded(rng.standard_normal((n, d)), dtype)
    got = cuda.swiglu(upload(cuda, gate), upload(cuda, up))
    assert got.dtype == cuda.act
    assert rel_err(cuda.to_numpy(got), ref.swiglu(gate, up)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", QUANT_TYPES, ids=lambda t: t.name)
def test_fused_groups_and_accumulating_products(cuda, rng, dtype, ggml_type):
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
        x = rounded(rng.standard_normal((n, cols)), dtype)
        outs = cuda.linear_group(upload(cuda, x), parts)
        for t, out in zip(tensors, outs):
            assert rel_err(cuda.to_numpy(out), product_ref(x, t)) < TOL[dtype], (ggml_type.name, n, t.name)
    other = upload_weight(cp, "blk.0.ffn_up", synthetic_weight("blk.0.ffn_up", GGMLType.F16, (64, 256), rng, 0.1))
    assert fuse(cp, [parts[0], other]) is None  # already fused / different row lengths: left alone

    down = synthetic_weight("blk.0.ffn_down", ggml_type, (cols, 256), rng, 1 / 16)
    w_down = upload_weight(cp, down.name, down)
    for n in (1, 5, 130):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        a = rounded(rng.standard_normal((n, 256)), dtype)
        got = cuda.add_linear(cp.asarray(x), upload(cuda, a), w_down)
        assert got.dtype == cp.float32
        assert rel_err(cuda.to_numpy(got), x + product_ref(a, down)) < WEIGHT_TOL[dtype], (ggml_type.name, n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_copies_and_weights_stored_in_the_activation_dtype(cuda, rng, dtype):
    """keep_half (small models): prefill GEMMs read kept copies in the activation dtype (a fused whole's
    copy serves its parts) and give what the scratch path gives; over budget nothing is kept; weights
    stored in the activation dtype (F16 for f16, BF16 for bf16) are read as stored, the other 16-bit
    type is converted."""
    from engine.backends.cuda.weights import MatrixOps, fuse, upload_weight

    cp = cuda.cp
    ops = MatrixOps(cp, dtype)
    tensors = [synthetic_weight(f"blk.0.ffn_{s}", GGMLType.Q4_K, (rows, 512), rng, 1 / 16)
               for s, rows in (("gate", 96), ("up", 96))]
    parts = [upload_weight(cp, t.name, t) for t in tensors]
    whole = fuse(cp, parts)
    down_t = synthetic_weight("blk.0.ffn_down", GGMLType.Q8_0, (64, 512), rng, 1 / 16)
    down = upload_weight(cp, down_t.name, down_t)
    x = upload(cuda, rng.standard_normal((40, 512)))
    before = [cp.asnumpy(ops.linear(x, m)) for m in (whole, parts[1], down)]
    assert ops.keep_half([whole, down], budget_bytes=100) == 0 and whole.half is None
    assert ops.keep_half([whole, down], budget_bytes=1 << 20) == 2 * 512 * (192 + 64)
    assert whole.half.dtype == cuda.act
    assert ops.dequantize(parts[1]).data.ptr == whole.half[96:].data.ptr  # a view of the whole's copy
    after = [cp.asnumpy(ops.linear(x, m)) for m in (whole, parts[1], down)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    same, other = (GGMLType.F16, GGMLType.BF16) if dtype == "f16" else (GGMLType.BF16, GGMLType.F16)
    tensors = {t: synthetic_weight("blk.0.attn_q", t, (72, 256), rng, 0.1) for t in (same, other)}
    as_stored, converted = (upload_weight(cp, "blk.0.attn_q", tensors[t]) for t in (same, other))
    assert ops.dequantize(as_stored).data.ptr == as_stored.data.data.ptr
    assert ops.keep_half([as_stored], budget_bytes=1 << 20) == 0  # nothing to copy
    dequantized = ops.dequantize(converted)
    assert dequantized.data.ptr != converted.data.data.ptr and dequantized.dtype == cuda.act
    assert rel_err(cuda.to_numpy(dequantized), tensors[other].dequantize()) < WEIGHT_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,f", [(1, 1536), (33, 40), (7, 37), (300, 96)])
def test_swiglu_on_the_halves_of_one_product(cuda, rng, dtype, n, f):
    ref = NumpyBackend()
    both = rounded(4 * rng.standard_normal((n, 2 * f)), dtype)
    dev = upload(cuda, both)
    got = cuda.swiglu(dev[:, :f], dev[:, f:])
    assert got.flags.c_contiguous and got.shape == (n, f) and got.dtype == cuda.act
    assert rel_err(cuda.to_numpy(got), ref.swiglu(both[:, :f], both[:, f:])) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rope_dim,dca", [
    (64, 64, DCAConfig(chunk_size=48, local_window=16)),
    (16, 16, None),
    (128, 64, DCAConfig(chunk_size=28, local_window=8)),  # partial rotary; chunk_len 20
    (24, 24, None),  # rope_dim % 16 != 0: the one-pair-per-thread kernel
])
def test_store_kv_rotates_the_keys(cuda, rng, dtype, head_dim, rope_dim, dca):
    cp = cuda.cp
    rotary = RotaryTable(RopeConfig(theta=10000.0, dim=rope_dim), 500)
    start, n, heads = 37, 50, 3
    k = rounded(rng.standard_normal((n, heads, head_dim)), dtype)
    v = rounded(rng.standard_normal((n, heads, head_dim)), dtype)
    positions = np.arange(start, start + n)
    cache = cuda.new_cache(2, 128, heads, head_dim)
    assert cache.k.dtype == cuda.act
    cache.length = start
    cuda.store_kv(cache, 1, upload(cuda, k), upload(cuda, v), cuda.positions(start, n), rotary, dca)
    assert rel_err(cuda.to_numpy(cache.k[1, start:start + n]), dca_ops.rotate_keys(k, positions, rotary, dca)) < TOL[dtype]
    np.testing.assert_array_equal(cuda.to_numpy(cache.v[1, start:start + n]), v)
    assert not cp.asnumpy(cache.k[0]).any() and not cp.asnumpy(cache.k[1, :start]).any()
    assert not cp.asnumpy(cache.k[1, start + n:]).any() and not cp.asnumpy(cache.v[1, start + n:]).any()

    # K and V as the column views of one fused (n, Q + K + V) product, as the model passes them
    row = heads * head_dim
    qkv = upload(cuda, rng.standard_normal((n, 40 + 2 * row)))
    k_view = qkv[:, 40:40 + row].reshape(n, heads, head_dim)
    v_view = qkv[:, 40 + row:].reshape(n, heads, head_dim)
    k_np, v_np = (cuda.to_numpy(a) for a in (k_view, v_view))
    cuda.store_kv(cache, 0, k_view, v_view, cuda.positions(start, n), rotary, dca)
    assert rel_err(cuda.to_numpy(cache.k[0, start:start + n]), dca_ops.rotate_keys(k_np, positions, rotary, dca)) \
        < TOL[dtype]
    np.testing.assert_array_equal(cuda.to_numpy(cache.v[0, start:start + n]), v_np)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[f"case{i}" for i in range(len(ATTENTION_CASES))])
def test_attention_matches_blockwise_reference(cuda, rng, dtype, case):
    from engine.backends.cuda.attention import attention

    n_heads, n_kv, head_dim, dca, cached, new, capacity, temp_len = case
    cp = cuda.cp
    total = cached + new
    rotary = RotaryTable(RopeConfig(theta=10000.0, dim=head_dim), dca.chunk_size + 1 if dca else total)
    q = rounded(rng.standard_normal((new, n_heads, head_dim)), dtype)
    k = rounded(rng.standard_normal((total, n_kv, head_dim)), dtype)
    v = rounded(rng.standard_normal((total, n_kv, head_dim)), dtype)
    k_rot = rounded(dca_ops.rotate_keys(k, np.arange(total), rotary, dca), dtype)
    positions = np.arange(cached, total)
    scale = None if temp_len is None else dca_ops.temperature(positions, temp_len)
    ref = dca_ops.blockwise_attention(q, k_rot, v, positions, rotary, dca, logit_scale=scale)
    cache_k = upload(cuda, rng.standard_normal((capacity, n_kv, head_dim)))  # garbage past total
    cache_v = upload(cuda, rng.standard_normal((capacity, n_kv, head_dim)))
    cache_k[:total] = upload(cuda, k_rot)
    cache_v[:total] = upload(cuda, v)
    cos_t, sin_t = cuda.rotary_tables(rotary)
    got = attention(cp, upload(cuda, q), cache_k, cache_v, cuda.positions(cached, new), cos_t, sin_t, head_dim, dca,
                    temp_len, capacity, keys_hint=total, dtype=dtype)
    assert got.dtype == cuda.act
    assert rel_err(cuda.to_numpy(got), ref) < TOL[dtype]


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


def device_draws(cp, sampler, logits: np.ndarray, n: int = 3000) -> list[int]:
    """n tokens the device sampler draws from the same (vocab,) logits, one launch each (position not advanced)."""
    position = cp.zeros(1, dtype=cp.int32)
    device_logits = cp.asarray(logits[None])
    draws = []
    for _ in range(n):
        sampler.launch(device_logits, position, advance=False)
        draws.append(int(sampler.token.get()[0]))
    return draws


def test_device_sampling_distribution(cuda, rng):
    from engine.backends.cuda.sampling import DeviceSampler

    cp = cuda.cp
    logits = np.sort(rng.standard_normal(300).astype(np.float32))[::-1].copy()
    rng.shuffle(logits)
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.9, min_p=0.05, seed=3)
    ids, probs = host_candidates(logits.astype(np.float64), params)
    sampler = DeviceSampler(cp, params, [])
    draws = device_draws(cp, sampler, logits)
    draws = np.array(draws)
    assert set(draws) <= set(ids.tolist())
    freq = np.array([(draws == i).mean() for i in ids])
    assert np.abs(freq - probs).max() < 0.035
    # the same seed draws the same tokens
    again = DeviceSampler(cp, params, [])
    assert device_draws(cp, again, logits, 1) == [draws[0]]


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


# --- the device sampler's split (sample_scan / sample_pool on G blocks, sample_token on one) ------------------------
SPLIT_VOCABS = (1, 7, 2047, 2048, 2049, 32000, 128256, 152064)
TOP1 = SamplingParams(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0, seed=2)  # stochastic, yet the argmax


def penalised_f32(logits: np.ndarray, history, penalty: float, last_n: int) -> np.ndarray:
    """apply_repeat_penalty in the kernel's fp32 arithmetic (each distinct token of the last last_n once)."""
    out = logits.copy()
    recent = np.unique(np.asarray(list(history)[-last_n:], dtype=np.int64))
    vals = out[recent]
    out[recent] = np.where(vals > 0, vals / np.float32(penalty), vals * np.float32(penalty))
    return out


def sampler_state(sampler, position) -> dict:
    return {"ring": sampler.ring.get(), "ring_count": sampler.ring_count.get(), "counter": sampler.counter.get(),
            "position": position.get()}


def slice_starts(vocab: int) -> np.ndarray:
    from engine.backends.cuda.sampling import partition

    blocks, size = partition(vocab)
    return np.arange(blocks) * size


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), TOP1], ids=["greedy", "top1"])
@pytest.mark.parametrize("vocab", SPLIT_VOCABS)
def test_device_argmax_across_scan_blocks(cuda, vocab, params):
    """The best (value, id) of the G partials is np.argmax: ties across slice boundaries go to the lowest id, the
    max may sit in the last (partial) slice, all-equal logits give id 0 (-0.0 == +0.0). With top_k 1 the same
    through sample_pool (or, past POOL_CAP tokens near the top, the whole-vocabulary rounds)."""
    from engine.backends.cuda.sampling import DeviceSampler

    cp = cuda.cp
    rng = np.random.default_rng(vocab)
    starts = slice_starts(vocab)
    base = rng.integers(-2, 3, vocab).astype(np.float32)
    cases = {"random": rng.standard_normal(vocab).astype(np.float32)}
    cases["ties on both sides of every boundary"] = base.copy()
    cases["ties on both sides of every boundary"][np.concatenate([starts[1:], starts[1:] - 1, [vocab - 1]])] = 5.0
    cases["ties at later slice starts"] = base.copy()
    cases["ties at later slice starts"][np.concatenate([starts[len(starts) // 2:], [vocab - 1]])] = 5.0
    cases["max in the last slice"] = base.copy()
    cases["max in the last slice"][vocab - 1] = 5.0
    cases["all equal, signed zeros"] = np.where(np.arange(vocab) % 2 == 0, -0.0, 0.0).astype(np.float32)
    cases["huge negative"] = np.full(vocab, -3.0e38, np.float32)
    cases["huge negative"][rng.integers(vocab)] = -2.9e38
    for name, logits in cases.items():
        sampler = DeviceSampler(cp, params, [])
        position = cp.zeros(1, dtype=cp.int32)
        sampler.launch(cp.asarray(logits[None]), position, advance=True)
        assert int(sampler.token.get()[0]) == int(np.argmax(logits)), name
        assert int(position.get()[0]) == 1, name


@pytest.mark.parametrize("penalty", [1.5, 0.75])
@pytest.mark.parametrize("vocab", SPLIT_VOCABS)
def test_device_repeat_penalty_across_scan_blocks(cuda, vocab, penalty):
    """Each scan block penalises the ring tokens of its own slice: tokens at every slice edge and duplicates (the
    best token three times) are penalised exactly once (the device logits equal the fp32 model bit for bit),
    and the ring takes the chosen token."""
    from engine.backends.cuda.sampling import DeviceSampler, partition

    cp = cuda.cp
    rng = np.random.default_rng(vocab + int(penalty * 4))
    blocks, size = partition(vocab)
    starts = slice_starts(vocab)
    edges = sorted({0, vocab - 1} | set(starts.tolist()) | set((np.minimum(starts + size, vocab) - 1).tolist()))
    for trial in range(3):
        logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
        best = int(np.argmax(logits))
        history = [int(t) for t in rng.integers(0, vocab, 10)] + edges + [best] * 3 + edges[:5]
        params = SamplingParams(temperature=0.0, repeat_penalty=penalty, repeat_last_n=len(history))
        sampler = DeviceSampler(cp, params, history)
        position = cp.zeros(1, dtype=cp.int32)
        device_logits = cp.asarray(logits[None])
        sampler.launch(device_logits, position, advance=True)
        ref = penalised_f32(logits, history, penalty, len(history))
        assert np.array_equal(device_logits.get()[0], ref), trial
        token = int(sampler.token.get()[0])
        assert token == int(np.argmax(ref))
        assert int(sampler.ring_count.get()[0]) == len(history) + 1
        assert sampler.ring.get().tolist() == [token] + history[1:]  # slot len(history) % ring_size == 0


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=8),
                                    SamplingParams(temperature=0.8, top_k=40, repeat_penalty=1.3, repeat_last_n=8,
                                                   seed=1)], ids=["greedy", "stochastic"])
@pytest.mark.parametrize("vocab", [2049, 128256])
def test_device_sampler_non_finite_logit_in_any_block(cuda, vocab, params):
    """A NaN or an infinity in the first, an edge, the middle or the last slice: token NON_FINITE, and the ring, its
    count, the random counter and the position stay as they were; the next finite logits sample normally (the
    partials' flags are rewritten by every scan)."""
    from engine.backends.cuda.sampling import NON_FINITE, DeviceSampler, partition

    cp = cuda.cp
    rng = np.random.default_rng(vocab)
    blocks, size = partition(vocab)
    places = {"first": 0, "end of slice 0": size - 1, "middle": (blocks // 2) * size + size // 3, "last": vocab - 1}
    sampler = DeviceSampler(cp, params, [1, 2, 3, vocab - 1])
    position = cp.asarray(np.array([5], dtype=np.int32))
    sampler.launch(cp.asarray(rng.standard_normal((1, vocab)).astype(np.float32)), position, advance=True)
    for bad in (np.nan, np.inf, -np.inf):
        for where, i in places.items():
            before = sampler_state(sampler, position)
            logits = rng.standard_normal(vocab).astype(np.float32)
            logits[i] = bad
            sampler.launch(cp.asarray(logits[None]), position, advance=True)
            assert int(sampler.token.get()[0]) == NON_FINITE, (bad, where)
            after = sampler_state(sampler, position)
            for key in before:
                assert np.array_equal(before[key], after[key]), (bad, where, key)
            good = (rng.standard_normal(vocab) * 8).astype(np.float32)
            sampler.launch(cp.asarray(good[None]), position, advance=True)
            token = int(sampler.token.get()[0])
            assert 0 <= token < vocab
            assert int(position.get()[0]) == int(before["position"][0]) + 1
            if params.greedy:
                filled = min(int(before["ring_count"][0]), 8)
                assert token == int(np.argmax(penalised_f32(good, before["ring"][:filled].tolist(), 1.3, filled)))


@pytest.mark.parametrize("vocab", [32000, 152064])
def test_device_stochastic_split_distribution_and_pool(cuda, vocab):
    """Peaked logits (30 tokens near the top, at random places and slice edges, the rest 60 below): sample_pool
    holds exactly those 30, the draws follow the host chain's probabilities, and the same seed draws the same."""
    from engine.backends.cuda.sampling import DeviceSampler

    cp = cuda.cp
    rng = np.random.default_rng(vocab)
    starts = slice_starts(vocab)
    logits = (rng.standard_normal(vocab) * 2.0 - 60.0).astype(np.float32)
    near = np.unique(np.concatenate([[0, vocab - 1, starts[-1], starts[len(starts) // 2] - 1],
                                     rng.choice(vocab, 26, replace=False)]))
    logits[near] = (rng.standard_normal(len(near)) * 1.5).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.9, min_p=0.05, seed=11)
    ids, probs = host_candidates(logits.astype(np.float64), params)
    sampler = DeviceSampler(cp, params, [])
    draws = device_draws(cp, sampler, logits)
    n_pool = int(sampler.pool_count.get()[0])
    assert n_pool == len(near)
    assert sorted(sampler.pool_i.get()[:n_pool].tolist()) == near.tolist()
    pool_i = sampler.pool_i.get()[:n_pool]
    assert np.array_equal(sampler.pool_v.get()[:n_pool], logits[pool_i])
    draws = np.array(draws)
    assert set(draws.tolist()) <= set(ids.tolist())
    freq = np.array([(draws == i).mean() for i in ids])
    assert np.abs(freq - probs).max() < 0.035
    again = DeviceSampler(cp, params, [])
    assert device_draws(cp, again, logits, 50) == draws[:50].tolist()
    assert int(sampler.counter.get()[0]) == 3000


@pytest.mark.parametrize("extra", [0, 1], ids=["pool-full", "pool-overflow"])
def test_device_pool_at_capacity(cuda, extra):
    """POOL_CAP tokens near the top fill the pool exactly (all stored, the rounds run over it); one more overflows
    it (the counter says so; sample_narrow refills it with the ~820 tokens within 4 of the top, its loosest rung
    under POOL_CAP); both draw only among the exact top 256."""
    from engine.backends.cuda.sampling import MAX_TOP_K, POOL_CAP, DeviceSampler

    cp = cuda.cp
    vocab = 128256
    rng = np.random.default_rng(extra)
    n = POOL_CAP + extra
    near = np.unique(np.concatenate([[0, vocab - 1], rng.choice(np.arange(1, vocab - 1), n - 2, replace=False)]))
    assert len(near) == n
    logits = np.full(vocab, -100.0, np.float32)
    logits[near] = rng.uniform(-5.0, 0.0, n).astype(np.float32)
    top = set(np.argsort(-logits, kind="stable")[:MAX_TOP_K].tolist())
    params = SamplingParams(temperature=1.0, top_k=MAX_TOP_K, top_p=1.0, min_p=0.0, seed=3)
    sampler = DeviceSampler(cp, params, [])
    position = cp.zeros(1, dtype=cp.int32)
    device_logits = cp.asarray(logits[None])
    draws = set()
    for _ in range(400):
        sampler.launch(device_logits, position, advance=False)
        draws.add(int(sampler.token.get()[0]))
    assert draws <= top and len(draws) >= 100
    assert int(sampler.pool_count.get()[0]) == n
    if n <= POOL_CAP:
        assert sorted(sampler.pool_i.get().tolist()) == near.tolist()
    else:
        narrow = np.flatnonzero(logits >= logits.max() - np.float32(4.0))
        assert MAX_TOP_K <= len(narrow) <= POOL_CAP
        assert int(sampler.pool_count.get()[1]) == len(narrow)
        assert sorted(sampler.pool_i.get()[:len(narrow)].tolist()) == narrow.tolist()


@pytest.mark.parametrize("vocab", [32000, 152064])
def test_device_top_k_on_flat_logits_across_scan_blocks(cuda, vocab):
    """Every token near the top (the pool overflows) and no rung of sample_narrow between top_k and POOL_CAP tokens:
    the whole-vocabulary rounds pick the exact top-k, ties by the lowest id (all-equal logits: ids 0..k-1)."""
    from engine.backends.cuda.sampling import POOL_CAP, DeviceSampler

    cp = cuda.cp
    rng = np.random.default_rng(vocab)
    params = SamplingParams(temperature=1.5, top_k=7, top_p=1.0, min_p=0.0, seed=5)
    for logits in (rng.uniform(0.0, 1.0, vocab).astype(np.float32), np.full(vocab, 0.5, np.float32)):
        sampler = DeviceSampler(cp, params, [])
        position = cp.zeros(1, dtype=cp.int32)
        device_logits = cp.asarray(logits[None])
        top = set(np.argsort(-logits, kind="stable")[:7].tolist())
        draws = set()
        for _ in range(200):
            sampler.launch(device_logits, position, advance=False)
            draws.add(int(sampler.token.get()[0]))
        assert int(sampler.pool_count.get()[0]) == vocab > POOL_CAP
        assert int(sampler.pool_count.get()[1]) == 0  # no rung holds between 7 and POOL_CAP tokens
        assert draws <= top and len(draws) >= 5


@pytest.mark.parametrize("vocab", [32000, 152064])
def test_device_narrowed_pool_for_spread_logits(cuda, vocab):
    """A language model's spread of logits (N(0, 2.5): every token within the cutoff, the pool overflows):
    sample_pool counts the tokens within each rung of the top, sample_narrow refills the pool with those of the
    loosest rung holding <= POOL_CAP (and >= top_k) tokens, and the rounds over it draw among the exact top-k."""
    from engine.backends.cuda.sampling import N_RUNGS, POOL_CAP, DeviceSampler

    cp = cuda.cp
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=9)
    ids, probs = host_candidates(logits.astype(np.float64), params)
    sampler = DeviceSampler(cp, params, [])
    position = cp.zeros(1, dtype=cp.int32)
    device_logits = cp.asarray(logits[None])
    draws = []
    for _ in range(1000):
        sampler.launch(device_logits, position, advance=False)
        draws.append(int(sampler.token.get()[0]))
    counts = sampler.pool_count.get()
    top = logits.max()
    rungs = np.array([16.0, 11.0, 8.0, 5.5, 4.0, 2.75, 2.0, 1.375, 1.0, 0.5, 0.25, 0.0], np.float32)
    assert len(rungs) == N_RUNGS
    floors = top - rungs  # fp32, as the kernels compute them
    expected = np.array([(logits >= f).sum() for f in floors])
    assert counts[0] == vocab and np.array_equal(counts[2:], expected)
    rung = int(np.argmax(expected <= POOL_CAP))
    assert params.top_k <= expected[rung] <= POOL_CAP  # this spread has a rung that fits
    assert counts[1] == expected[rung]
    assert sorted(sampler.pool_i.get()[:counts[1]].tolist()) == np.flatnonzero(logits >= floors[rung]).tolist()
    draws = np.array(draws)
    assert set(draws.tolist()) <= set(ids.tolist())
    freq = np.array([(draws == i).mean() for i in ids])
    assert np.abs(freq - probs).max() < 0.06


def test_device_sampler_replays_in_a_cuda_graph(cuda):
    """sample_scan / sample_pool / sample_token captured once (as graph.py captures the decode step) and replayed:
    the argmax follows logits that change between replays, the position advances, stochastic draws are fresh at
    every replay (the counter lives on the device) and the pool counter is reset on the device each time."""
    from engine.backends.cuda.sampling import DeviceSampler, partition

    cp = cuda.cp
    vocab = 128256
    rng = np.random.default_rng(0)
    _, size = partition(vocab)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        logits = cp.zeros((1, vocab), dtype=cp.float32)
        position = cp.zeros(1, dtype=cp.int32)
        greedy = DeviceSampler(cp, SamplingParams(temperature=0.0), [])
        greedy.launch(logits, position, advance=True)  # compiles outside the capture
        stream.synchronize()
        stream.begin_capture()
        greedy.launch(logits, position, advance=True)
        graph = stream.end_capture()
        for r, best in enumerate([vocab - 1, 0, 3 * size, 3 * size - 1, 70001]):
            host = rng.standard_normal(vocab).astype(np.float32)
            host[best] = 10.0
            logits[...] = cp.asarray(host[None])
            graph.launch(stream)
            stream.synchronize()
            assert int(greedy.token.get()[0]) == best, r
            assert int(position.get()[0]) == r + 2

        a, b, c = 5, vocab - 7, 2 * size + 3  # in different slices
        host = (rng.standard_normal(vocab) - 60.0).astype(np.float32)
        host[[a, b]] = 0.0
        logits[...] = cp.asarray(host[None])
        params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=4)
        sampler = DeviceSampler(cp, params, [])
        sampler.launch(logits, position, advance=False)
        stream.synchronize()
        stream.begin_capture()
        sampler.launch(logits, position, advance=False)
        graph = stream.end_capture()
        draws = []
        for _ in range(200):
            graph.launch(stream)
            stream.synchronize()
            draws.append(int(sampler.token.get()[0]))
        assert set(draws) == {a, b} and 60 <= draws.count(a) <= 140
        assert int(sampler.counter.get()[0]) == 201
        assert int(sampler.pool_count.get()[0]) == 2
        host[c] = 50.0
        logits[...] = cp.asarray(host[None])
        graph.launch(stream)
        stream.synchronize()
        assert int(sampler.token.get()[0]) == c
        assert int(sampler.pool_count.get()[0]) == 1


def dev_sampler_script():
    """dev/cuda/sampler.py (it keeps the previous single-block kernel, OLD_SOURCE, and compares against it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "dev" / "cuda" / "sampler.py"
    spec = importlib.util.spec_from_file_location("dev_cuda_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["greedy", "greedy/penalty", "stoch/peaked", "stoch/spread", "flat"])
@pytest.mark.parametrize("vocab", [7, 2049, 32000, 152064])
def test_device_sampler_matches_the_single_block_kernel(cuda, vocab, mode):
    """Step by step on fresh logits, with a repetition penalty: the split's tokens, penalised logits, ring, ring
    count, counter and position are identical to the previous one-block kernel's (same seed and counter)."""
    dev = dev_sampler_script()
    params, shape = dev.MODES[mode] if mode in dev.MODES else (
        SamplingParams(temperature=1.5, top_k=7, top_p=1.0, min_p=0.0, repeat_penalty=1.2, seed=5), "flat")
    assert dev.compare(cuda.cp, vocab, params, shape, steps=25, seed=vocab) == []


def test_kv_cache_beyond_gpu_memory_is_a_clear_error(cuda):
    from engine.errors import DeviceError

    # the memory plan refuses this before load (tests/test_memory.py); allocating anyway is a DeviceError too
    with pytest.raises(DeviceError, match=r"GPU out of memory allocating the KV cache for 1000000000 tokens "
                                          r"\([\d.]+ GiB\); lower the context with -c/--ctx-size"):
        cuda.new_cache(30, 10**9, 3, 64)  # ~720 GiB
