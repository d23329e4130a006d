"""The memory plan (engine/memory.py) and the numpy backend's stored weights (backends/host_weights.py).

A plan that does not fit is refused before any weight is prepared or cache allocated; the plan's rows
match a hand count at Llama-3-8B's shapes; a matrix kept as stored gives exactly the float32-copy values.
"""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import memory
from engine.backends import host_weights
from engine.backends.host_weights import HostMatrix, new_scratch
from engine.backends.numpy_backend import NumpyBackend
from engine.bench import synthetic_weight
from engine.config import ModelConfig, RopeConfig
from engine.convert.synthetic import write_synthetic_gguf
from engine.errors import ContextError, DeviceError
from engine.loader import WeightTensor
from engine.weights.quant import GGMLType, dequantize, tensor_nbytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import VARIANTS, make_tiny_model  # noqa: E402

GiB = 2 ** 30
PROMPT = [5, 17, 200, 33, 99, 250, 7, 64, 128, 300, 11, 42]
LLAMA3_8B = ModelConfig(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                        vocab_size=128256, norm_eps=1e-5, context_length=8192,
                        rope=RopeConfig(theta=500000.0, dim=128, original_context=8192), tied_embeddings=False)


@pytest.fixture(scope="module")
def kquant(tmp_path_factory):
    """A tiny model whose matrices are all Q4_K (d_model 256, ffn 512)."""
    return make_tiny_model(tmp_path_factory.mktemp("kquant"), VARIANTS["kquant"], gguf_types=("q4_k",), hf=False)["q4_k"]


@pytest.fixture(scope="module")
def wide(kquant, tmp_path_factory):
    """Llama-3-8B's widths (d 4096, ffn 14336, 32/8 heads x 128), 2 layers, vocabulary 8192, random Q4_K
    matrices and Q6_K embedding and output head: 0.28 GiB as stored, 1.88 GiB as float32."""
    config = dataclasses.replace(LLAMA3_8B, n_layers=2, vocab_size=8192, name="8B widths, 2 layers")
    path = tmp_path_factory.mktemp("wide") / "wide-q4_k.gguf"
    write_synthetic_gguf(path, config, tokenizer_source=kquant)
    return path


@pytest.fixture
def small_blocks(monkeypatch):
    """A 64 KiB scratch: the tiny model's matrices span several row blocks."""
    monkeypatch.setattr(host_weights, "SCRATCH_BYTES", 64 << 10)


def shaped_weights(config: ModelConfig, matrix_type: GGMLType, head_type: GGMLType) -> dict[str, WeightTensor]:
    """Loader weights of `config` with the right byte counts and no memory behind them (for planning only)."""
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"token_embd": ((c.vocab_size, c.d_model), head_type), "output_norm": ((c.d_model,), GGMLType.F32),
              "output": ((c.vocab_size, c.d_model), head_type)}
    for i in range(c.n_layers):
        shapes.update({f"blk.{i}.attn_norm": ((c.d_model,), GGMLType.F32), f"blk.{i}.ffn_norm": ((c.d_model,), GGMLType.F32),
                       f"blk.{i}.attn_q": ((q, c.d_model), matrix_type), f"blk.{i}.attn_k": ((kv, c.d_model), matrix_type),
                       f"blk.{i}.attn_v": ((kv, c.d_model), matrix_type),
                       f"blk.{i}.attn_output": ((c.d_model, q), matrix_type),
                       f"blk.{i}.ffn_gate": ((c.ffn_dim, c.d_model), matrix_type),
                       f"blk.{i}.ffn_up": ((c.ffn_dim, c.d_model), matrix_type),
                       f"blk.{i}.ffn_down": ((c.d_model, c.ffn_dim), matrix_type)})
    return {name: WeightTensor(name, t, shape, np.broadcast_to(np.uint8(0), (tensor_nbytes(t, shape),)))
            for name, (shape, t) in shapes.items()}


