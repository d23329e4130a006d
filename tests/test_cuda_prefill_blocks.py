"""The CUDA backend's prompt blocks (engine/backends/cuda/prefill.py) issue the launches the model's own blocks do.

On the CPU: CuPy arrays over made-up device memory stand in for the weights, the cache and the activations (nothing
reads them), every kernel launch and GEMM is recorded instead of run, and the prompt blocks' record is compared
with the composed blocks' (Llama.attention_block / mlp_block over the backend's ops), layer by layer: the same
kernels and GEMMs in the same order, with the same grids, scalar arguments, array shapes, strides and dtypes, and
the same pattern of which arguments are the same memory (a buffer one launch writes and the next reads). The GPU
test at the end checks the same on a device: equal hidden states and cache rows, bit for bit.
"""
from __future__ import annotations

import itertools
import types

import numpy as np
import pytest

from engine.config import DCAConfig, RopeConfig
from engine.models.llama import Llama
from engine.rope import RotaryTable
from engine.weights.quant import GGMLType

cupy = pytest.importorskip("cupy")

from engine.backends.cuda import CudaBackend  # noqa: E402
from engine.backends.cuda import flash_attention as fa  # noqa: E402
from engine.backends.cuda import prefill  # noqa: E402
from engine.backends.cuda import weights as cw  # noqa: E402
import engine.backends.cuda as cuda_backend  # noqa: E402

_addresses = itertools.count(0x7D00_0000_0000, 0x100_0000)  # 16 MiB apart: every stand-in fits in its own range


