"""Host-side decisions of the CUDA backend that need no GPU: launch splits, kernel variants, fusion
eligibility, device-sampling eligibility (these run everywhere)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.backends.cuda import attention as attn
from engine.backends.cuda import gemv
from engine.backends.cuda.fused import FusedBlocks
from engine.backends.cuda.sampling import MAX_TOP_K, device_supported
from engine.backends.cuda.splits import key_splits
from engine.backends.cuda.weights import DeviceMatrix
from engine.errors import DeviceError
from engine.models.family import LLAMA
from engine.models.llama import Weights
from engine.sampling import SamplingParams
from engine.weights.quant import GGMLType


def test_dims_per_lane_picks_the_smallest_variant_and_refuses_big_heads():
    assert [attn.dims_per_lane(d) for d in (16, 32, 40, 64, 96, 128)] == [1, 1, 2, 2, 4, 4]
    with pytest.raises(DeviceError, match="head_dim <= 128"):
        attn.dims_per_lane(256)


def test_one_split_rule_for_every_attention_kernel():
    # fill the slots, slices of at least min_keys_per_split keys, at most max_splits, never below 1
    assert key_splits(blocks=3, slots=264, keys=100_000, min_keys_per_split=128, max_splits=512) == 88
    assert key_splits(blocks=3, slots=264, keys=1000, min_keys_per_split=128, max_splits=512) == 7
    assert key_splits(blocks=3, slots=264, keys=100, min_keys_per_split=128, max_splits=512) == 1
    assert key_splits(blocks=1, slots=10**4, keys=10**7, min_keys_per_split=128, max_splits=512) == 512
    assert key_splits(blocks=10**4, slots=264, keys=10**6, min_keys_per_split=128, max_splits=512) == 1
    assert key_splits(blocks=0, slots=8, keys=10**4, min_keys_per_split=128, max_splits=512) == 8
    # one wave: Llama-2-7B's 32 KV heads on 264 slots take 8 slices (256 blocks), not 9 (288: a second wave)
    assert key_splits(blocks=32, slots=264, keys=32768, min_keys_per_split=64, max_splits=264) == 9
    assert key_splits(blocks=32, slots=264, keys=32768, min_keys_per_split=64, max_splits=264, one_wave=True) == 8
    assert key_splits(blocks=8, slots=264, keys=32768, min_keys_per_split=64, max_splits=264, one_wave=True) == 33
    assert key_splits(blocks=300, slots=264, keys=32768, min_keys_per_split=64, max_splits=264, one_wave=True) == 1


def test_simt_splits_follow_capacity_not_length():
    # one query: keys = the capacity (a captured graph stays valid as the context grows), not the hint
    sms = 132
    fill = attn.BLOCKS_PER_SM * sms
    assert attn.n_splits(1, 1, 3, capacity=100, keys_hint=5, n_sms=sms) == 1
    assert attn.n_splits(1, 1, 3, capacity=32768, keys_hint=5, n_sms=sms) == math.ceil(fill / 3)
    assert attn.n_splits(1, 1, 3, capacity=1024, keys_hint=10**6, n_sms=sms) == 1024 // attn.MIN_KEYS_PER_SPLIT
    # prefill: split only when there are few row blocks, and never into slices of under 4 tiles
    assert attn.n_splits(4096, 1536, 3, capacity=8192, keys_hint=8192, n_sms=sms) == 1
    assert attn.n_splits(5, 2, 4, capacity=700, keys_hint=645, n_sms=sms) == 645 // (4 * attn.TILE_KEYS)
    assert attn.n_splits(5, 2, 4, capacity=10**5, keys_hint=10**5, n_sms=sms) == math.ceil(fill / 8)


def matrix(name, ggml_type):
    return DeviceMatrix(name, ggml_type, 8, 8, None, name in ("output", "token_embd"))


def fused_blocks(types: dict[str, GGMLType], n_layers=2, d_model=576, ffn_dim=1536, extension=None,
                 stages=None, head_dim=64, temperature_length=None) -> FusedBlocks:
    """The CUDA decode blocks of a model whose layers store their matrices as `types` (norms: strings naming them);
    numpy stands in for CuPy. stages: the pipeline split's layer ranges (default one stage). 9 query heads over 3 KV
    heads of head_dim, fully rotated (extension.graph_ready reads the shape and the temperature)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from engine.pipeline import Stage

    config = SimpleNamespace(n_layers=n_layers, d_model=d_model, ffn_dim=ffn_dim, n_heads=9, n_kv_heads=3,
                             head_dim=head_dim, norm_eps=1e-5)
    named = {"token_embd": matrix("token_embd", GGMLType.Q8_0), "output_norm": "output_norm"}
    for i in range(n_layers):
        named.update({f"blk.{i}.{t.name}": matrix(t.name, types[t.name]) if t.name in types
                      else f"blk.{i}.{t.name}" if t.name.endswith("_norm") else None for t in LLAMA.layer_tensors})
    backend = SimpleNamespace(cp=np, activate=nullcontext)
    model = SimpleNamespace(config=config, weights=Weights.from_named(named, n_layers), extension=extension,
                            rotary=SimpleNamespace(rope=SimpleNamespace(dim=head_dim)),
                            temperature_length=temperature_length,
                            stages=[Stage(backend, layers) for layers in (stages or [range(n_layers)])])
    return FusedBlocks(backend, model)