def test_plan_at_8b_widths_matches_a_hand_count():
    weights = shaped_weights(LLAMA3_8B, GGMLType.Q4_K, GGMLType.Q6_K)
    # Q4_K: 144 bytes per 256 values, Q6_K: 210. Per layer: q, o 4096x4096; k, v 1024x4096; gate, up, down
    # 14336x4096; two norms of 4096 float32. Embedding and output head 128256x4096 Q6_K; output norm.
    layer = (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096) // 256 * 144 + 2 * 4096 * 4
    stored = 32 * layer + 2 * 128256 * 4096 // 256 * 210 + 4096 * 4
    assert layer == 122_716_160 and stored == 4_788_813_824  # 4.46 GiB as stored
    parameters = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096) + 2 * 128256 * 4096
    assert parameters + 32 * 2 * 4096 + 4096 == 8_030_261_248  # with the norms: Llama-3-8B's published count

    cpu = memory.plan_memory(LLAMA3_8B, weights, 8192, "cpu", available=24 * GiB)
    assert not cpu.f32_copies and cpu.copies == 0  # 29.9 GiB of float32 copies do not fit comfortably in 24
    assert cpu.weights == stored
    assert cpu.kv_cache == 2 * 32 * 8192 * 8 * 128 * 4 == 2 * GiB
    assert cpu.scratch == 16 * 2 ** 20
    assert cpu.activations == 512 * 4 * (6 * 4096 + 80 * 128 + 3 * 14336) + 4 * 4 * 32 * 128 * 256
    assert cpu.logits == 104 * 128256 * 20  # 256 MiB // (128256 x 20 bytes) = 104 rows of logits
    assert cpu.total == stored + 2 * GiB + 16 * 2 ** 20 + cpu.activations + cpu.logits + 256 * 2 ** 20
    with_copies = memory.plan_memory(LLAMA3_8B, weights, 8192, "cpu", f32_copies=True)
    assert with_copies.copies == 4 * parameters  # 29.9 GiB: issue 19's 27.5 GiB model had a smaller vocabulary

    cuda = memory.plan_memory(LLAMA3_8B, weights, 131072, "cuda", "f16")
    assert cuda.weights == stored and cuda.copies == 0  # 16-bit copies (15 GiB) exceed PREFILL_FP16_BUDGET
    assert cuda.kv_cache == 2 * 32 * 131072 * 8 * 128 * 2 == 16 * GiB
    assert cuda.scratch == 2 * 128256 * 4096  # the output head, the largest matrix, as 16-bit values
    # a 32,768-token ubatch: fp32 residual and embedding, 16-bit normed inputs (two), q k v and the attention output
    # (80 heads of 128), gate, up and the SwiGLU output
    assert cuda.activations == 32768 * (8 * 4096 + 2 * (2 * 4096 + 80 * 128 + 3 * 14336))
    assert cuda.logits == 174 * 128256 * 12
    assert cuda.runtime == 0


def test_a_cuda_plan_fuses_qkv_and_gate_up_for_the_scratch(monkeypatch):
    from engine.backends.cuda import weights as cuda_weights

    small = ModelConfig(n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=2048, vocab_size=300,
                        norm_eps=1e-5, context_length=256, rope=RopeConfig(theta=1e4, dim=64, original_context=256),
                        tied_embeddings=False)
    weights = shaped_weights(small, GGMLType.Q4_K, GGMLType.Q8_0)
    kept = memory.plan_memory(small, weights, 256, "cuda", "f16")
    assert kept.copies == 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 2048 * 256) * 2 + 2 * 2 * 300 * 256
    assert kept.scratch == 0  # prefill reads the copies
    monkeypatch.setattr(cuda_weights, "PREFILL_FP16_BUDGET", 0)
    plan = memory.plan_memory(small, weights, 256, "cuda", "f16")
    assert plan.copies == 0 and plan.scratch == 2 * (2 * 2048) * 256  # gate and up as one matrix


def test_cuda_prefill_copies_take_half_the_free_memory_and_give_way_to_the_context(monkeypatch):
    """The 16-bit prefill copies are kept when they take at most half the free GPU memory (or the 1 GiB floor),
    and dropped where the plan with them would not fit but fits without them."""
    from engine.backends.cuda import weights as cuda_weights

    small = ModelConfig(n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=2048, vocab_size=300,
                        norm_eps=1e-5, context_length=256, rope=RopeConfig(theta=1e4, dim=64, original_context=256),
                        tied_embeddings=False)
    weights = shaped_weights(small, GGMLType.Q4_K, GGMLType.Q8_0)
    copies = memory.plan_memory(small, weights, 256, "cuda", "f16").copies  # within the 1 GiB floor
    assert copies > 0
    monkeypatch.setattr(cuda_weights, "PREFILL_FP16_BUDGET", 0)  # the share of free memory alone
    free = 1 << 40
    monkeypatch.setattr(cuda_weights, "PREFILL_FP16_SHARE", free // copies)  # a budget of exactly the copies
    assert memory.plan_memory(small, weights, 256, "cuda", "f16", available=free).copies == copies
    monkeypatch.setattr(cuda_weights, "PREFILL_FP16_SHARE", free // copies + 1)
    assert memory.plan_memory(small, weights, 256, "cuda", "f16", available=free).copies == 0
    monkeypatch.undo()  # the shipped share and floor
    assert cuda_weights.prefill_copy_budget(80 << 30) == 40 << 30 and cuda_weights.prefill_copy_budget(None) == 1 << 30
    with_copies = memory.plan_memory(small, weights, 4096, "cuda", "f16", available=1 << 40)
    without = memory.plan_memory(small, weights, 4096, "cuda", "f16", available=with_copies.total - 1)
    assert with_copies.copies == copies and without.copies == 0 and without.total < with_copies.total - 1
    assert without.scratch > 0  # prefill dequantizes into the scratch instead
    headroom = memory.plan_memory(small, weights, 4096, "cuda", "f16", available=with_copies.total)
    assert headroom.copies == 0  # the copies would fit exactly: they leave no room for what the plan does not count
    assert memory.plan_memory(small, weights, 4096, "cuda", "f16", available=2 * with_copies.total).copies == copies
    assert memory.cuda_copy_budget(with_copies, 1 << 40) == (1 << 40) // 2
    assert memory.cuda_copy_budget(without, 1) == 0


@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.F16,
                                       GGMLType.BF16, GGMLType.F32], ids=lambda t: t.name)
