"""The q8_0 KV cache on the CUDA backend (engine/backends/cuda/kv_q8.py): --cache-type-k / --cache-type-v q8_0.

CPU tests (no marker): option resolution and refusals, the memory plan's cache and scratch bytes, the ggml block
layout of the rows, the decode kernel's shared memory, and the launch arguments of every new kernel against the
parameters NVRTC compiles. GPU tests (marker `cuda`, skipped without one): the stored bytes against the CPU encoder,
whole-model logits (prefill, then decode steps) and greedy tokens against the CPU backend with the same cache types
(tolerances of tests/test_cuda_model.py's 16-bit runs), with DCA crossing chunks, GQA, head_dim 32 (the simple
kernel), 64 and 128 (the fused kernels), K only / V only / both; graph replay against eager steps; a session file
round trip; `engine info` / `engine bench` on CUDA; a context past 128k tokens.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import memory
from engine.backends.cuda import flash_attention as fa
from engine.backends.cuda import kv_q8, pdl
from engine.convert.quantize import encode_rows
from engine.errors import ConfigError
from engine.kv_storage import resolve_cache_types, row_bytes
from engine.loader import open_model
from engine.weights.quant import GGMLType, dequantize
from kernel_abi import Recorder, kind, params
from gpu_greedy import GREEDY, assert_follows_cpu, greedy_on_gpu
from prenorm_emulation import DECODE_STEP_TOL as STEP_TOL, PRENORMED_TOL, staging_only

DTYPES = ("f16", "bf16")
LOGITS_TOL = {"f16": 1e-2, "bf16": 3e-2}  # tests/test_cuda_model.py's, for 16-bit caches
# (K, V) cache types on the GPU; "native" is the activation dtype (the CPU reference stores the same types)
NATIVE_PAIR = ("native", "native")  # the 16-bit cache: the baseline of the q8_0 pairs
TYPE_PAIRS = (NATIVE_PAIR, ("q8_0", "q8_0"), ("q8_0", "native"), ("native", "q8_0"))
# head_dim 32: the simple tiled kernel (prefill and decode through the dequantized scratch); 64 and 128: the fused
# kernels (decode reads q8_0 directly); GQA groups 2 and 4
SPECS = {"d32": dict(d_model=128, n_heads=4, n_kv_heads=2, ffn_dim=128),
         "d64": dict(d_model=256, n_heads=4, n_kv_heads=1, ffn_dim=256),
         "d128": dict(d_model=256, n_heads=2, n_kv_heads=1, ffn_dim=256)}
DCA = dict(context=640, dca="on", dca_chunk_size=96, dca_local_window=16)  # chunk_len 80: 500 tokens cross 6 chunks


def gpu_types(pair: tuple[str, str], dtype: str) -> tuple[str, str]:
    return tuple(dtype if t == "native" else t for t in pair)


# ------------------------------------------------------------------------------------------------ CPU: options
def test_cuda_takes_q8_0_for_keys_values_or_both():
    for dtype in DTYPES:
        assert resolve_cache_types("q8_0", None, "cuda", dtype, 128) == ("q8_0", dtype)
        assert resolve_cache_types(None, "q8_0", "cuda", dtype, 64) == (dtype, "q8_0")
        assert resolve_cache_types("q8_0", "q8_0", "cuda", dtype, 64) == ("q8_0", "q8_0")
        assert resolve_cache_types(dtype, None, "cuda", dtype, 64) == (dtype, dtype)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "f32", "bf16"])
def test_cuda_refuses_the_other_cache_types_by_name(name):
    with pytest.raises(ConfigError) as error:
        resolve_cache_types(None, name, "cuda", "f16", 128)
    assert str(error.value) == (f"--cache-type-v {name}: on CUDA the KV cache is kept in the activation dtype (f16) "
                                f"or as q8_0; the other cache types run on the CPU backend (--device cpu)")


def test_q8_0_on_cuda_needs_whole_blocks():
    with pytest.raises(ConfigError, match="--cache-type-k q8_0 stores blocks of 32 values along a head, but this "
                                          "model's heads have 48"):
        resolve_cache_types("q8_0", None, "cuda", "f16", 48)


# ------------------------------------------------------------------------------------------- CPU: memory plan
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """SPECS name -> a Q8_0 GGUF of that shape (2 layers, vocab 384, trained context 256)."""
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import TinySpec, make_tiny_model

    return {name: make_tiny_model(tmp_path_factory.mktemp(name), TinySpec(**spec, seed=7), gguf_types=("q8_0",),
                                  hf=False)["q8_0"] for name, spec in SPECS.items()}


def test_memory_plan_counts_the_q8_0_cache_and_its_scratch(tiny_models):
    loaded = open_model(tiny_models["d128"])
    c = loaded.config  # 2 layers, 1 KV head of 128
    plan = {types: memory.plan_memory(c, loaded.weights, 4096, "cuda", "f16", cache_types=types)
            for types in (("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "f16"), ("f16", "q8_0"))}
    assert row_bytes("q8_0", 128) == 136 and row_bytes("f16", 128) == 256
    assert plan[("f16", "f16")].kv_cache == 2 * 4096 * 1 * (256 + 256)
    assert plan[("q8_0", "q8_0")].kv_cache == 2 * 4096 * 1 * (136 + 136)  # 34/32 bytes a value
    assert plan[("q8_0", "f16")].kv_cache == plan[("f16", "q8_0")].kv_cache == 2 * 4096 * (136 + 256)
    # the dequantization scratch: one layer's rows of the context in 16 bits per q8_0 operand
    base = plan[("f16", "f16")].scratch
    assert plan[("q8_0", "q8_0")].scratch == base + 2 * 4096 * 1 * 128 * 2
    assert plan[("q8_0", "f16")].scratch == plan[("f16", "q8_0")].scratch == base + 4096 * 128 * 2
    longer = plan[("q8_0", "q8_0")].at_context(65536)
    assert longer.scratch == base + 2 * 65536 * 128 * 2 and longer.kv_cache == 2 * 65536 * 272
    assert plan[("q8_0", "q8_0")].with_slots(3).scratch == plan[("q8_0", "q8_0")].scratch  # shared by the slots
    assert plan[("q8_0", "q8_0")].with_slots(3).kv_cache == 3 * plan[("q8_0", "q8_0")].kv_cache


def test_memory_refusal_counts_the_scratch(tiny_models):
    loaded = open_model(tiny_models["d128"])
    plan = memory.plan_memory(loaded.config, loaded.weights, 100_000, "cuda", "f16", cache_types=("q8_0", "q8_0"))
    fits = memory.largest_context(plan, plan.total - 1)
    assert fits < 100_000 and plan.at_context(fits).total <= plan.total - 1 < plan.at_context(fits + 1).total


# ----------------------------------------------------------------------------------------- CPU: row layout
def test_rows_are_ggml_q8_0_blocks():
    """join_blocks / split_blocks (the session-file bytes of a CUDA q8_0 cache) are the CPU encoder's bytes."""
    x = np.random.default_rng(0).standard_normal((3, 5, 2, 128)).astype(np.float32)
    x[0, 0, 0, :32] = 0  # an all-zero block: d = 0
    raw = encode_rows(x.reshape(-1, 128), GGMLType.Q8_0).reshape(3, 5, 2, 136)
    q, d = kv_q8.split_blocks(raw, 128)
    assert q.shape == (3, 5, 2, 128) and q.dtype == np.int8 and d.shape == (3, 5, 2, 4) and d.dtype == np.float16
    np.testing.assert_array_equal(kv_q8.join_blocks(q, d), raw)
    values = q.reshape(3, 5, 2, 4, 32).astype(np.float32) * d.astype(np.float32)[..., None]
    np.testing.assert_array_equal(values.reshape(x.shape), dequantize(raw, GGMLType.Q8_0, x.shape))