UNIFORM = {s: GGMLType.Q4_1 for s in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}


def fused_parts(blocks: FusedBlocks) -> tuple[list[bool], list[bool], bool]:
    return blocks.fused_attention, blocks.fused_mlp, blocks.fused_head


def test_fused_decode_needs_one_type_per_fused_group():
    assert fused_parts(fused_blocks(UNIFORM)) == ([True, True], [True, True], True)
    mixed_outputs = {**UNIFORM, "attn_output": GGMLType.Q6_K, "ffn_down": GGMLType.F16}
    assert fused_parts(fused_blocks(mixed_outputs)) == ([True, True], [True, True], True)
    assert fused_parts(fused_blocks({**UNIFORM, "attn_v": GGMLType.Q6_K})) == ([False, False], [True, True], True)
    assert fused_parts(fused_blocks({**UNIFORM, "ffn_up": GGMLType.BF16})) == ([True, True], [False, False], True)
    # any width (gemv.py opts in to shared memory)
    assert fused_parts(fused_blocks(UNIFORM, d_model=8192, ffn_dim=28672)) == ([True, True], [True, True], True)


def test_staged_inputs_where_the_consumer_reads_int8():
    """The output / down projections read their input quantized by its producer when they are int8 types (one
    buffer for both: the wider input's staged bytes); under an extension the output projection's only where its
    one-token attention runs the flash kernel's passes (extension.graph_ready), not where the composed path runs (the
    attention temperature, a head_dim of no fused build), which writes no staged output."""
    from engine.self_extend import SelfExtendConfig
    from engine.streaming import StreamingConfig

    blocks = fused_blocks(UNIFORM)
    assert (blocks.staged_o, blocks.staged_down) == ([True, True], [True, True])
    assert blocks.staged.nbytes == 1536 + 1536 // 4  # ffn 1536 > 9 heads x 64
    blocks = fused_blocks({**UNIFORM, "attn_output": GGMLType.Q6_K, "ffn_down": GGMLType.F16})
    assert (blocks.staged_o, blocks.staged_down) == ([True, True], [False, False])
    blocks = fused_blocks({**UNIFORM, "attn_output": GGMLType.F16, "ffn_down": GGMLType.BF16})
    assert (blocks.staged_o, blocks.staged_down, blocks.staged) == ([False, False], [False, False], None)
    for scheme in (SelfExtendConfig(group_size=4, window=64), StreamingConfig(sinks=4, window=64)):
        blocks = fused_blocks(UNIFORM, extension=scheme)
        assert (blocks.staged_o, blocks.staged_down) == ([True, True], [True, True])
        blocks = fused_blocks(UNIFORM, extension=scheme, temperature_length=4096)
        assert (blocks.staged_o, blocks.staged_down) == ([False, False], [True, True])
        blocks = fused_blocks(UNIFORM, extension=scheme, head_dim=96)  # no fused build
        assert (blocks.staged_o, blocks.staged_down) == ([False, False], [True, True])
    # without an extension the temperature changes nothing (the fused decode kernel applies it)
    assert fused_blocks(UNIFORM, temperature_length=4096).staged_o == [True, True]