def device(shape, dtype=np.float16):
    """A real cupy.ndarray over made-up device memory (no GPU needed: nothing reads it)."""
    memory = cupy.cuda.UnownedMemory(next(_addresses), 1 << 24, None, device_id=0)
    return cupy.ndarray(shape, dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


class Log:
    """The launches and GEMMs made, in order: (what, launch settings, arguments)."""

    def __init__(self):
        self.entries = []

    def kernel(self, name):
        log = self

        class Kernel:
            shared_size_bytes = 0  # static shared memory (a CuPy kernel's attribute)

            def __call__(self, grid, block, args, shared_mem=0):
                log.entries.append((name, (tuple(grid), tuple(block), shared_mem), tuple(args)))

        return Kernel()


def signature(entries, made_from: int) -> list:
    """The entries with each array as (shape, strides, dtype, where) and each scalar as its type and value, where
    an array made before the run (an address below made_from: weights, biases, the cache, the residual) is itself
    and one the run made is the order its memory first appeared in: equal for two runs that launch the same work
    on the same inputs and the same layout of work buffers."""
    seen: dict[int, int] = {}

    def arg(a):
        if isinstance(a, cupy.ndarray):
            ptr = a.data.ptr
            where = ("input", ptr) if ptr < made_from else ("made", seen.setdefault(ptr, len(seen)))
            return ("array", a.shape, a.strides, a.dtype.str, where)
        return (type(a).__name__, a.item() if isinstance(a, np.generic) else a)

    return [(name, settings, tuple(arg(a) for a in args)) for name, settings, args in entries]


def matrix(name, rows, cols, act):
    """A weight kept as a 16-bit copy (keep_half), as the prefill GEMMs read it."""
    m = cw.DeviceMatrix(name, GGMLType.Q4_K, rows, cols, device((rows, cols // 256 * 144), np.uint8), False)
    m.half = device((rows, cols), act)
    return m


def fused(parts, act):
    """parts made row ranges of one fused matrix (weights.fuse's layout), with its 16-bit copy."""
    whole = cw.DeviceMatrix("+".join(p.name for p in parts), parts[0].ggml_type, sum(p.rows for p in parts),
                            parts[0].cols, device((1, 1), np.uint8), False)
    whole.half, offset = device((whole.rows, whole.cols), act), 0
    for p in parts:
        p.whole, p.row_offset, p.half = whole, offset, None
        offset += p.rows
    return parts


def tiny_model(backend, n_heads=8, n_kv=2, head_dim=128, d=512, ffn=1024, n_layers=2, dca=DCAConfig(100, 23),
               biases=False):
    act = backend.act
    c = types.SimpleNamespace(d_model=d, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=ffn,
                              norm_eps=1e-5)
    layers = []
    for i in range(n_layers):
        q, k, v = fused([matrix(f"q{i}", n_heads * head_dim, d, act), matrix(f"k{i}", n_kv * head_dim, d, act),
                         matrix(f"v{i}", n_kv * head_dim, d, act)], act)
        gate, up = fused([matrix(f"g{i}", ffn, d, act), matrix(f"u{i}", ffn, d, act)], act)
        layers.append(types.SimpleNamespace(
            attn_norm=device((d,), np.float32), ffn_norm=device((d,), np.float32), attn_q=q, attn_k=k, attn_v=v,
            attn_q_bias=device((n_heads * head_dim,), np.float32) if biases else None,
            attn_k_bias=device((n_kv * head_dim,), np.float32) if biases else None,
            attn_v_bias=device((n_kv * head_dim,), np.float32) if biases else None,
            attn_output=matrix(f"o{i}", d, n_heads * head_dim, act), ffn_gate=gate, ffn_up=up,
            ffn_down=matrix(f"d{i}", d, ffn, act)))
    rotary = RotaryTable(RopeConfig(theta=10000.0, dim=head_dim), 64)
    backend._tables[rotary] = (device((4096, head_dim // 2), np.float32), device((4096, head_dim // 2), np.float32))
    model = types.SimpleNamespace(config=c, weights=types.SimpleNamespace(layers=layers), extension=None,
                                  rotary=rotary, dca=dca, attention_layout=dca, temperature_length=None,
                                  layer_backends=[backend] * n_layers,
                                  stages=[types.SimpleNamespace(backend=backend, layers=range(n_layers))])
    for name in ("attention_block", "cached_attention", "mlp_block"):  # the composed blocks, over these
        setattr(model, name, types.MethodType(getattr(Llama, name), model))
    return model


def stand_in_cache(model, act, length, capacity=4096):
    c = model.config
    rows = [[device((capacity, c.n_kv_heads, c.head_dim), act) for _ in model.weights.layers] for _ in "kv"]
    cache = types.SimpleNamespace(length=length, capacity=capacity, k=rows[0], v=rows[1])
    cache.layer = lambda index: (cache, index)
    return cache


@pytest.fixture
def recorded(monkeypatch):
    """Kernels and GEMMs recorded into one Log (an H100's 132 SMs, the wgmma attention), allocations stand-ins."""
    log = Log()
    for module in (cuda_backend, prefill, fa):
        monkeypatch.setattr(module, "function", lambda file, kernel, dtype="f16", instance=None: log.kernel(kernel))
    monkeypatch.setattr(fa, "wgmma_available", lambda cp: True)
    monkeypatch.setattr(fa, "sm_count", lambda cp: 132)
    monkeypatch.setattr(fa.pdl, "ENABLED", False)
    monkeypatch.setattr(cupy, "empty", lambda shape, dtype=np.float32: device(shape, dtype))
    monkeypatch.setattr(cw.MatrixOps, "_gemm_ex", lambda self, x, w16, out, n, m, k, beta=0.0: log.entries.append(
        ("gemm", (n, m, k, beta), (x, w16, out))))
    return log


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("n, start", [(200, 0), (64, 3000)], ids=["prompt", "chunk-after-3000"])
@pytest.mark.parametrize("heads", [(8, 2, 128), (12, 4, 64)], ids=["gqa4-d128", "gqa3-d64"])
@pytest.mark.parametrize("biases", [False, True], ids=["llama", "qkv-biases"])
def test_prompt_blocks_launch_what_the_composed_blocks_do(recorded, dtype, n, start, heads, biases):
    backend = CudaBackend(dtype)
    n_heads, n_kv, head_dim = heads
    model = tiny_model(backend, n_heads, n_kv, head_dim, biases=biases)
    cache, positions = stand_in_cache(model, backend.act, start), device((n,), np.int32)
    x = device((n, model.config.d_model), np.float32)
    made_from = next(_addresses)  # what the runs allocate lies above
    runs = []
    for blocks in (model, prefill.PrefillBlocks(backend, model)):
        layers = []
        for index, layer in enumerate(model.weights.layers):
            recorded.entries = []
            assert blocks.attention_block(index, layer, x, positions, cache) is x  # the residual, in place
            assert blocks.mlp_block(index, layer, x) is x
            layers.append(recorded.entries)
        assert getattr(blocks, "_pass", None) is None  # the pass ended with the last layer: nothing holds the cache
        runs.append(layers)
    composed, lean = runs
    names = [name for name, _, _ in composed[0]]
    combined = ["dca_combine"] if start else []
    assert names == ["rmsnorm", "gemm", *["add_bias"] * (3 * biases), "store_kv_vec8",
                     fa.wgmma_build(head_dim, fa.WGMMA_TILES[head_dim])[1], *combined, "gemm", "rmsnorm", "gemm",
                     "swiglu", "gemm"]
    for composed_layer, lean_layer in zip(composed, lean):
        assert signature(lean_layer, made_from) == signature(composed_layer, made_from)


def test_a_layer_the_prompt_blocks_cannot_serve_runs_the_composed_blocks(recorded):
    backend = CudaBackend("bf16")
    model = tiny_model(backend)
    layer = model.weights.layers[1]
    layer.attn_q_bias = device((8 * 128,), np.float32)  # biases in one layer only: not the family's, not served
    blocks = prefill.PrefillBlocks(backend, model)
    assert blocks.qkv_whole[0] is not None and blocks.qkv_whole[1] is None
    calls = []
    model.attention_block = lambda *args: calls.append(args[0]) or args[3]
    x, cache = device((100, 512), np.float32), stand_in_cache(model, backend.act, 0)
    for index, l in enumerate(model.weights.layers):
        blocks.attention_block(index, l, x, device((100,), np.int32), cache)
    assert calls == [1]
    one_row = device((1, 512), np.float32)  # one token is not a prompt (the decode blocks' work)
    blocks.attention_block(0, model.weights.layers[0], one_row, device((1,), np.int32), cache)
    assert calls == [1, 0]


@pytest.fixture(scope="module")
def tiny_d64(tmp_path_factory):
    """Tiny random models with head_dim 64 (the fused attention's): a Llama and a Qwen2 (Q/K/V biases)."""
    pytest.importorskip("gguf")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import VARIANTS, make_tiny_model

    return {variant: make_tiny_model(tmp_path_factory.mktemp(variant), VARIANTS[variant], gguf_types=("f16", "q4_k"),
                                     hf=False) for variant in ("d64", "qwen2")}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("weights", ["f16", "q4_k"])
@pytest.mark.parametrize("variant", ["d64", "qwen2"])
def test_prompt_blocks_equal_the_composed_blocks_on_the_gpu(tiny_d64, dtype, weights, variant):
    """A tiny random Llama or Qwen2 (head_dim 64, GQA 2, DCA across chunks): a 2,300-token prompt, then 40 tokens more
    (their attention split over the cache's keys and merged), through the prompt blocks and through the composed
    blocks: the final hidden states and the cache rows are equal bit for bit."""
    import engine

    llm = engine.load(tiny_d64[variant][weights], device="cuda", context=4096, dca="on", dtype=dtype)
    model, backend, c = llm.model, llm.backend, llm.config
    lean = model.stages[0].prompt_blocks
    assert isinstance(lean, prefill.PrefillBlocks) and lean.biases == (variant == "qwen2")
    assert all(w is not None for w in lean.qkv_whole) and all(w is not None for w in lean.gate_up_whole)
    assert fa.prefill_launch(backend.cp, 40, c.n_heads, c.n_kv_heads, c.head_dim, 1, 64, llm.dca, 0, dtype,
                             n_keys_hint=2340).n_splits > 1  # the second forward's attention is split
    prompt = np.random.default_rng(3).integers(3, c.vocab_size, 2340)
    hidden, caches = [], []
    for blocks in (lean, model):
        model.stages[0].prompt_blocks = blocks
        cache = backend.new_cache(c.n_layers, 4096, c.n_kv_heads, c.head_dim)
        model.forward(prompt[:2300], cache, logits_for="none")
        hidden.append(backend.to_numpy(model.forward(prompt[2300:], cache, logits_for="hidden")))
        caches.append(cache)
    assert np.isfinite(hidden[0]).all() and np.abs(hidden[0]).max() > 0
    np.testing.assert_array_equal(hidden[0], hidden[1])
    for name in ("k", "v"):
        lean_rows, composed_rows = (backend.to_numpy(getattr(cache, name)[:, :2340]) for cache in caches)
        assert np.abs(lean_rows).max() > 0
        np.testing.assert_array_equal(lean_rows, composed_rows)
