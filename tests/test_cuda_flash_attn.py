"""Fused DCA flash attention (kernels/dca_flash_attn.cu, dca_flash_attn_sm90.cu, dca_decode.cu) against
engine/dca.py. Prefill tests run both builds: mma.sync ("mma") and, on a Hopper GPU, wgmma ("wgmma").

Every GPU result is compared with ``blockwise_attention`` (float32, tested against the float64 spec
in test_dca.py) fed the very fp16/bf16 values the kernel reads, so the only differences left are
the kernel's own roundings (rotated queries and probabilities in fp16/bf16, fp32 accumulation).
Caches hold NaN past the last valid key: a kernel that reads them poisons its output.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from engine.backends.cuda import flash_attention as fa
from engine.backends.cuda import kv_q8
from engine.config import DCAConfig, RopeConfig
from engine.convert.quantize import encode_rows
from engine.dca import blockwise_attention, rotate_keys, temperature
from engine.rope import RotaryTable
from engine.weights.bf16 import from_bf16_bits, to_bf16_bits
from engine.weights.quant import GGMLType

NAN_BITS = {"f16": 0x7E00, "bf16": 0x7FC0}
# max |error| and mean |error| allowed on outputs of size ~1 (inputs N(0,1))
TOLERANCE = {"f16": (1e-2, 1e-3), "bf16": (5e-2, 8e-3)}
DCA = DCAConfig(chunk_size=100, local_window=23)  # chunk_len 77: boundaries fall inside 64-key tiles
GROUPS = [(4, 4), (9, 3), (8, 2), (16, 2)]  # GQA 1, 3, 4, 8


def to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float -> fp16 or bf16 (round to nearest even) as uint16 bits."""
    return x.astype(np.float16).view(np.uint16) if dtype == "f16" else to_bf16_bits(x)


def from_bits(b: np.ndarray, dtype: str) -> np.ndarray:
    return b.view(np.float16).astype(np.float32) if dtype == "f16" else from_bf16_bits(b)


class Case:
    """Random q (positions q_start..q_start+n_q-1), K/V for keys 0..q_start+n_q-1 in a NaN-padded cache."""

    def __init__(self, rng, n_q, n_heads, n_kv, head_dim, dca, dtype, q_start=0, capacity=None, rope_dim=None,
                 positions=None):
        import cupy as cp

        self.dtype, self.dca = dtype, dca
        self.positions = np.arange(q_start, q_start + n_q) if positions is None else np.asarray(positions)
        n_keys = int(self.positions.max()) + 1
        capacity = capacity or n_keys
        rope = RopeConfig(theta=10000.0, dim=rope_dim or head_dim)
        self.rotary = RotaryTable(rope, n_keys + (dca.chunk_size if dca else 0) + 1)
        q = rng.standard_normal((len(self.positions), n_heads, head_dim)).astype(np.float32)
        k = rng.standard_normal((n_keys, n_kv, head_dim)).astype(np.float32)
        v = rng.standard_normal((n_keys, n_kv, head_dim)).astype(np.float32)
        k_rot = rotate_keys(k, np.arange(n_keys), self.rotary, dca)
        self.q_bits, k_bits, v_bits = (to_bits(x, dtype) for x in (q, k_rot, v))
        self.q, self.k_rot, self.v = (from_bits(b, dtype) for b in (self.q_bits, k_bits, v_bits))
        padded = np.full((2, capacity, n_kv, head_dim), NAN_BITS[dtype], dtype=np.uint16)
        padded[0, :n_keys], padded[1, :n_keys] = k_bits, v_bits
        device_type = cp.float16 if dtype == "f16" else cp.uint16
        self.dev_q = cp.asarray(self.q_bits).view(device_type)
        self.dev_k = cp.asarray(padded[0]).view(device_type)
        self.dev_v = cp.asarray(padded[1]).view(device_type)
        self.dev_pos = cp.asarray(self.positions.astype(np.int32))
        self.cos, self.sin = cp.asarray(self.rotary.cos), cp.asarray(self.rotary.sin)
        self.rope_dim = rope.dim

    def reference(self, rows=None, temperature_length=0) -> np.ndarray:
        rows = slice(None) if rows is None else rows
        pos = self.positions[rows]
        scale = temperature(pos, temperature_length) if temperature_length else None
        return blockwise_attention(self.q[rows], self.k_rot, self.v, pos, self.rotary, self.dca, logit_scale=scale,
                                   block_k=4096)

    def prefill(self, **kwargs) -> np.ndarray:
        out = fa.flash_attention(self.dev_q, self.dev_k, self.dev_v, self.dev_pos, self.cos, self.sin,
                                 rope_dim=self.rope_dim, dca=self.dca, **kwargs)
        return self._host(out)

    def decode(self, **kwargs) -> np.ndarray:
        out = fa.flash_decode(self.dev_q, self.dev_k, self.dev_v, self.dev_pos, self.cos, self.sin,
                              rope_dim=self.rope_dim, dca=self.dca, **kwargs)
        return self._host(out)

    def _host(self, out) -> np.ndarray:
        import cupy as cp

        assert out.shape == self.dev_q.shape and out.dtype == self.dev_q.dtype
        return from_bits(cp.asnumpy(out.view(cp.uint16)), self.dtype)