def test_stored_matrix_equals_its_float32_copy(small_blocks, ggml_type):
    rng = np.random.default_rng(0)
    tensor = synthetic_weight("m", ggml_type, (300, 512), rng, 0.05)
    stored, copy = HostMatrix(tensor, new_scratch(), keep_f32=False), HostMatrix(tensor, None, keep_f32=True)
    assert stored.block_rows == 32 and (stored.values is None) == (ggml_type != GGMLType.F32)
    for n in (1, 7):
        x = rng.standard_normal((n, 512)).astype(np.float32)
        got = stored.matmul_t(x)
        assert got.dtype == np.float32 and got.shape == (n, 300)
        assert np.array_equal(got, copy.matmul_t(x))
        np.testing.assert_allclose(got, x @ tensor.dequantize().T, rtol=1e-4, atol=1e-5)
    ids = np.array([299, 0, 31, 32, 31])
    assert np.array_equal(stored.rows(ids), tensor.dequantize()[ids])
    out = np.full((300, 512), np.nan, dtype=np.float32)  # decoding into a given buffer fills all of it
    assert dequantize(tensor.raw, ggml_type, (300, 512), out) is out and np.array_equal(out, tensor.dequantize())


def test_stored_weights_give_the_float32_copies_logits(kquant, small_blocks):
    stored = engine.load(kquant, f32_copies=False)
    copies = engine.load(kquant, f32_copies=True)
    assert isinstance(stored.model.weights.layers[0].attn_q, HostMatrix)
    assert stored.model.weights.layers[0].ffn_gate.values is None and copies.model.weights.layers[0].ffn_gate.values is not None
    assert stored.memory.copies == 0 and copies.memory.copies == 4 * sum(
        int(np.prod(w.shape)) for w in stored.loaded.weights.values() if len(w.shape) == 2)
    assert np.array_equal(stored.logits(PROMPT), copies.logits(PROMPT))
    greedy = dict(max_tokens=6, temperature=0.0)
    assert list(stored.generate(PROMPT, **greedy)) == list(copies.generate(PROMPT, **greedy))


def test_copies_are_kept_by_default_only_when_they_fit_comfortably(kquant, monkeypatch):
    loaded = engine.loader.open_model(kquant)
    plan = memory.plan_memory(loaded.config, loaded.weights, 256, "cpu", f32_copies=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * plan.total)
    assert engine.load(kquant, context=256).memory.f32_copies
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * plan.total - 1)
    llm = engine.load(kquant, context=256)
    assert not llm.memory.f32_copies and llm.model.weights.layers[0].attn_q.values is None


def no_allocation(monkeypatch):
    """Fail the test if the weights are prepared or a KV cache allocated."""
    def refuse(*args, **kwargs):
        raise AssertionError("memory was allocated before the plan was refused")
    monkeypatch.setattr(NumpyBackend, "prepare_weights", refuse)
    monkeypatch.setattr(NumpyBackend, "new_cache", refuse)