def test_decode_kernel_shared_memory():
    # 3 query rotations + 4 warps x the larger of: their stages of (K, V) rows (16-bit tiles, or q8_0 values +
    # scales) and their fp32 output rows for the merge (padded rows with a q8_0 V)
    rotations, raw128, merge128 = 3 * 16 * 128 * 2, 16 * 128 + 16 * 8, 16 * (128 + 16) * 4
    assert fa.decode_config(128) == (16, 2) and fa.decode_config(128, True, False) == (32, 2)
    assert fa.decode_smem(128) == rotations + 4 * 2 * 2 * 16 * 128 * 2
    assert fa.decode_smem(128, config=(16, 3)) == rotations + 4 * 3 * 2 * 16 * 128 * 2
    assert fa.decode_smem(128, True, True) == rotations + 4 * 2 * 2 * 2 * raw128  # 32 keys a tile
    assert fa.decode_smem(128, True, True, config=(16, 2)) == rotations + 4 * merge128  # 2 x 2 x 2,176 < 9,216
    assert fa.decode_smem(64, True, False) == 3 * 16 * 64 * 2 + 4 * 2 * (32 * 64 + 32 * 4 + 32 * 64 * 2)
    builds = {kernel for _, kernel, _ in fa.launched_builds()}
    assert {f"dca_decode_q8_{d}_{kv}" for d in (64, 128) for kv in ("11", "10", "01")} <= builds


