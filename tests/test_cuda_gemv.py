"""The one-token GEMV kernels (kernels/gemv.cu, launched by engine/backends/cuda/gemv.py) at real model
widths, against the numpy model of their arithmetic (gemv.reference) and the float product (marker `cuda`,
except the first test, which checks the numpy model itself on the CPU).

Tolerances (relative L2 error): against the numpy model of the same arithmetic (int8 input per block of 32,
exact integer dots, fp32 scaling) 1e-5, fp32 outputs that differ only by summation order; against the float
product, quantized weights 1.5e-2 (measured 4.3e-3 .. 1.1e-2; Q4_1's large block offsets cancel the most):
the int8 input carries a relative error of about 0.5% (rounding to a step of max|x|/127, max|x| ~ 2.1
sigma over a Gaussian block of 32: rms error 0.29 steps = 0.5% of sigma), float weights 1e-5. A full layer and a 2-layer model go through act_t rounding and attention as well:
LAYER_TOL against the CPU's float32 forward.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from engine.backends.cuda import gemv
from engine.bench import synthetic_weight, synthetic_weights
from engine.config import ModelConfig, RopeConfig
from engine.models.presets import PRESETS as SHAPE_PRESETS
from engine.sampling import SamplingParams
from prenorm_emulation import rounded
from engine.weights.quant import GGMLType

DTYPES = ("f16", "bf16")
TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
         GGMLType.Q4_K, GGMLType.Q6_K)
MODEL_TOL = 1e-5
INT8_TOL = 1.5e-2
LAYER_TOL = {"f16": 1.5e-2, "bf16": 2e-2}  # measured on the H200: 4.4e-3 .. 6.3e-3 (both dtypes)
# (d_model, heads, kv heads, ffn) of the Llama shape presets (engine/models/presets.py: 1B, 7B, 8B, 70B)
PRESETS = {name: (c.d_model, c.n_heads, c.n_kv_heads, c.ffn_dim) for name, c in SHAPE_PRESETS.items()
           if c.architecture == "llama"}


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("ggml_type", [t for t in TYPES if t in gemv.INT8_TYPES], ids=lambda t: t.name)
def test_numpy_model_is_the_float_product_up_to_int8_input(ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    tensor = synthetic_weight("w", ggml_type, (64, 512), rng, 1 / 16)
    x = rng.standard_normal(512).astype(np.float32)
    q, d, s = gemv.quantize_q8(x)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and d.shape == s.shape == (16,)
    assert np.allclose(q.reshape(16, 32) * d[:, None], x.reshape(16, 32), atol=d.max() / 2 + 1e-7)
    ref = dequantize_product(tensor, x)
    err = rel_err(gemv.reference(x, tensor), ref)
    assert 1e-4 < err < INT8_TOL  # the int8 input's own error: present, and small
    # a zero block quantizes to zeros (no division by zero)
    q0, d0, _ = gemv.quantize_q8(np.zeros(64, np.float32))
    assert not q0.any() and not d0.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_model_of_a_prenormed_input_is_the_normed_input_up_to_act_t(dtype):
    """prenorm_outputs + prenormed_q8 (the int8 values of x * w, scales and sums times rsqrt(mean(x^2) + eps)) are
    the composed path's quantization of act_t(x * inv * w) but for that act_t rounding: the same int8 values except
    where the rounding moves a value across a .5 boundary (a bf16 step is 2^-9 of a value, an fp16 one 2^-12)."""
    rng = np.random.default_rng(11)
    d = 4096
    x = (rng.standard_normal(d) * rng.uniform(0.1, 3, d)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    staged, partials = gemv.prenorm_outputs(x, w, per_block=32 * 5)
    assert staged.dtype == np.uint8 and staged.size == gemv.staged_bytes(d) and partials.shape == (-(-d // 160),)
    q, dq, sq = gemv.prenormed_q8(staged, partials, 1e-5)
    inv = np.float32(1 / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5))
    q_c, d_c, s_c = gemv.quantize_q8(rounded(x * inv * w, dtype))
    flipped = np.count_nonzero(q != q_c)  # measured (3 seeds): f16 0.5-0.6%, bf16 4.6-5.7% of the values
    assert np.abs(q.astype(int) - q_c).max() <= 1 and flipped < {"f16": 0.015, "bf16": 0.1}[dtype] * d
    np.testing.assert_allclose(dq, d_c, rtol={"f16": 1e-3, "bf16": 8e-3}[dtype])  # max|v|'s rounding: 2^-11, 2^-8
    x_hat = (q.reshape(-1, 32) * dq[:, None]).reshape(-1)
    assert rel_err(x_hat, x * inv * w) < 1e-2  # the int8 input's own error
    np.testing.assert_allclose(sq, (x * w).reshape(-1, 32).sum(axis=1) * inv, rtol=1e-4, atol=1e-4)
    tensor = synthetic_weight("w", GGMLType.Q4_K, (64, d), rng, 1 / np.sqrt(d))
    # the products differ by the flipped values' steps: measured f16 1.3e-3 .. 2.4e-3, bf16 4.2e-3 .. 5.8e-3 (the
    # int8 input's own error against the float product: 6e-3 .. 9.5e-3)
    assert rel_err(gemv.reference(None, tensor, (q, dq, sq)), gemv.reference(rounded(x * inv * w, dtype), tensor)) \
        < {"f16": 4e-3, "bf16": 1e-2}[dtype]


def dequantize_product(tensor, x) -> np.ndarray:
    return tensor.dequantize().astype(np.float64) @ np.asarray(x, np.float64)


# ---- on the GPU -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    return cupy


def device_matrix(cp, tensor, name="output"):
    from engine.backends.cuda.weights import upload_weight

    return upload_weight(cp, name, tensor)


def act(cp, x, dtype):
    from engine.backends.cuda.weights import to_activation

    return to_activation(cp, cp.asarray(np.asarray(x, np.float32)), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(1024, 4096), (300, 28672), (2051, 8192)])
def test_gemv_matches_the_numpy_model_at_real_widths(cp, dtype, ggml_type, rows, cols):
    rng = np.random.default_rng(rows + cols + int(ggml_type))
    tensor = synthetic_weight("output", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
    m = device_matrix(cp, tensor)  # an output head: fp32 out, no act_t rounding of the result
    x = rounded(rng.standard_normal(cols), dtype)
    y = cp.full(rows, np.nan, dtype=cp.float32)
    gemv.gemv(act(cp, x, dtype), m, y, dtype)
    got = cp.asnumpy(y)
    assert rel_err(got, gemv.reference(x, tensor)) < MODEL_TOL
    err = rel_err(got, dequantize_product(tensor, x))
    print(f"{ggml_type.name} {rows}x{cols} {dtype}: vs float {err:.1e}")
    assert err < (INT8_TOL if ggml_type in gemv.INT8_TYPES else MODEL_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", [GGMLType.F32, GGMLType.F16, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_gemv_add_over_a_70b_ffn_row(cp, dtype, ggml_type):
    """Rows of a 70B's down projection (cols 28,672): F32 stages 112 KB (opt-in shared memory)."""
    rng = np.random.default_rng(7)
    rows, cols = 1024, 28672
    tensor = synthetic_weight("blk.0.ffn_down", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
    m = device_matrix(cp, tensor, "blk.0.ffn_down")
    a = rounded(rng.standard_normal(cols), dtype)
    x0 = rng.standard_normal(rows).astype(np.float32)
    x = cp.asarray(x0)
    gemv.gemv_add(act(cp, a, dtype), m, x, dtype)
    delta = cp.asnumpy(x) - x0
    assert rel_err(delta, rounded(gemv.reference(a, tensor), dtype)) < 5e-3  # act_t rounding of the sum
    for per_block in (8, 64):  # any tasks_per_block gives the same result
        x2 = cp.asarray(x0)
        gemv.gemv_add(act(cp, a, dtype), m, x2, dtype, per_block=per_block)
        np.testing.assert_array_equal(cp.asnumpy(x2), cp.asnumpy(x))


def staged_input(cp, a, dtype):
    """a (n,) act_t quantized ahead (gemv.quantize_input: what gate_up's and dca_combine's epilogues write)."""
    staged = cp.full(gemv.staged_bytes(a.shape[-1]), 0xAB, dtype=cp.uint8)
    gemv.quantize_input(a, staged, dtype)
    return staged


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", [t for t in TYPES if t in gemv.INT8_TYPES], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(4096, 14336), (77, 4096), (40, 1536)])
def test_gemv_add_reads_a_staged_input_as_it_would_stage_it(cp, dtype, ggml_type, rows, cols):
    """The staged bytes are the numpy model's quantization of the act_t input, and gemv_add reading them gives, bit
    for bit, the residual it gives quantizing the input itself (odd rows: a warp's last row without a partner)."""
    rng = np.random.default_rng(rows + cols + int(ggml_type))
    tensor = synthetic_weight("blk.0.ffn_down", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
    m = device_matrix(cp, tensor, "blk.0.ffn_down")
    a_host = rounded(rng.standard_normal(cols) * 3, dtype)
    a_host[:32] = 0.0  # a zero block: d = 0, q = 0
    a = act(cp, a_host, dtype)
    staged = cp.asnumpy(staged_input(cp, a, dtype))
    q, d, s = gemv.quantize_q8(a_host)
    np.testing.assert_array_equal(staged[:cols].view(np.int8), q)
    scales = staged[cols:].view(np.float32)
    np.testing.assert_array_equal(scales[:cols // 32], d)
    np.testing.assert_allclose(scales[cols // 32:], s, rtol=1e-5, atol=1e-5)
    x0 = rng.standard_normal(rows).astype(np.float32)
    quantizing, reading = cp.asarray(x0), cp.asarray(x0)
    gemv.gemv_add(a, m, quantizing, dtype)
    gemv.gemv_add(a, m, reading, dtype, staged=cp.asarray(staged))
    np.testing.assert_array_equal(cp.asnumpy(reading), cp.asnumpy(quantizing))
    assert rel_err(cp.asnumpy(quantizing) - x0, rounded(gemv.reference(a_host, tensor), dtype)) < 5e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(128256, 4096), (1000, 4096), (128256, 8192), (49152, 2048), (37, 2048)])
def test_head_ring_equals_the_plain_head(cp, dtype, rows, d):
    """head_ring (the Q6_K head's rows streamed through shared memory by the bulk copy engine, Hopper) gives the plain
    head's logits bit for bit, staging its input or reading it prenormed, at vocabularies of real models (Llama 3 at
    d 4096 and 8192, SmolLM2's vocabulary at d 2048) and at row counts that leave partial stages (1000, 37). Rows
    of d / 256 * 210 bytes must be 16-byte multiples (d a multiple of 2048): Qwen2.5-7B's d 3584 keeps the plain head."""
    if gemv._compute_capability() < 90:
        pytest.skip("head_ring needs compute capability 9.0 (cp.async.bulk)")
    rng = np.random.default_rng(rows + d)
    tensor = synthetic_weight("output", GGMLType.Q6_K, (rows, d), rng, 1 / np.sqrt(d))
    m = device_matrix(cp, tensor)
    assert gemv.head_uses_ring(m)
    assert not gemv.head_uses_ring(device_matrix(cp, synthetic_weight("output", GGMLType.Q6_K, (8, 3584), rng, 0.02)))
    x, w = normed_residual(rng, d)
    prenormed, _ = prenormed_input(cp, x, w)
    for source in (None, prenormed):
        ring, plain = (cp.full(rows, np.nan, dtype=cp.float32) for _ in range(2))
        gemv.head(cp.asarray(x), cp.asarray(w), 1e-5, m, ring, dtype, prenormed=source)
        gemv.head(cp.asarray(x), cp.asarray(w), 1e-5, m, plain, dtype, prenormed=source, ring=False)
        np.testing.assert_array_equal(cp.asnumpy(ring), cp.asnumpy(plain), err_msg=f"prenormed {source is not None}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("ffn,d", [(14336, 4096), (96, 512)])
def test_gate_up_stages_its_output_for_the_down_product(cp, dtype, ggml_type, ffn, d):
    """With out_staged, gate_up (blocks of whole 32-row groups) writes the same output, and that output quantized as
    quantize_input quantizes it."""
    rng = np.random.default_rng(ffn + d + int(ggml_type))
    wg, wu = (device_matrix(cp, synthetic_weight(f"blk.0.ffn_{n}", ggml_type, (ffn, d), rng, 1 / np.sqrt(d)),
                            f"blk.0.ffn_{n}") for n in ("gate", "up"))
    x = cp.asarray(rng.standard_normal(d).astype(np.float32))
    norm = cp.asarray((1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    act_type = act(cp, np.zeros(1), dtype).dtype
    plain, staged_out = cp.empty(ffn, dtype=act_type), cp.empty(ffn, dtype=act_type)
    staged = cp.full(gemv.staged_bytes(ffn), 0xAB, dtype=cp.uint8)
    gemv.gate_up(x, norm, 1e-5, wg, wu, plain, dtype)
    gemv.gate_up(x, norm, 1e-5, wg, wu, staged_out, dtype, out_staged=staged)
    np.testing.assert_array_equal(cp.asnumpy(staged_out.view(cp.uint16)), cp.asnumpy(plain.view(cp.uint16)))
    np.testing.assert_array_equal(cp.asnumpy(staged), cp.asnumpy(staged_input(cp, plain, dtype)))


@pytest.mark.cuda
def test_head_over_152k_rows_past_2_gb(cp):
    """A 152,064 x 8,192 F16 head: 2.5 GB of rows, row offsets beyond 2^31 bytes."""
    rows, cols = 152064, 8192
    rng = np.random.default_rng(3)
    tail = (rng.standard_normal((64, cols)) / np.sqrt(cols)).astype(np.float16)
    from engine.backends.cuda.weights import DeviceMatrix

    data = cp.zeros((rows, 2 * cols), dtype=cp.uint8)
    data[-64:] = cp.asarray(tail.view(np.uint8))
    m = DeviceMatrix("output", GGMLType.F16, rows, cols, data, True)
    x = rng.standard_normal(cols).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    logits = cp.full(rows, np.nan, dtype=cp.float32)
    gemv.head(cp.asarray(x), cp.asarray(norm), 1e-5, m, logits, "f16")
    got = cp.asnumpy(logits)
    h = rounded(x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5) * norm, "f16")
    assert not got[:-64].any()
    assert rel_err(got[-64:], tail.astype(np.float64) @ h) < 1e-4
    del data


def one_layer(d, heads, kv, ffn, vocab=1000) -> ModelConfig:
    hd = d // heads
    return ModelConfig(n_layers=1, d_model=d, n_heads=heads, n_kv_heads=kv, head_dim=hd, ffn_dim=ffn,
                       vocab_size=vocab, norm_eps=1e-5, context_length=4096,
                       rope=RopeConfig(theta=500000.0, dim=hd, original_context=4096), name="layer")


@pytest.mark.cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_full_width_layer_decode_matches_cpu(preset):
    """One layer at a preset's widths (Q4_K matrices, Q8_0 head over 1,000 tokens): the fused CUDA decode
    step's logits and cache rows, in both activation dtypes, against the CPU backend's float32 forward."""
    from engine.backends import get_backend
    from engine.backends.cuda import fused
    from engine.models import Llama
    from engine.rope import RotaryTable

    config = one_layer(*PRESETS[preset])
    weights = synthetic_weights(config, GGMLType.Q4_K)
    prompt = np.random.default_rng(2).integers(0, config.vocab_size, 20)
    rotary = RotaryTable(config.rope, 64, context=64)

    def prefilled(backend):
        model = Llama(config, backend.prepare_weights(weights), backend, rotary, None)
        cache = backend.new_cache(1, 64, config.n_kv_heads, config.head_dim)
        model.forward(prompt[:-1], cache, logits_for="none")
        return model, cache

    cpu_model, cpu_cache = prefilled(get_backend("cpu"))
    ref = cpu_model.forward(prompt[-1:], cpu_cache, logits_for="last")
    for dtype in DTYPES:
        cuda = get_backend("cuda", dtype)
        model, cache = prefilled(cuda)
        blocks = model.decode_blocks
        assert isinstance(blocks, fused.FusedBlocks) and all(blocks.fused_attention) and blocks.fused_head
        token, position = cuda.tokens(prompt[-1:]), cuda.positions(len(prompt) - 1, 1)
        logits = cuda.to_numpy(model.compute(token, position, cache, "last"))
        err = rel_err(logits, ref)
        print(f"{preset} {dtype}: layer logits vs CPU {err:.1e}")
        assert err < LAYER_TOL[dtype]
        for name in ("k", "v"):
            row = cuda.to_numpy(getattr(cache, name)[:, len(prompt) - 1])
            # one Q4_K GEMV on the int8 input (measured 4.3e-3 .. 7.3e-3 at these widths) + act_t rounding
            assert rel_err(row, getattr(cpu_cache, name)[:, len(prompt) - 1]) < 2e-2


@pytest.mark.cuda
def test_two_layer_8b_width_gguf_end_to_end(tmp_path):
    """A 2-layer Q4_K model at Llama-3-8B widths written by tools/make_tiny_model.py, loaded by engine.load:
    GPU greedy decoding follows the CPU's (a divergence only where the CPU's top-2 logits nearly tie)."""
    pytest.importorskip("gguf")
    import engine

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import TinySpec, make_tiny_model

    spec = TinySpec(n_layers=2, d_model=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=512,
                    context_length=1024, rope_theta=500000.0)
    path = make_tiny_model(tmp_path, spec, gguf_types=("q4_k",), hf=False)["q4_k"]
    cpu = engine.load(path, device="cpu", context=256)
    gpu = engine.load(path, device="cuda", context=256, dtype="f16")
    prompt = np.random.default_rng(5).integers(3, 512, 40).tolist()
    err = rel_err(gpu.logits(prompt), cpu.logits(prompt))
    assert err < LAYER_TOL["f16"]
    greedy = SamplingParams(temperature=0.0)
    cpu_tokens = list(cpu.generate_ids(prompt, 16, greedy, stop_ids=[]))
    cache = gpu.new_cache()  # the graph decoder: fused decode steps
    decoder = gpu.backend.decoder(gpu.model, cache, greedy, prompt)
    gpu_tokens = [decoder.first(gpu.prefill(prompt, cache))]
    while len(gpu_tokens) < 16:
        gpu_tokens.append(decoder.step(gpu_tokens[-1]))
    assert type(gpu.model.decode_blocks).__name__ == "FusedBlocks"  # the steps ran the fused decode blocks
    print(f"8b-width 2 layers: prefill logits vs CPU {err:.1e}; tokens cpu {cpu_tokens} gpu {gpu_tokens}")
    for t, (a, b) in enumerate(zip(cpu_tokens, gpu_tokens)):
        if a != b:
            logits = np.sort(cpu.logits(prompt + cpu_tokens[:t])[-1])
            assert logits[-1] - logits[-2] < 0.1, f"diverged at token {t}"
            break


# ---- prenormed inputs: gemv_add's prenorm epilogue and the RMSNorm-fused products reading it -----------------

def assert_int8_equal_but_at_half_steps(got_q, u, d, where: str):
    """The kernel's int8 values of u (fp32) at scales d equal numpy's rint(u / d) except where u / d lies within float
    rounding of a .5 boundary (a division rounded the other way): those are counted and must be few."""
    ref_q = np.asarray(gemv.quantize_q8(u)[0], np.int64)
    differ = np.flatnonzero(np.asarray(got_q, np.int64) != ref_q)
    t = u.reshape(-1, 32).astype(np.float64) / np.where(d > 0, d, 1).astype(np.float64)[:, None]
    near_half = np.abs(np.abs(t.reshape(-1)) % 1 - 0.5) < 1e-5
    assert near_half[differ].all() and np.abs(got_q[differ].astype(np.int64) - ref_q[differ]).max(initial=0) <= 1, where
    assert len(differ) <= 4, f"{where}: {len(differ)} int8 values off by one"


@pytest.mark.cuda
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(4096, 4096), (4096, 14336), (32 * 67, 4096), (96, 512)])
def test_gemv_add_writes_the_next_products_prenormed_input(cp, ggml_type, rows, cols):
    """With prenorm outputs gemv_add leaves the residual as it does without them (bit for bit), and writes x * w
    quantized (int8 values as numpy's of the kernel's x, scales equal, sums to fp32 accuracy) and each block's sum of
    x^2 (fp32 accuracy), for any grid (8B widths, an odd multiple of 32, a small one; blocks of 8, 16 and 24 rows hand
    32-row groups off between two or three blocks, 40 between blocks that hold parts of two groups), and leaves every
    group's arrival count at zero (launch after launch: the same bytes the second time)."""
    dtype = "f16"
    rng = np.random.default_rng(rows + cols + int(ggml_type))
    tensor = synthetic_weight("blk.0.ffn_down", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
    m = device_matrix(cp, tensor, "blk.0.ffn_down")
    a = act(cp, rounded(rng.standard_normal(cols), dtype), dtype)
    x0 = (rng.standard_normal(rows) * rng.uniform(0.1, 4, rows)).astype(np.float32)
    w_next = cp.asarray(rng.uniform(0.5, 1.5, rows).astype(np.float32))
    plain = cp.asarray(x0)
    gemv.gemv_add(a, m, plain, dtype)
    arrivals = cp.zeros(rows // 32, dtype=cp.uint32)
    for per_block in (None, 8, 16, 24, 32, 40, 96, 160, 8):
        blocks = gemv.prenorm_blocks(rows, per_block)
        staged = cp.full(gemv.staged_bytes(rows), 0xAB, dtype=cp.uint8)
        partials = cp.full(blocks + 1, np.nan, dtype=cp.float32)  # one more than written: must stay untouched
        x = cp.asarray(x0)
        gemv.gemv_add(a, m, x, dtype, per_block=per_block, prenorm=gemv.Prenorm(w_next, staged, partials, arrivals))
        where = f"{rows}x{cols} {ggml_type.name} per_block {per_block}"
        assert not cp.asnumpy(arrivals).any(), where
        got_x = cp.asnumpy(x)
        np.testing.assert_array_equal(got_x, cp.asnumpy(plain), err_msg=where)
        ref_staged, ref_partials = gemv.prenorm_outputs(got_x, cp.asnumpy(w_next), per_block or
                                                        gemv.prenorm_per_block(rows))
        got = cp.asnumpy(staged)
        u = got_x * cp.asnumpy(w_next)
        d = got[rows:].view(np.float32)[:rows // 32]
        np.testing.assert_array_equal(d, ref_staged[rows:].view(np.float32)[:rows // 32], err_msg=where)
        assert_int8_equal_but_at_half_steps(got[:rows].view(np.int8), u, d, where)
        s, ref_s = got[rows:].view(np.float32)[rows // 32:], ref_staged[rows:].view(np.float32)[rows // 32:]
        np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5 * np.abs(u).max(), err_msg=where)
        got_partials = cp.asnumpy(partials)
        np.testing.assert_allclose(got_partials[:blocks], ref_partials, rtol=1e-5, err_msg=where)
        assert np.isnan(got_partials[blocks]), where


@pytest.mark.cuda
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(4096, 4096), (4096, 14336), (2048, 8192), (32 * 67, 4096), (96, 512)])
def test_the_cluster_hand_off_writes_the_atomic_hand_off_s_bytes(cp, monkeypatch, ggml_type, rows, cols):
    """Blocks of 8 and 16 rows launched as clusters of 4 and 2 (each cluster one 32-row group, quantized by its last
    block after a cluster barrier) leave the residual, the staged bytes and the partial sums bit for bit as the
    atomic hand-off does (gemv.CLUSTER_HANDOFF off), launch after launch, the arrival counts untouched."""
    from engine.backends.cuda import pdl

    if not pdl.clusters_available():
        pytest.skip("thread block clusters need compute capability 9.0 and cuLaunchKernelEx")
    dtype = "bf16"
    rng = np.random.default_rng(rows * 7 + cols + int(ggml_type))
    tensor = synthetic_weight("blk.0.ffn_down", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
    m = device_matrix(cp, tensor, "blk.0.ffn_down")
    a = act(cp, rounded(rng.standard_normal(cols), dtype), dtype)
    x0 = (rng.standard_normal(rows) * rng.uniform(0.1, 4, rows)).astype(np.float32)
    w_next = cp.asarray(rng.uniform(0.5, 1.5, rows).astype(np.float32))
    arrivals = cp.zeros(rows // 32, dtype=cp.uint32)
    for per_block in (None, 8, 16, 8):
        outputs = {}
        for cluster in (False, True, True):
            monkeypatch.setattr(gemv, "CLUSTER_HANDOFF", cluster)
            blocks = gemv.prenorm_blocks(rows, per_block)
            staged = cp.full(gemv.staged_bytes(rows), 0xAB, dtype=cp.uint8)
            partials = cp.full(blocks + 1, np.nan, dtype=cp.float32)
            x = cp.asarray(x0)
            gemv.gemv_add(a, m, x, dtype, per_block=per_block, prenorm=gemv.Prenorm(w_next, staged, partials,
                                                                                     arrivals))
            got = [cp.asnumpy(v) for v in (x, staged, partials)]
            where = f"{rows}x{cols} {ggml_type.name} per_block {per_block} cluster {cluster}"
            assert not cp.asnumpy(arrivals).any(), where
            for name, mine, theirs in zip(("x", "staged", "partials"), got, outputs.get(False, got)):
                np.testing.assert_array_equal(mine, theirs, err_msg=f"{where}: {name}")
            outputs.setdefault(cluster, got)


def prenormed_input(cp, x, w, per_block=96):
    """gemv_add's prenorm outputs for x (d,) fp32 and the norm weight w as numpy computes them, on the device, with
    the numpy model of what their consumer reads."""
    staged, partials = gemv.prenorm_outputs(x, w, per_block)
    device = gemv.Prenormed(cp.asarray(staged), cp.asarray(partials.astype(np.float32)), len(partials))
    return device, gemv.prenormed_q8(staged, partials.astype(np.float32), 1e-5)


def act_values(cp, a, dtype) -> np.ndarray:
    """A device act_t array's values as float32 (fp16, or bf16 bits)."""
    bits = cp.asnumpy(a.view(cp.uint16)).astype(np.uint32)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32) if dtype == "f16" else \
        (bits << 16).view(np.float32)


def normed_residual(rng, d):
    """A residual row (d,) fp32 of uneven magnitudes and an RMSNorm weight."""
    x = (rng.standard_normal(d) * rng.uniform(0.1, 4, d)).astype(np.float32)
    return x, rng.uniform(0.5, 1.5, d).astype(np.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", [t for t in TYPES if t in gemv.INT8_TYPES], ids=lambda t: t.name)
def test_head_reads_a_prenormed_input_as_the_numpy_model(cp, dtype, ggml_type):
    """head with a prenormed input: fp32 logits equal the numpy model of its input (prenormed_q8) to summation order,
    and the staging head's within the two roundings' distance (test_numpy_model_of_a_prenormed_input...)."""
    rng = np.random.default_rng(int(ggml_type) + 40)
    rows, d = 1000, 4096
    tensor = synthetic_weight("output", ggml_type, (rows, d), rng, 1 / np.sqrt(d))
    m = device_matrix(cp, tensor)
    x, w = normed_residual(rng, d)
    prenormed, q8 = prenormed_input(cp, x, w)
    logits, staging = (cp.full(rows, np.nan, dtype=cp.float32) for _ in range(2))
    gemv.head(cp.asarray(x), cp.asarray(w), 1e-5, m, logits, dtype, prenormed=prenormed)
    gemv.head(cp.asarray(x), cp.asarray(w), 1e-5, m, staging, dtype)
    got = cp.asnumpy(logits)
    assert rel_err(got, gemv.reference(None, tensor, q8)) < MODEL_TOL
    # the numpy models of the two paths on these inputs (CPU): f16 1.5e-3 .. 2.4e-3, bf16 4.6e-3 .. 7.8e-3 (Q4_1)
    assert rel_err(got, cp.asnumpy(staging)) < {"f16": 5e-3, "bf16": 1.5e-2}[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("ffn,d", [(14336, 4096), (96, 512), (96, 16384)])  # 16384: past the pieces a thread holds
def test_gate_up_reads_a_prenormed_input_as_the_numpy_model(cp, dtype, ggml_type, ffn, d):
    """gate_up with a prenormed input: act_t(silu(g) * u) of the numpy model's g, u (each rounded to act_t: a
    rounding flipped by summation order is one act_t step of a few values), and still stages its own output."""
    rng = np.random.default_rng(ffn + d + int(ggml_type))
    tensors = [synthetic_weight(f"blk.0.ffn_{n}", ggml_type, (ffn, d), rng, 1 / np.sqrt(d)) for n in ("gate", "up")]
    wg, wu = (device_matrix(cp, t, f"blk.0.ffn_{n}") for t, n in zip(tensors, ("gate", "up")))
    x, w = normed_residual(rng, d)
    prenormed, q8 = prenormed_input(cp, x, w)
    act_type = act(cp, np.zeros(1), dtype).dtype
    out = cp.empty(ffn, dtype=act_type)
    staged = cp.full(gemv.staged_bytes(ffn), 0xAB, dtype=cp.uint8)
    gemv.gate_up(cp.asarray(x), cp.asarray(w), 1e-5, wg, wu, out, dtype, out_staged=staged, prenormed=prenormed)
    g, u = (rounded(gemv.reference(None, t, q8), dtype) for t in tensors)
    ref = rounded(g * (0.5 + 0.5 * np.tanh(0.5 * g)) * u, dtype)
    assert rel_err(act_values(cp, out, dtype), ref) < {"f16": 1e-3, "bf16": 4e-3}[dtype]
    np.testing.assert_array_equal(cp.asnumpy(staged), cp.asnumpy(staged_input(cp, out, dtype)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("kv", [8, 32], ids=["8b", "7b-mha"])
def test_qkv_reads_a_prenormed_input_as_the_numpy_model(cp, dtype, ggml_type, kv):
    """qkv with a prenormed input at 8B and 7B widths (32 query heads, 8 or 32 KV heads of 128; the key blocks take
    half the tasks of the others): the query, the rotated key and the value rows of the numpy model's products
    (act_t rounded where the kernel rounds)."""
    rng = np.random.default_rng(int(ggml_type) + kv)
    d, heads, hd, position = 4096, 32, 128, 5
    tensors = [synthetic_weight(f"blk.0.attn_{n}", ggml_type, (r, d), rng, 1 / np.sqrt(d))
               for n, r in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd))]
    wq, wk, wv = (device_matrix(cp, t, t.name) for t in tensors)
    x, w = normed_residual(rng, d)
    prenormed, q8 = prenormed_input(cp, x, w)
    act_type = act(cp, np.zeros(1), dtype).dtype
    q_out = cp.empty(heads * hd, dtype=act_type)
    cache_k, cache_v = (cp.zeros((8, kv, hd), dtype=act_type) for _ in range(2))
    angles = np.arange(8)[:, None] * (1e4 ** (-np.arange(hd // 2) / (hd // 2)))[None, :]
    cos_t, sin_t = (cp.asarray(f(angles).astype(np.float32)) for f in (np.cos, np.sin))
    gemv.qkv(cp.asarray(x), cp.asarray(w), 1e-5, wq, wk, wv, None, q_out, cache_k, cache_v,
             cp.asarray(np.array([position], np.int32)), cos_t, sin_t, heads, kv, hd, hd, 0, dtype,
             prenormed=prenormed)

    def values(a):
        return act_values(cp, a, dtype)

    q_ref, k_ref, v_ref = (rounded(gemv.reference(None, t, q8), dtype) for t in tensors)
    k_ref = k_ref.reshape(kv, 2, hd // 2)
    c, s = np.cos(angles[position]).astype(np.float32), np.sin(angles[position]).astype(np.float32)
    k_rot = rounded(np.concatenate([k_ref[:, 0] * c - k_ref[:, 1] * s, k_ref[:, 1] * c + k_ref[:, 0] * s], axis=1),
                    dtype)
    tol = {"f16": 1e-3, "bf16": 4e-3}[dtype]
    assert rel_err(values(q_out), q_ref) < tol
    assert rel_err(values(cache_k[position]).reshape(kv, hd), k_rot) < tol
    assert rel_err(values(cache_v[position]).reshape(-1), v_ref) < tol
    assert not values(cache_k[position - 1]).any()  # only the token's row is written