def test_a_model_larger_than_memory_is_refused_before_loading(wide, monkeypatch):
    loaded = engine.loader.open_model(wide)
    f32_size = memory.plan_memory(loaded.config, loaded.weights, 512, "cpu", f32_copies=True).copies
    streamed = memory.plan_memory(loaded.config, loaded.weights, 512, "cpu", f32_copies=False)
    assert f32_size > 1.8 * GiB and streamed.total < 0.9 * GiB
    monkeypatch.setattr(memory, "available_bytes", lambda device: GiB)  # fits as stored only: no copies
    llm = engine.load(wide, context=512)
    assert not llm.memory.f32_copies and llm.memory.total == streamed.total
    assert llm.model.weights.layers[1].ffn_down.values is None
    del llm

    limit = streamed.total // 2  # not even one token fits
    monkeypatch.setattr(memory, "available_bytes", lambda device: limit)
    no_allocation(monkeypatch)
    with pytest.raises(DeviceError) as refused:
        engine.load(wide, context=512)
    message = str(refused.value)
    assert message == (f"a context of 512 tokens: {streamed.describe()} needed on the CPU, but only "
                       f"{limit / GiB:.2f} GiB is available; the model does not fit even with a context of 1 token")
    assert streamed.describe().startswith(f"weights as stored {streamed.weights / GiB:.2f} + KV cache ")


def test_too_long_a_context_is_refused_with_the_largest_that_fits(kquant, monkeypatch):
    loaded = engine.loader.open_model(kquant)
    plan = memory.plan_memory(loaded.config, loaded.weights, 1 << 20, "cpu", f32_copies=False)
    limit = plan.at_context(100_000).total + plan.kv_per_token // 2  # 100,000 tokens fit, 100,001 do not
    monkeypatch.setattr(memory, "available_bytes", lambda device: limit)
    with monkeypatch.context() as guarded:
        no_allocation(guarded)
        with pytest.raises(ContextError, match=r"a context of 1048576 tokens: weights as stored [\d.]+ \+ KV cache "
                                               r"[\d.]+ .* = [\d.]+ GiB needed on the CPU, but only [\d.]+ GiB is "
                                               r"available; the largest context that fits is 100000 tokens: use -c 100000"):
            engine.load(kquant, context=1 << 20, f32_copies=False)
    assert engine.load(kquant, context=100_000, f32_copies=False).context == 100_000


def test_too_many_slots_are_refused_with_the_most_that_fit(kquant, monkeypatch):
    loaded = engine.loader.open_model(kquant)
    one = memory.plan_memory(loaded.config, loaded.weights, 4096, "cpu", f32_copies=False)
    plan = memory.plan_memory(loaded.config, loaded.weights, 4096, "cpu", f32_copies=False, slots=8)
    assert plan.kv_cache == 8 * one.kv_cache == 8 * 4096 * plan.kv_per_token
    assert plan.total - one.total == 7 * one.kv_cache  # only the caches are per slot
    limit = plan.with_slots(3).total + plan.kv_per_token  # 3 slots of 4096 tokens fit, 4 do not
    fits = memory.largest_context(plan, limit)
    assert plan.at_context(fits).total <= limit < plan.at_context(fits + 1).total and 3 * 4096 // 8 <= fits < 4096
    monkeypatch.setattr(memory, "available_bytes", lambda device: limit)
    with monkeypatch.context() as guarded:
        no_allocation(guarded)
        with pytest.raises(ContextError) as refused:
            engine.load(kquant, context=4096, f32_copies=False, slots=8)
    assert str(refused.value) == (
        f"8 slots of a context of 4096 tokens each: {plan.describe()} needed on the CPU, but only "
        f"{limit / GiB:.2f} GiB is available; at this context at most 3 slots fit: use --parallel 3; with 8 "
        f"slots the largest context that fits is {fits} tokens: use -c {fits}, or keep this context with a q8_0 KV "
        f"cache (-ctk q8_0 -ctv q8_0: {plan.kv_per_token_q8_0 * 4096 * 8 / GiB:.2f} GiB instead of "
        f"{plan.kv_cache / GiB:.2f})")
    assert "KV caches (8 slots) " in plan.describe()
    assert len(engine.load(kquant, context=4096, f32_copies=False, slots=3).caches) == 3


def test_cli_refusal_is_one_error_line(kquant, monkeypatch, capsys):
    from engine.cli import cli, run

    monkeypatch.setattr(memory, "available_bytes", lambda device: 50 << 20)
    no_allocation(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["engine", "generate", "-m", str(kquant), "-p", "hi", "--device", "cpu"])
    with pytest.raises(SystemExit) as exited:
        run(cli)
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: a context of 256 tokens: ") and "0.05 GiB is available" in err[0]