def require(kernel: str) -> None:
    import cupy as cp

    if kernel == "wgmma" and not fa.wgmma_available(cp):
        pytest.skip("the wgmma kernel needs a Hopper GPU (compute capability 9.0)")


def assert_close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    assert np.isfinite(got).all(), "non-finite output (a stale cache row or an empty softmax leaked in)"
    err = np.abs(got - want)
    max_tol, mean_tol = TOLERANCE[dtype]
    assert err.max() < max_tol and err.mean() < mean_tol, f"max |err| {err.max():.3g}, mean {err.mean():.3g}"


# ---------------------------------------------------------------------------------------- CPU
def test_unsupported_shapes_are_named():
    assert fa.unsupported_reason(128, 128, 32, 8) is None
    assert fa.unsupported_reason(64, 64, 9, 3, decode=True) is None
    assert "head_dim 96" in fa.unsupported_reason(96, 96, 8, 8)
    assert "rope_dim 48" in fa.unsupported_reason(64, 48, 8, 8)
    assert "multiple" in fa.unsupported_reason(64, 64, 9, 2)
    assert "group 32" in fa.unsupported_reason(64, 64, 32, 1, decode=True)
    assert fa.unsupported_reason(64, 64, 32, 1) is None  # prefill takes any group


@pytest.mark.parametrize("name, kernel, instance", fa.launched_builds(), ids=[b[1] for b in fa.launched_builds()])
def test_each_launched_configuration_compiles_alone(name, kernel, instance):
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) is not installed")
    try:
        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC library not found: {exc}")
    from engine.backends.cuda.kernels import compile_ptx

    ptx = compile_ptx(name, "sm_90", instance=instance)
    assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == {kernel} | ({"dca_combine"} if name == "dca_decode" else set())
    if name.endswith("_sm90"):
        assert ".target sm_90a" in ptx and "wgmma.mma_async.sync.aligned.m64n128k16" in ptx and "cp.async" in ptx
    else:
        assert "mma.sync.aligned.m16n8k16" in ptx and "ldmatrix" in ptx and "cp.async" in ptx


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_heads, n_kv", GROUPS)
@pytest.mark.parametrize("dca", [None, DCA], ids=["causal", "dca"])
def test_prefill_matches_blockwise(kernel, dtype, head_dim, n_heads, n_kv, dca):
    require(kernel)
    case = Case(np.random.default_rng(head_dim + n_heads), 333, n_heads, n_kv, head_dim, dca, dtype)
    assert_close(case.prefill(kernel=kernel), case.reference(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("head_dim, n_heads, n_kv", [(64, 9, 3), (128, 32, 8)])
def test_prefill_reads_the_queries_of_a_fused_product_in_place(kernel, dtype, head_dim, n_heads, n_kv):
    """q as the model passes it: the first columns of a fused q+k+v product (rows 16-byte aligned, strided), read
    in place, gives the same bits as a contiguous copy of it; a misaligned view is copied and also agrees."""
    import cupy as cp

    require(kernel)
    case = Case(np.random.default_rng(5), 200, n_heads, n_kv, head_dim, DCA, dtype)
    want = case.prefill(kernel=kernel)
    width = (n_heads + 2 * n_kv) * head_dim
    for offset in (0, 1):  # a 16-byte aligned view, then one column off (copied to a contiguous array first)
        fused = cp.full((200, width + 8), 7, dtype=case.dev_q.dtype)  # filler a wrong read would bring in
        fused[:, offset:offset + n_heads * head_dim] = case.dev_q.reshape(200, -1)
        view = fused[:, offset:offset + n_heads * head_dim].reshape(200, n_heads, head_dim)
        assert not view.flags.c_contiguous
        got = fa.flash_attention(view, case.dev_k, case.dev_v, case.dev_pos, case.cos, case.sin,
                                 rope_dim=case.rope_dim, dca=DCA, kernel=kernel)
        np.testing.assert_array_equal(case._host(got), want)
    assert_close(want, case.reference(), dtype)


@pytest.mark.cuda
def test_dca_differs_from_causal_on_these_inputs():
    """The DCA cases above would catch a kernel that ignores DCA: the two references differ widely."""
    case = Case(np.random.default_rng(0), 333, 9, 3, 64, DCA, "f16")
    plain = blockwise_attention(case.q, case.k_rot, case.v, case.positions, case.rotary, None)
    assert np.abs(case.prefill() - plain).max() > 20 * TOLERANCE["f16"][0]


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("head_dim, n_heads, n_kv", [(64, 9, 3), (128, 8, 1)])
def test_chunked_prefill_against_cache(kernel, dtype, head_dim, n_heads, n_kv):
    """Queries 200..349 against cached keys 0..349 of a 512-row cache (NaN past row 349)."""
    require(kernel)
    case = Case(np.random.default_rng(1), 150, n_heads, n_kv, head_dim, DCA, dtype, q_start=200, capacity=512)
    assert_close(case.prefill(kernel=kernel), case.reference(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim, options", [(64, {"kernel": "mma", "n_splits": 3}),
                                               (64, {"kernel": "wgmma", "n_splits": 3}),
                                               (128, {"kernel": "wgmma", "n_splits": 5}),
                                               (128, {"kernel": "mma", "tiles": (1, 48)}),
                                               (128, {"kernel": "wgmma", "tiles": (64, 2, 4)})],
                         ids=["mma-splits", "wgmma-d64-splits", "wgmma-d128-splits", "mma-d128-tiles1x48",
                              "wgmma-d128-tiles64x2x4"])
def test_prefill_splits_and_other_configurations(head_dim, options):
    """Split-K, and a configuration other than the default compiled on demand (dev/cuda/attention.py measures
    every one)."""
    require(options.get("kernel", "mma"))
    case = Case(np.random.default_rng(2), 150, 16, 4, head_dim, DCA, "bf16", q_start=200, capacity=400)
    assert_close(case.prefill(**options), case.reference(), "bf16")


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
def test_partial_rotary_and_temperature(kernel):
    require(kernel)
    case = Case(np.random.default_rng(3), 200, 8, 2, 128, DCA, "f16", rope_dim=64)
    assert_close(case.prefill(kernel=kernel, temperature_length=50), case.reference(temperature_length=50), "f16")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_heads, n_kv", GROUPS)
def test_decode_matches_blockwise(dtype, head_dim, n_heads, n_kv):
    rng = np.random.default_rng(head_dim * n_heads)
    for pos in (0, 5, 76, 77, 1000):  # first key, a partial tile, the chunk edge, many chunks
        case = Case(rng, 1, n_heads, n_kv, head_dim, DCA, dtype, capacity=1536, positions=[pos])
        assert_close(case.decode(), case.reference(), dtype)


def q8_cache(values: np.ndarray, capacity: int):
    """(capacity, Hkv, D) q8_0 rows of values (n_keys, Hkv, D) -- past them int8 127 and NaN scales, which poison
    any output that reads them -- and the values the rows hold (q * d, float32)."""
    import cupy as cp

    n_keys, n_kv, head_dim = values.shape
    raw = encode_rows(values.reshape(-1, head_dim), GGMLType.Q8_0).reshape(n_keys, n_kv, -1)
    q, d = kv_q8.split_blocks(raw, head_dim)
    held = q.reshape(n_keys, n_kv, -1, 32).astype(np.float32) * d.astype(np.float32)[..., None]
    q_rows = np.full((capacity, n_kv, head_dim), 127, np.int8)
    d_rows = np.full((capacity, n_kv, head_dim // 32), np.nan, np.float16)
    q_rows[:n_keys], d_rows[:n_keys] = q, d
    return kv_q8.DeviceQ8Rows(cp.asarray(q_rows), cp.asarray(d_rows)), held.reshape(values.shape)


def decode_q8(case: Case, k_q8: bool, v_q8: bool, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(the decode kernel's output with the chosen caches as q8_0 rows, blockwise attention over their values)"""
    capacity = case.dev_k.shape[0]
    k_dev, k_held = q8_cache(case.k_rot, capacity) if k_q8 else (case.dev_k, case.k_rot)
    v_dev, v_held = q8_cache(case.v, capacity) if v_q8 else (case.dev_v, case.v)
    out = fa.flash_decode(case.dev_q, k_dev, v_dev, case.dev_pos, case.cos, case.sin, rope_dim=case.rope_dim,
                          dca=case.dca, **kwargs)
    want = blockwise_attention(case.q, k_held, v_held, case.positions, case.rotary, case.dca, block_k=4096)
    return case._host(out), want


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_heads, n_kv", GROUPS)
@pytest.mark.parametrize("k_q8, v_q8", [(True, True), (True, False), (False, True)])
def test_decode_reads_q8_0_caches(dtype, head_dim, n_heads, n_kv, k_q8, v_q8):
    """q8_0 keys as integer fragments with their block scales on the scores, q8_0 values as fp16 fragments whose
    output dims the merge puts back: against blockwise attention over the values the rows hold."""
    rng = np.random.default_rng(head_dim * n_heads + 2 * k_q8 + v_q8)
    for pos in (0, 5, 76, 77, 1000):
        case = Case(rng, 1, n_heads, n_kv, head_dim, DCA, dtype, capacity=1536, positions=[pos])
        assert_close(*decode_q8(case, k_q8, v_q8), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_q8_0_keys_take_bf16_queries_past_fp16s_range(head_dim):
    """A bf16 build reads q8_0 keys with fp16 queries: rows reaching 2^14 are scaled by a power of two (queries of
    ~1e5, past fp16's 65,504, whose scores make the softmax nearly one-hot), undone on their scores."""
    import cupy as cp

    case = Case(np.random.default_rng(11), 1, 8, 2, head_dim, DCA, "bf16", capacity=1536, positions=[1000])
    case.q_bits = to_bits(case.q * np.float32(1e5), "bf16")
    case.q, case.dev_q = from_bits(case.q_bits, "bf16"), cp.asarray(case.q_bits)
    got, want = decode_q8(case, True, True)
    assert_close(got, want, "bf16")


@pytest.mark.cuda
@pytest.mark.parametrize("config", [(16, 2), (16, 4), (32, 3)])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_q8_0_decode_variants_and_splits(config, dtype):
    """The measurement variants' q8_0 builds (two stages: the merge rows outgrow the stages) and slice counts up
    to dca_combine's second pass."""
    case = Case(np.random.default_rng(7), 2, 32, 8, 128, DCA, dtype, capacity=2048, positions=[600, 1500])
    for splits in (1, 7, 100):
        assert_close(*decode_q8(case, True, True, n_splits=splits, config=config), dtype)


@pytest.mark.cuda
def test_decode_several_tokens_splits_and_temperature():
    case = Case(np.random.default_rng(4), 2, 9, 3, 64, DCA, "bf16", capacity=2048, positions=[600, 1500])
    want = case.reference(temperature_length=100)
    for splits in (1, 7, 64, 100):  # 100: dca_combine's second pass of 64 splits, the last ones empty
        assert_close(case.decode(n_splits=splits, temperature_length=100), want, "bf16")


@pytest.mark.cuda
def test_plain_causal_decode():
    case = Case(np.random.default_rng(5), 1, 32, 8, 128, None, "f16", capacity=5000, positions=[4321])
    assert_close(case.decode(), case.reference(), "f16")


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
def test_long_prefill_64k_sampled_rows(kernel):
    """SmolLM2's shape and DCA settings at 64k tokens; sampled rows against the fp32 blockwise reference."""
    require(kernel)
    n = 65536
    case = Case(np.random.default_rng(6), n, 9, 3, 64, DCAConfig(chunk_size=6144, local_window=1024), "bf16")
    got = case.prefill(kernel=kernel)
    rows = np.array([0, 1, 5119, 5120, 5121, 10239, 10240, 33333, 40959, 40960, n - 2, n - 1])
    assert_close(got[rows], case.reference(rows=rows), "bf16")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_stages_its_output_for_the_output_projection(dtype, head_dim):
    """With out_staged, dca_combine also writes its output quantized (the output projection's int8 input): the same
    output, and the bytes gemv.quantize_input writes from it."""
    import cupy as cp

    from engine.backends.cuda import gemv

    case = Case(np.random.default_rng(head_dim), 1, 32, 8, head_dim, DCA, dtype, capacity=1536, positions=[1000])
    n = 32 * head_dim
    staged, expected = (cp.full(gemv.staged_bytes(n), 0xAB, dtype=cp.uint8) for _ in range(2))
    out = fa.flash_decode(case.dev_q, case.dev_k, case.dev_v, case.dev_pos, case.cos, case.sin,
                          rope_dim=case.rope_dim, dca=case.dca, out_staged=staged)
    np.testing.assert_array_equal(case._host(out), case.decode())
    gemv.quantize_input(out.reshape(-1), expected, dtype)
    np.testing.assert_array_equal(cp.asnumpy(staged), cp.asnumpy(expected))