def test_prenormed_inputs_where_the_consumer_reads_int8_in_the_same_stage():
    """gemv_add writes the next RMSNorm-fused product's input (x * w quantized, partial sums of squares) where that
    product reads int8 input, d % 32 == 0, and both run fused in one pipeline stage: layer 0's qkv (after the
    embedding) and a stage's first layer stage their own; one staged buffer of d values, room for a partial per 8 rows
    (a gemv_add block's least), a zeroed count per 32-row group."""
    from engine.self_extend import SelfExtendConfig

    def normed(blocks):
        return blocks.normed_qkv, blocks.normed_gate_up, blocks.normed_head

    blocks = fused_blocks(UNIFORM, n_layers=3)
    assert normed(blocks) == ([False, True, True], [True, True, True], True)
    staged, partials = blocks.normed
    assert staged.nbytes == gemv.staged_bytes(576) and partials.dtype == np.float32 and partials.size == 576 // 8
    assert blocks.arrivals.dtype == np.uint32 and blocks.arrivals.size == 576 // 32 and not blocks.arrivals.any()
    assert normed(fused_blocks(UNIFORM, n_layers=3, extension=SelfExtendConfig(group_size=4, window=64))) == \
        normed(blocks)  # the extension's attention changes neither gemv_add nor qkv's input
    assert normed(fused_blocks(UNIFORM, n_layers=3, stages=[range(0, 1), range(1, 3)])) == \
        ([False, False, True], [True, True, True], True)
    assert normed(fused_blocks(UNIFORM, n_layers=3, stages=[range(0, 2), range(2, 3)])) == \
        ([False, True, False], [True, True, True], True)
    float_qkv = {**UNIFORM, **{name: GGMLType.F16 for name in ("attn_q", "attn_k", "attn_v")}}
    assert normed(fused_blocks(float_qkv)) == ([False, False], [True, True], True)
    float_mlp = {**UNIFORM, "ffn_gate": GGMLType.BF16, "ffn_up": GGMLType.BF16}
    assert normed(fused_blocks(float_mlp)) == ([False, True], [False, False], True)
    mixed_mlp = {**UNIFORM, "ffn_up": GGMLType.Q4_K}  # gate/up composed: its gemv_adds are the model's
    assert normed(fused_blocks(mixed_mlp)) == ([False, False], [False, False], False)
    blocks = fused_blocks(UNIFORM, d_model=584)  # 584 % 32 != 0
    assert normed(blocks) == ([False, False], [False, False], False) and blocks.normed is None