def test_info_shows_the_plan_against_available_memory(kquant, monkeypatch, capsys):
    from engine.cli import cli, run

    loaded = engine.loader.open_model(kquant)
    plan = memory.plan_memory(loaded.config, loaded.weights, 100_000, "cpu", f32_copies=False)
    available = plan.at_context(5000).total  # as info plans it: float32 copies do not fit comfortably
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    monkeypatch.setattr(sys, "argv", ["engine", "info", str(kquant), "-c", "100000", "--device", "cpu"])
    run(cli)
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: memory")]
    assert shown == [f"plan: memory                 cpu: {plan.describe()} of {available / GiB:.2f} GiB available: "
                     f"does not fit; the largest context that fits is 5000"]


# peak RSS from /proc's VmHWM: getrusage's ru_maxrss survives exec, so a child forked from a large test process
# (the whole suite) would report its parent's size
PEAK_RSS_SCRIPT = """
import sys
import numpy as np
import engine

ids = [3 + 97 * i % 8000 for i in range(16)]
llm = engine.load(sys.argv[1], context=64, f32_copies=False)
logits = llm.logits(ids)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
planned = llm.memory.total
del llm
same = np.array_equal(logits, engine.load(sys.argv[1], context=64, f32_copies=True).logits(ids))
print(peak, planned, int(same))
"""
PEAK_RSS_BOUND = 640 << 20  # a third of the model's 1.88 GiB of float32 weights


def test_8b_widths_run_within_a_bound_and_match_the_float32_path(wide):
    """Peak RSS of a prefill on stored weights (measured in a fresh process) stays under the plan and a third of
    the float32 size; its logits equal the float32-copies path's."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(wide)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert result.returncode == 0, result.stderr
    peak, planned, same = (int(v) for v in result.stdout.split())
    assert peak < PEAK_RSS_BOUND and peak < planned, (peak, planned)
    assert same == 1


def test_a_q8_0_kv_cache_is_suggested_when_it_makes_the_context_fit():
    weights = shaped_weights(LLAMA3_8B, GGMLType.Q4_K, GGMLType.Q6_K)
    plan = memory.plan_memory(LLAMA3_8B, weights, 131072, "cpu", f32_copies=False)  # KV cache 32 GiB as float32
    assert plan.kv_per_token_q8_0 == 32 * 8 * 2 * 136  # 34 bytes per 32 values, keys and values
    fits_q8_0 = plan.total - plan.kv_cache + plan.kv_per_token_q8_0 * 131072  # 8.5 GiB of KV cache
    with pytest.raises(ContextError, match=r"use -c \d+, or keep this context with a q8_0 KV cache "
                                           r"\(-ctk q8_0 -ctv q8_0: 8\.50 GiB instead of 32\.00\)"):
        memory.require(plan, fits_q8_0)
    with pytest.raises(ContextError) as refused:
        memory.require(plan, fits_q8_0 - GiB)  # not even with q8_0: no such advice
    assert "q8_0" not in str(refused.value)
    q8 = memory.plan_memory(LLAMA3_8B, weights, 131072, "cpu", f32_copies=False, cache_types=("q8_0", "q8_0"))
    assert q8.kv_per_token_q8_0 == 0 and q8.kv_cache == 32 * 8 * 2 * 136 * 131072  # already that small


def test_cuda_refusal_suggests_a_q8_0_cache_with_its_scratch():
    """On CUDA the q8_0 alternative counts its dequantization scratch (one layer's 16-bit rows of the context per
    q8_0 operand, shared by the slots); the refusal offers it only where that whole plan fits."""
    weights = shaped_weights(LLAMA3_8B, GGMLType.Q4_K, GGMLType.Q6_K)
    plan = memory.plan_memory(LLAMA3_8B, weights, 131072, "cuda", "f16")  # KV cache 16 GiB in f16
    q8 = memory.plan_memory(LLAMA3_8B, weights, 131072, "cuda", "f16", cache_types=("q8_0", "q8_0"))
    assert (plan.kv_per_token_q8_0, plan.scratch_per_token_q8_0) == (32 * 8 * 2 * 136, 2 * 8 * 128 * 2)
    assert q8.scratch == plan.scratch + 2 * 8 * 128 * 2 * 131072 and q8.total < plan.total
    with pytest.raises(ContextError, match=r"q8_0 KV cache \(-ctk q8_0 -ctv q8_0: 8\.50 GiB instead of 16\.00\)"):
        memory.require(plan, q8.total)
    with pytest.raises(ContextError) as refused:
        memory.require(plan, q8.total - 1)  # the scratch counted: one byte short
    assert "q8_0" not in str(refused.value)
    assert q8.kv_per_token_q8_0 == 0  # already q8_0