# ------------------------------------------------------------------------------------ CPU: launch arguments
class DeviceArray:
    """Stands in for a CuPy array argument (passed to the kernel as a pointer)."""

    def __init__(self, shape=(1,), dtype=np.float16):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.nbytes = self.size * self.dtype.itemsize
        self.flags = types.SimpleNamespace(c_contiguous=True)

    def __getitem__(self, index):
        return self


def _q8_rows(shape):
    return kv_q8.DeviceQ8Rows(DeviceArray(shape, np.int8), DeviceArray(shape[:-1] + (shape[-1] // 32,)))


@pytest.fixture
def recorded(monkeypatch):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) is not installed")
    from nvrtc_check import nvrtc_usable

    if not nvrtc_usable():
        pytest.skip("NVRTC library not found")
    launched = []

    def fake_function(file, kernel, dtype="f16", instance=None):
        launched.append(Recorder(kernel))
        launched[-1].build = (file, dtype, instance)
        return launched[-1]

    monkeypatch.setattr(kv_q8, "function", fake_function)
    monkeypatch.setattr(pdl, "ENABLED", False)  # plain launches (the dependent ones: tests/test_cuda_pdl.py)
    return launched


@pytest.mark.parametrize("k_q8,v_q8", [(True, True), (True, False), (False, True)])
def test_store_launch_matches_the_kernel(recorded, k_q8, v_q8):
    caches = [_q8_rows((64, 2, 128)) if q8 else DeviceArray((64, 2, 128)) for q8 in (k_q8, v_q8)]
    kv_q8.store(DeviceArray((3, 2, 128)), 256, DeviceArray((3, 2, 128)), 256, DeviceArray((3,), np.int32),
                DeviceArray(), DeviceArray(), *caches, 128, 48, "bf16")
    (launch,) = recorded
    assert [kind(a) for a in launch.args] == params("kv_q8", "store_kv_q8", "bf16")


def test_dequantize_launch_matches_the_kernel(recorded):
    kv_q8.dequantize(_q8_rows((64, 2, 128)), DeviceArray((64, 2, 128)), DeviceArray((5,), np.int32), 40, "f16")
    (launch,) = recorded
    assert [kind(a) for a in launch.args] == params("kv_q8", "dequant_kv_q8", "f16")


def test_load_blocks_launch_matches_the_kernel(recorded):
    rows = _q8_rows((5, 2, 128))
    kv_q8.load_blocks(DeviceArray((5 * 2 * 4 * 34,), np.uint8), rows, "bf16")
    (launch,) = recorded
    assert launch.build == ("kv_q8", "bf16", None)
    assert [kind(a) for a in launch.args] == params("kv_q8", "split_kv_q8_blocks", "bf16")


@pytest.mark.parametrize("config", [None, (16, 3), (32, 2)], ids=["production", "16x3", "32x2"])
@pytest.mark.parametrize("k_q8,v_q8", [(True, True), (True, False), (False, True), (False, False)])
def test_decode_launch_matches_the_kernel(monkeypatch, recorded, k_q8, v_q8, config):
    """flash_decode's arguments for each cache kind against its build's parameters (the checks on real arrays and
    the combine launch stubbed: no GPU here), for the production build and measurement variants (config: keys per
    tile, stages; their kernel takes the q8_0 builds' arguments for 16-bit caches too)."""
    class FakeCupy:
        int32, float32 = np.int32, np.float32
        empty = staticmethod(lambda shape, dtype=None: DeviceArray(shape, dtype or np.float32))
        ascontiguousarray = staticmethod(lambda x: x)

    monkeypatch.setitem(sys.modules, "cupy", FakeCupy)
    monkeypatch.setattr(fa, "_check", lambda *args, **kwargs: "f16")
    monkeypatch.setattr(fa, "combine", lambda *args: None)
    monkeypatch.setattr(fa, "_kernel", lambda build, dtype: Recorder(build[1]))
    smem = []
    monkeypatch.setattr(fa, "_launch", lambda fn, grid, args, shared, **options: (
        recorded.append(fn), fn(grid, None, args), smem.append(shared)))
    caches = [_q8_rows((512, 2, 128)) if q8 else DeviceArray((512, 2, 128)) for q8 in (k_q8, v_q8)]
    fa.flash_decode(DeviceArray((1, 8, 128)), *caches, DeviceArray((1,), np.int32), DeviceArray(), DeviceArray(),
                    rope_dim=128, n_splits=4, config=config)
    (launch,) = recorded
    file, kernel, instance = fa.decode_build(128, k_q8, v_q8, config)
    assert launch.name == kernel and smem == [fa.decode_smem(128, k_q8, v_q8, config)]
    assert [kind(a) for a in launch.args] == params(file, kernel, "f16", instance)


# ================================================================================================ GPU tests
def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def load_pair(path, pair, dtype, **settings):
    """(CPU LLM, CUDA LLM) of one model with the same cache types (the CPU's "native" = the GPU's dtype)."""
    k, v = gpu_types(pair, dtype)
    cpu = engine.load(path, device="cpu", cache_type_k=k, cache_type_v=v, **settings)
    gpu = engine.load(path, device="cuda", dtype=dtype, cache_type_k=k, cache_type_v=v, **settings)
    assert gpu.cache_types == cpu.cache_types == (k, v)
    return cpu, gpu


def stepwise_logits(llm, prompt, steps) -> np.ndarray:
    """Prefill `prompt` (in the backend's prefill batches), then feed `steps` one token at a time (CUDA: the fused
    decode blocks) -> (1 + steps, vocab): the prompt's last logits, then each step's."""
    cache = llm.new_cache()
    rows = [llm.prefill(prompt, cache)]
    for token in steps:
        rows.append(llm.backend.to_numpy(llm.model.forward(np.asarray([token]), cache, logits_for="last"))[0])
    return np.stack(rows)


@pytest.mark.cuda
@pytest.mark.parametrize("rows, heads, head_dim", [(1, 1, 32), (7, 3, 64), (257, 8, 128), (4099, 2, 96)])
def test_load_blocks_splits_as_numpy_does(rows, heads, head_dim):
    """A session file's q8_0 blocks (any bytes: NaN and inf scales too) split on the device into the rows of a layer
    of a larger cache (a view, as a restore's piece) equal kv_q8.split_blocks' values and scales; the rows around
    them are untouched."""
    import cupy as cp

    raw = np.random.default_rng(rows).integers(0, 256, rows * heads * head_dim // 32 * 34, dtype=np.uint8)
    store = kv_q8.DeviceQ8Rows.zeros(cp, (2, rows + 9, heads, head_dim))
    target = store[1, 4:4 + rows]
    kv_q8.load_blocks(cp.asarray(raw), target, "f16")
    q, d = kv_q8.split_blocks(raw.reshape(rows, heads, -1), head_dim)
    assert np.array_equal(target.q.get(), q)
    assert np.array_equal(target.d.get().view(np.uint16), d.view(np.uint16))
    assert not store.q[0].any() and not store.q[1, :4].any() and not store.q[1, 4 + rows:].any()
    assert not store.d[1, 4 + rows:].view(cp.uint16).any()
    with pytest.raises(ValueError):
        kv_q8.load_blocks(cp.asarray(raw[:-2]), target, "f16")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_writes_the_cpu_encoders_bytes(dtype):
    """Rows stored through the q8_0 store are the CPU encoder's bytes of the values the 16-bit store writes (keys
    rotated at their DCA position); decoding them into the scratch gives q * d in the activation dtype."""
    import cupy as cp

    from engine.backends.cuda import CudaBackend
    from engine.backends.cuda.weights import to_activation
    from engine.config import DCAConfig, RopeConfig
    from engine.rope import RotaryTable

    backend = CudaBackend(dtype)
    n, heads, head_dim, capacity = 37, 2, 128, 300
    rotary = RotaryTable(RopeConfig(theta=10000.0, dim=head_dim), 512)
    dca = DCAConfig(chunk_size=96, local_window=16)
    rng = np.random.default_rng(1)
    k_act, v_act = (to_activation(cp, cp.asarray(rng.standard_normal((n, heads, head_dim)) * 3, dtype=cp.float32),
                                  dtype) for _ in range(2))
    positions = backend.positions(200, n)
    plain = backend.new_cache(1, capacity, heads, head_dim)
    quantized = backend.new_cache(1, capacity, heads, head_dim, ("q8_0", "q8_0"))
    for cache in (plain, quantized):
        backend.store_kv(cache, 0, k_act, v_act, positions, rotary, dca)
    for name in ("k", "v"):
        values = backend.to_numpy(getattr(plain, name)[0, 200:200 + n])  # float32 of the 16-bit rows
        expected = encode_rows(values.reshape(-1, head_dim), GGMLType.Q8_0).reshape(n, heads, -1)
        stored = getattr(quantized, name)[0, 200:200 + n].to_bytes()
        np.testing.assert_array_equal(stored, expected, err_msg=name)
        assert not getattr(quantized, name)[0, :200].to_bytes().any()  # nothing written elsewhere
        decoded = backend.kv_scratch.rows16(name, getattr(quantized, name)[0], positions, 200 + n)
        np.testing.assert_array_equal(
            backend.to_numpy(decoded[200:]),
            backend.to_numpy(to_activation(cp, cp.asarray(dequantize(expected, GGMLType.Q8_0, (n, heads, head_dim))),
                                           dtype)))


def round_to_activation(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to nearest even in the activation dtype, as float32 (numpy alone: no GPU rounding)."""
    if dtype == "f16":
        return values.astype(np.float16).astype(np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return np.where(np.isnan(values), np.float32("nan"), rounded.view(np.float32))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_gives_q_times_d_rounded_once_for_every_byte(dtype):
    """Every int8 value (-128 .. 127) times fp16 scales of every kind -- normal over fp16's range, subnormal,
    negative, zero, large enough that q * d overflows, inf and NaN -- decoded by the q8_0 kernels (dequant_kv_q8, and
    the decode kernel through the same q8_to_act8) is the exact product rounded once to the activation dtype:
    bit for bit where finite, inf and NaN where the product is."""
    import cupy as cp

    from engine.backends.cuda import CudaBackend

    backend = CudaBackend(dtype)
    rng = np.random.default_rng(7)
    scales = np.concatenate([
        (2.0 ** rng.uniform(-14, 15, 40)).astype(np.float16),  # normal fp16 scales
        np.float16(2.0 ** -24) * rng.integers(1, 1024, 8).astype(np.float16),  # subnormal
        -(2.0 ** rng.uniform(-10, 5, 8)).astype(np.float16),  # negative (a session file's arbitrary bytes)
        np.array([0, 65504, 600, 516, 2 ** -14, np.inf, -np.inf, np.nan], np.float16)])
    heads, head_dim = 1, 256  # a row holds every byte value once, in 8 blocks of its own scale
    rows = len(scales) // 8
    q = np.tile(np.arange(-128, 128, dtype=np.int8), rows).reshape(rows, heads, head_dim)
    for r in range(rows):  # the values in another order in every row: each block meets other bytes
        q[r, 0] = rng.permutation(q[r, 0])
    d = scales.reshape(rows, heads, head_dim // 32)
    store = kv_q8.DeviceQ8Rows(cp.asarray(q), cp.asarray(d))
    out = cp.zeros((rows, heads, head_dim), dtype=cp.float16 if dtype == "f16" else cp.uint16)
    kv_q8.dequantize(store, out, backend.positions(rows - 1, 1), rows, dtype)
    decoded = backend.to_numpy(out)
    exact = q.astype(np.float32) * np.repeat(d.astype(np.float32), 32, axis=-1)  # exact: 8 x 11 significant bits
    expected = round_to_activation(exact, dtype)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(decoded[finite].view(np.uint32), expected[finite].view(np.uint32))
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(expected))
    np.testing.assert_array_equal(decoded[np.isinf(expected)], expected[np.isinf(expected)])
    assert finite.sum() > 0.8 * finite.size and np.isinf(expected).any() and np.isnan(expected).any()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_prefill_and_decode_steps_match_cpu(tiny_models, spec, dtype):
    """500 tokens with DCA (chunk_len 80), then 8 decode steps, for each cache pair: every row of logits against the
    CPU backend storing the same cache types; and a q8_0 cache takes the GPU's steps no further from the CPU's than
    the 16-bit cache does (but for a few flipped roundings)."""
    rng = np.random.default_rng(2)
    prompt, steps = rng.integers(3, 384, 500).tolist(), rng.integers(3, 384, 8).tolist()
    errors = {}
    for pair in TYPE_PAIRS:
        cpu, gpu = load_pair(tiny_models[spec], pair, dtype, **DCA)
        prefill_err = rel_err(gpu.logits(prompt), cpu.logits(prompt))
        gpu_steps, cpu_steps = stepwise_logits(gpu, prompt, steps), stepwise_logits(cpu, prompt, steps)
        errors[pair] = prefill_err, max(rel_err(g, c) for g, c in zip(gpu_steps[1:], cpu_steps[1:]))
        print(f"{spec} {pair} {dtype}: prefill rel err {errors[pair][0]:.2e}, decode steps max {errors[pair][1]:.2e}")
    native_steps = errors[NATIVE_PAIR][1]
    for pair, (prefill_err, step_err) in errors.items():
        assert prefill_err < LOGITS_TOL[dtype] and step_err < STEP_TOL[dtype], pair
        assert step_err <= 2 * native_steps + 5e-3, pair


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", TYPE_PAIRS, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_fused_step_equals_the_composed_step(tiny_models, spec, pair, dtype):
    """One decode step through the fused blocks (qkv into the 16-bit scratch, the quantizing store, the q8_0 decode
    kernel) against the model's composed blocks on the same cache: with every RMSNorm-fused product staging its
    input, the same logits but for RMSNorm's summation order (a flipped rounding of a q8_0 value counts one quantum);
    with the prenormed inputs (Q8_0 weights), within their rounding's distance (tests/prenorm_emulation.py
    PRENORMED_TOL, measured on these models too)."""
    k, v = gpu_types(pair, dtype)
    llm = engine.load(tiny_models[spec], device="cuda", dtype=dtype, cache_type_k=k, cache_type_v=v, slots=3, **DCA)
    model = llm.model
    prompt = np.random.default_rng(5).integers(3, 384, 500).tolist()
    caches = llm.caches  # three caches of their own (new_cache empties the one it returns)
    for cache in caches:
        llm.prefill(prompt, cache)
    blocks = model.decode_blocks
    assert blocks.normed_head
    prenormed = llm.backend.to_numpy(model.forward(np.asarray([77]), caches[0], logits_for="last"))
    normed = blocks.normed_qkv, blocks.normed_gate_up, blocks.normed_head
    staging_only(blocks)
    model.decode_blocks = model  # the composed blocks
    try:
        composed = llm.backend.to_numpy(model.forward(np.asarray([77]), caches[1], logits_for="last"))
        model.decode_blocks = blocks
        staged = llm.backend.to_numpy(model.forward(np.asarray([77]), caches[2], logits_for="last"))
    finally:
        model.decode_blocks = blocks
        blocks.normed_qkv, blocks.normed_gate_up, blocks.normed_head = normed
    err, err_prenormed = rel_err(staged, composed), rel_err(prenormed, composed)
    print(f"{spec} {pair} {dtype}: fused vs composed step rel err {err:.2e}, prenormed {err_prenormed:.2e}")
    assert err < 5e-3 and err_prenormed < PRENORMED_TOL["logits"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", TYPE_PAIRS, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("spec", ["d32", "d64", "d128"])
def test_graph_decoder_matches_eager_and_cpu_greedy(tiny_models, spec, pair, dtype):
    """The captured step (qkv into the scratch, the quantizing store, the q8_0 decode kernel) replays what the eager
    steps compute; greedy tokens follow the CPU's but where its top-2 logits are close."""
    cpu, gpu = load_pair(tiny_models[spec], pair, dtype, **DCA)
    prompt = np.random.default_rng(3).integers(3, 384, 300).tolist()
    graph_tokens, cache, _ = greedy_on_gpu(gpu, prompt, 40)
    assert cache.length == len(prompt) + 39
    eager_tokens, _, _ = greedy_on_gpu(gpu, prompt, 40, use_graph=False)
    assert graph_tokens == eager_tokens
    cpu_tokens = list(cpu.generate_ids(prompt, 40, GREEDY, stop_ids=[]))
    assert_follows_cpu(cpu, prompt, cpu_tokens, graph_tokens, dtype, f"{spec} {pair} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("pair", [("q8_0", "q8_0"), ("native", "q8_0")], ids=lambda p: "-".join(p))
def test_session_file_round_trip_on_cuda(tiny_models, tmp_path, pair):
    """A CUDA q8_0 cache saved (as ggml q8_0 blocks) and restored into a fresh load holds the same bytes, and the
    conversation continues as it would have."""
    k, v = gpu_types(pair, "f16")
    settings = dict(device="cuda", dtype="f16", cache_type_k=k, cache_type_v=v, **DCA)
    first = engine.load(tiny_models["d64"], **settings).session()
    prompt = np.random.default_rng(4).integers(3, 384, 200).tolist()
    list(first.generate_ids(prompt, 4, GREEDY, stop_ids=[]))
    path = tmp_path / "q8.session"
    first.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()["cache_types"] == f"{k}/{v}"
        saved_k, saved_v = f.get_tensor("k"), f.get_tensor("v")
    assert saved_v.dtype == np.uint8 and saved_v.shape == (2, len(first.tokens), 1, 68)  # 2 blocks of 34
    assert (saved_k.dtype, saved_k.shape[-1]) == ((np.uint8, 68) if k == "q8_0" else (np.float16, 64))
    second = engine.load(tiny_models["d64"], **settings).session()
    second.load(path)
    assert second.tokens == first.tokens
    for a, b in zip(first.cache.host_rows(), second.cache.host_rows()):
        np.testing.assert_array_equal(a, b)
    follow = prompt + [7, 9, 11]
    assert (list(first.generate_ids(follow, 12, GREEDY, stop_ids=[]))
            == list(second.generate_ids(follow, 12, GREEDY, stop_ids=[])))


@pytest.mark.cuda
def test_info_bench_and_refusals_on_cuda(tiny_models):
    run = [sys.executable, "-m", "engine"]
    model = str(tiny_models["d128"])
    context = 1 << 21  # 2 layers x 1 KV head: 1.06 GiB of q8_0 rows (34/32 bytes a value), 2.00 GiB of f16 ones
    for flags, expected in (([], f"{2 * context * 512 / 2**30:.2f} GiB on CUDA (fp16)"),
                            (["-ctk", "q8_0", "-ctv", "q8_0"], f"{2 * context * 272 / 2**30:.2f} GiB on CUDA (k q8_0, v q8_0)"),
                            (["-ctv", "q8_0"], f"{2 * context * 392 / 2**30:.2f} GiB on CUDA (k f16, v q8_0)")):
        info = subprocess.run(run + ["info", "-m", model, "-c", str(context), "--device", "cuda", "--dtype", "f16"]
                              + flags, capture_output=True, text=True)
        assert info.returncode == 0, info.stderr
        kv_line = next(line for line in info.stdout.splitlines() if line.startswith("plan: KV cache"))
        assert kv_line.endswith(expected), kv_line
    bench = subprocess.run(run + ["bench", "-m", model, "--device", "cuda", "-ctk", "q8_0", "-ctv", "q8_0", "-p", "64",
                                  "-d", "300", "-n", "8", "-r", "1", "--json", "--no-hf"], capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert report["cache_types"] == "q8_0/q8_0" and all(r["tokens_per_s"] > 0 for r in report["results"])
    bad = subprocess.run(run + ["generate", "-m", model, "--device", "cuda", "-p", "hi", "-ctk", "q4_0"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --cache-type-k q4_0: on CUDA the KV cache is kept")


Q8_0_TOL = 2e-2  # a q8_0 cache against a 16-bit one (not the same cache types): on the CPU, these models' logits
# differ from an f32 cache's by 5e-3 .. 8.4e-3 (500 and 3000 tokens, DCA); an offset gone wrong gives garbage
Q8_0_TOL_131K = 3e-2  # at 131,200 tokens the rounding adds up: 1.98e-2 on an H100 (staged inputs; 2.04e-2 prenormed)


@pytest.mark.cuda
def test_context_past_128k(tiny_models):
    """131,200 tokens (DCA, chunk_len 160: 820 chunks): a q8_0 cache's last logits and decode steps against the same
    GPU run with a 16-bit cache (the CPU cannot run this length in a test)."""
    ids = np.random.default_rng(5).integers(3, 384, 131_200)
    settings = dict(device="cuda", dtype="f16", context=131_264, dca="on", dca_chunk_size=192, dca_local_window=32)
    rows = {}
    for types in (("f16", "f16"), ("q8_0", "q8_0")):
        llm = engine.load(tiny_models["d128"], cache_type_k=types[0], cache_type_v=types[1], **settings)
        staging_only(llm.model.decode_blocks)  # both steps' inputs staged: only the cache types differ
        rows[types] = stepwise_logits(llm, ids[:-4], ids[-4:])
        del llm
    err = rel_err(rows[("q8_0", "q8_0")], rows[("f16", "f16")])
    print(f"131k: q8_0 vs f16 cache logits rel err {err:.2e}")
    assert err < Q8_0_TOL_131K


def test_extensions_refuse_a_q8_0_cache_on_cuda():
    """Self-Extend / StreamingLLM read 16-bit rows on CUDA: asking for them with a q8_0 cache is one clear error."""
    from engine import extensions
    from engine.self_extend import SelfExtendConfig

    extension = SelfExtendConfig(group_size=4, window=64)
    with pytest.raises(ConfigError, match="16-bit KV cache"):
        extensions.require_16bit_cache(extension, "cuda", ("q8_0", "bf16"))
    extensions.require_16bit_cache(extension, "cpu", ("q8_0", "q8_0"))
    extensions.require_16bit_cache(None, "cuda", ("q8_0", "q8_0"))
    extensions.require_16bit_cache(extension, "cuda", ("bf16", "bf16"))