def test_decode_step_chains_prenorm_outputs_into_the_next_product(monkeypatch):
    """Each gemv_add writes the input of the product after it with that product's norm weight (the o product: its
    layer's ffn_norm; the down product: the next layer's attn_norm, after the last layer output_norm), and that
    product reads it with the producer's grid as its partial count (the plain gemv_add grid)."""
    from types import SimpleNamespace

    from engine.backends.cuda import fused

    monkeypatch.setattr(gemv, "_device_limits", lambda: (132, 232448))
    blocks = fused_blocks(UNIFORM)
    c = blocks.model.config
    c.n_kv_heads = 1
    blocks.model.attention_layout, blocks.model.temperature_length = None, 0
    blocks.model.rotary = SimpleNamespace(rope=SimpleNamespace(dim=64))
    calls = []

    class Backend:
        cp, act, dtype = np, np.float16, "f16"

        def key_tables(self, rot, layout):
            return "cos", "sin"

        def attention(self, q, part, local, positions, rot, layout, temperature, out_staged=None):
            return q

    blocks.backend = Backend()
    for op in ("qkv", "gate_up", "gemv_add", "head"):
        monkeypatch.setattr(fused.gemv, op, lambda *args, op=op, **kw: calls.append((op, args, kw)))
    cache = SimpleNamespace(k=np.zeros((2, 16, 1, 64), np.float16), v=np.zeros((2, 16, 1, 64), np.float16))
    cache.layer = lambda index: (cache, index)
    x = np.zeros((1, c.d_model), np.float32)
    for index, layer in enumerate(blocks.model.weights.layers):
        blocks.attention_block(index, layer, x, np.zeros(1, np.int32), cache)
        blocks.mlp_block(index, layer, x)
    blocks.head(x)
    assert [op for op, _, _ in calls] == ["qkv", "gemv_add", "gate_up", "gemv_add"] * 2 + ["head"]
    staged, partials = blocks.normed
    read = gemv.Prenormed(staged, partials, 576 // 8)  # 576 rows, 8 a block (tasks_per_block over 132 x 2 blocks)
    assert gemv.prenorm_blocks(576) == 576 // 8
    assert [kw["prenormed"] for op, _, kw in calls if op != "gemv_add"] == [None, read, read, read, read]
    written = [kw["prenorm"] for op, _, kw in calls if op == "gemv_add"]
    assert [p.next_norm for p in written] == ["blk.0.ffn_norm", "blk.1.attn_norm", "blk.1.ffn_norm", "output_norm"]
    assert all(p.staged is staged and p.partials is partials and p.arrivals is blocks.arrivals for p in written)


def test_device_sampling_eligibility():
    assert device_supported(SamplingParams(temperature=0.0, top_k=0))
    assert device_supported(SamplingParams(temperature=0.8, top_k=40))
    assert device_supported(SamplingParams(temperature=0.8, top_k=MAX_TOP_K))
    assert not device_supported(SamplingParams(temperature=0.8, top_k=0))
    assert not device_supported(SamplingParams(temperature=0.8, top_k=MAX_TOP_K + 1))


def test_gemv_geometry_fills_the_gpu_and_staging_fits(monkeypatch):
    monkeypatch.setattr(gemv, "_device_limits", lambda: (132, 232448))  # an H100 / H200
    assert gemv.tasks_per_block(576) == 8  # a small matrix: one row per warp
    per_block = gemv.tasks_per_block(14336)  # Llama-3-8B gate/up: about BLOCKS_PER_SM blocks per SM, whole warps
    target = gemv.BLOCKS_PER_SM * 132
    assert per_block % gemv.WARPS == 0 and 0.75 * target <= -(-14336 // per_block) <= target
    assert gemv.tasks_per_block(14336, blocks_per_sm=1) == 112
    # int8 staging: 1.25 bytes a value (a 70B's ffn of 28,672: 35 KB); fp32 staging: 4 (opt-in above 48 KB)
    assert gemv.stage_bytes(GGMLType.Q4_K, 28672) == 35840 and gemv.stage_bytes(GGMLType.F16, 28672) == 114688


def _qkv_task_ranges(n_q: int, n_k: int, n_v: int, per_block: int) -> list[range]:
    """Each block's tasks as gemv.cu qkv_task_range gives them (the numpy model of its block arithmetic)."""
    per_key, n = max(1, per_block // 2), n_q + n_k + n_v
    q_blocks, k_blocks = -(-n_q // per_block), -(-n_k // per_key)
    out = []
    for b in range(gemv.qkv_blocks(n_q, n_k, n_v, per_block)):
        if b < q_blocks:
            start, end = b * per_block, min((b + 1) * per_block, n_q)
        elif b < q_blocks + k_blocks:
            start = n_q + (b - q_blocks) * per_key
            end = min(start + per_key, n_q + n_k)
        else:
            start = n_q + n_k + (b - q_blocks - k_blocks) * per_block
            end = min(start + per_block, n)
        out.append(range(start, end))
    return out


@pytest.mark.parametrize("shape", ["llama3-8b", "llama2-7b", "llama3.2-1b", "llama3-70b", "smollm2", "partial-rope"])
def test_qkv_blocks_hold_every_task_once_and_equal_rows(monkeypatch, shape):
    """qkv's grid (gemv.qkv_blocks) and its blocks' task ranges cover each query, key and value task exactly once; a
    block reads at most per_block rows (a rotary key task is two rows), so no block carries twice the bytes of another,
    and the grid stays one wave of BLOCKS_PER_SM blocks an SM."""
    monkeypatch.setattr(gemv, "_device_limits", lambda: (132, 232448))
    heads, kv, hd, rope = {"llama3-8b": (32, 8, 128, 128), "llama2-7b": (32, 32, 128, 128),
                           "llama3.2-1b": (32, 8, 64, 64), "llama3-70b": (64, 8, 128, 128),
                           "smollm2": (9, 3, 64, 64), "partial-rope": (12, 4, 128, 64)}[shape]
    n_q, n_k, n_v = heads * hd, kv * (hd - rope // 2), kv * hd
    per_block = gemv.tasks_per_block(heads * hd + 2 * kv * hd)
    ranges = _qkv_task_ranges(n_q, n_k, n_v, per_block)
    tasks = [t for r in ranges for t in r]
    assert sorted(tasks) == list(range(n_q + n_k + n_v))

    def rows(task):  # a key task below half the rotary dims of its head is a pair of rows
        return 2 if n_q <= task < n_q + n_k and (task - n_q) % (hd - rope // 2) < rope // 2 else 1

    assert max(sum(rows(t) for t in r) for r in ranges) <= per_block
    assert len(ranges) <= gemv.BLOCKS_PER_SM * 132 + 3  # each region rounds up once


def test_weight_kernel_suffixes_cover_the_quantized_types():
    from engine.backends.cuda.kernels import per_type, source
    from engine.backends.cuda.weights import KERNEL_SUFFIX

    dequant = source("quant")  # its preludes hold dequant.cuh
    for t, suffix in KERNEL_SUFFIX.items():  # each type's instance names the decoder constant of its ggml type
        assert per_type("QUANT_KERNELS", suffix) == f"QUANT_KERNELS({suffix}, T_{t.name})"
        assert f"#define T_{t.name} {int(t)}" in dequant


def test_planned_fp16_copies_and_device_bytes():
    """What `engine info` reports for the CUDA backend: matrices kept as stored (Q5_0 has no device decoder:
    F16), vectors as fp32, and fp16 prefill copies of the non-F16 matrices only while they fit the budget."""
    from engine.backends.cuda import weights as cw
    from engine.bench import synthetic_weight
    from engine.loader import WeightTensor
    from engine.weights.quant import GGMLType

    rng = np.random.default_rng(0)
    ws = {"a": synthetic_weight("a", GGMLType.Q4_1, (64, 256), rng, 0.1),
          "b": synthetic_weight("b", GGMLType.F16, (32, 256), rng, 0.1),
          "c": WeightTensor("c", GGMLType.Q5_0, (16, 256), np.zeros(16 * 256 // 32 * 22, np.uint8)),
          "n": synthetic_weight("n", GGMLType.F32, (256,), rng, 1.0)}
    assert cw.device_bytes(ws["a"]) == ws["a"].raw.nbytes == 64 * 256 // 32 * 20
    assert cw.device_bytes(ws["c"]) == 2 * 16 * 256 and cw.device_bytes(ws["n"]) == 4 * 256
    assert cw.planned_fp16_copies(ws) == 2 * 64 * 256  # Q4_1 only: F16 (and Q5_0 -> F16) are read as stored
    big = {"w": synthetic_weight("w", GGMLType.Q8_0, (1, 256), rng, 0.1)}
    big["w"].shape = (cw.PREFILL_FP16_BUDGET // 256, 256)  # only the shape matters here
    assert cw.planned_fp16_copies({**ws, **big}) == 0
    assert cw.planned_fp16_copies({**ws, **big}, budget=2 * cw.PREFILL_FP16_BUDGET + 2 * 64 * 256) > 0
    assert cw.planned_fp16_copies(ws, budget=2 * 64 * 256 - 1) == 0


def test_fused_step_with_a_q8_0_cache_stores_through_the_backend(monkeypatch):
    """With a q8_0 K or V cache, the fused decode step's qkv writes the token's K/V rows unrotated into 16-bit
    scratch rows (position slot 0, identity rotation tables, no DCA key position), then the backend's store_kv
    rotates / quantizes them at the device position slot (nothing from the host position), before attention."""
    from types import SimpleNamespace

    from engine.backends.cuda import fused, kv_q8

    monkeypatch.setattr(gemv, "_device_limits", lambda: (132, 232448))  # layer 1's prenormed input: its grid
    blocks = fused_blocks(UNIFORM)
    c = blocks.model.config
    c.n_kv_heads = 3
    dca = SimpleNamespace(chunk_len=80)
    rotary = SimpleNamespace(rope=SimpleNamespace(dim=32))
    blocks.model.attention_layout, blocks.model.rotary, blocks.model.temperature_length = dca, rotary, 0
    calls = []

    class Backend:
        cp, act, dtype = np, np.float16, "f16"

        def key_tables(self, rot, layout):
            return "cos", "sin"

        def store_kv(self, *args):
            calls.append(("store_kv",) + args)

        def attention(self, q, part, local, positions, rot, layout, temperature, out_staged=None):
            calls.append(("attention", part, local, positions, layout))
            return q

    blocks.backend = Backend()
    monkeypatch.setattr(fused.gemv, "qkv", lambda *args, **kw: calls.append(("qkv",) + args))
    monkeypatch.setattr(fused.gemv, "gemv_add", lambda *args, **kw: None)
    q8 = kv_q8.DeviceQ8Rows(np.zeros((2, 16, 3, 64), np.int8), np.zeros((2, 16, 3, 2), np.float16))
    cache = SimpleNamespace(k=q8, v=np.zeros((2, 16, 3, 64), np.float16))
    cache.layer = lambda index: (cache, index)
    slot = np.array([7], np.int32)  # the decoder's device position slot
    layer = blocks.model.weights.layers[1]
    blocks.attention_block(1, layer, np.zeros((1, c.d_model), np.float32), slot, cache)
    assert [call[0] for call in calls] == ["qkv", "store_kv", "attention"]
    qkv, store, attend = calls
    k_new, v_new, position, cos, sin = qkv[9:14]
    assert k_new.shape == v_new.shape == (1, 3, 64) and k_new is not v_new
    assert position.tolist() == [0] and (cos == 1).all() and (sin == 0).all() and cos.shape == (1, 32)
    assert qkv[14:] == (9, 3, 64, 32, 0, "f16")  # heads, KV heads, head_dim, rope_dim, chunk_len 0 (no DCA)
    assert store[1:] == (cache, 1, k_new, v_new, slot, rotary, dca)
    assert attend[1:] == (cache, 1, slot, dca)
    blocks.attention_block(0, layer, np.zeros((1, c.d_model), np.float32), slot, cache)
    assert calls[3][11] is position  # the slot and tables are made once


def test_keeping_the_prefill_copies_leaves_no_dequantization_scratch(monkeypatch):
    """The plan counts no scratch where the copies are kept (memory._cuda_plan); keep_half fills the copies through
    dequantize's shared scratch, which must not stay allocated beside them (Llama-3.2-1B: its 128256 x 2048 head as
    16-bit values, 0.5 GB, beside 2.5 GB of copies)."""
    from engine.backends.cuda import weights as cw

    monkeypatch.setattr(cw, "function", lambda *a, **k: (lambda *args: None))  # no kernel: shapes only
    ops = cw.MatrixOps(np, "f16")
    small = cw.DeviceMatrix("a", GGMLType.Q8_0, 64, 256, np.zeros((64, 256 // 32 * 34), np.uint8), False)
    head = cw.DeviceMatrix("output", GGMLType.Q8_0, 512, 256, np.zeros((512, 256 // 32 * 34), np.uint8), True)
    kept = ops.keep_half([small, head], 1 << 30)
    assert kept == 2 * (64 + 512) * 256 and small.half is not None and head.half is not None
    held = sum(m.half.nbytes for m in (small, head)) + (0 if ops._scratch is None else ops._scratch.nbytes)
    assert held == kept  # what the plan counts: the copies, no scratch
