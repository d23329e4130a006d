"""`engine bench`: llama-bench-style throughput of prompt processing (ppN) and generation (tgN).

    engine bench [-m MODEL] [--synthetic] [-p 512,8192,32768] [-n 128] [-d 0,32768] [-r 3] [--json]
                 [the load options of generate: -c, --device, --dtype, --dca*, --rope-*, --attn-temperature]

ppN: N prompt tokens into an empty cache (no logits), tokens/s, and the TFLOP/s that makes (prefill_flops: every
layer's products and the causal attention pairs) against the device's dense matrix product measured in the same run
(matmul_peak: fp16 tensor cores on CUDA, numpy's float32 BLAS on the CPU). tgN @ dD: N greedy decode steps after
a D-token context, through the backend's decode loop (on the GPU a CUDA graph, already captured: the
one-off eager step and capture, ~4 + 5 ms, are not timed). Each test runs once to warm up, then -r
times; the table shows mean ± sd of tokens/s.
--synthetic: random weights with the model's shapes and tensor types (or SmolLM2-135M's, Q4_1 with a
Q8_0 embedding, when no model file is given or found): the same work and speed as the real model.
When torch and transformers import (and the model is real, not --synthetic), HF transformers (bf16, SDPA, plain
attention, on the GPU when there is one) runs the same tests in the same run and the ratio is printed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from . import pipeline
from .api import LLM
from .backends import activation_dtype, resolve_device, resolve_dtype
from .config import ModelConfig, RopeConfig
from .default_model import default_model_path
from .errors import ConfigError, EngineError
from .loader import LoadedModel, WeightTensor, open_model
from .models.family import family
from .models.presets import PRESETS, preset
from .options import LoadSettings, load_options
from .weights.bf16 import to_bf16_bits
from .weights.quant import GGMLType, tensor_nbytes

SMOLLM2_CONFIG = ModelConfig(
    n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536, vocab_size=49152,
    norm_eps=1e-5, context_length=8192, rope=RopeConfig(theta=100000.0, dim=64, original_context=8192),
    tied_embeddings=True, name="SmolLM2-135M shapes (random weights)")

# fp16 scale fields of each block type: (byte offset, typical |value| of the decoded weights per unit)
_SCALE_FIELDS = {
    GGMLType.Q8_0: ((0, 1 / 128),),
    GGMLType.Q4_0: ((0, 1 / 8),),
    GGMLType.Q4_1: ((0, 1 / 8), (2, -1.0)),
    GGMLType.Q4_K: ((0, 2 / (63 * 15)), (2, 1 / 63)),
    GGMLType.Q6_K: ((208, 1 / (32 * 64)),),
}


def synthetic_weight(name: str, ggml_type: GGMLType, shape: tuple[int, ...], rng: np.random.Generator,
                     scale: float) -> WeightTensor:
    """Random bytes of a tensor of `ggml_type` whose decoded values are O(scale): a valid stored tensor."""
    ggml_type = GGMLType(ggml_type)
    n = int(np.prod(shape))
    if ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        values = (rng.standard_normal(n, dtype=np.float32) * np.float32(scale)).astype(np.float32)
    if ggml_type == GGMLType.F32:
        raw = values.view(np.uint8)
    elif ggml_type == GGMLType.F16:
        raw = values.astype(np.float16).view(np.uint8)
    elif ggml_type == GGMLType.BF16:
        raw = to_bf16_bits(values).view(np.uint8)
    else:
        nbytes = tensor_nbytes(ggml_type, shape)
        raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
        from .weights.quant import block_layout

        blocks = raw.reshape(-1, block_layout(ggml_type)[1])
        for offset, unit in _SCALE_FIELDS[ggml_type]:
            values = (unit * scale * rng.uniform(0.5, 1.5, blocks.shape[0])).astype(np.float16)
            blocks[:, offset:offset + 2] = values.view(np.uint8).reshape(-1, 2)
    return WeightTensor(name, ggml_type, tuple(shape), np.ascontiguousarray(raw).reshape(-1))


def synthetic_weights(config: ModelConfig, matrix_type: GGMLType = GGMLType.Q4_1,
                      embedding_type: GGMLType = GGMLType.Q8_0, seed: int = 0) -> dict[str, WeightTensor]:
    """A full random model of `config` (vectors F32 ones, the embedding and output head of `embedding_type`
    with values O(1) and O(1/sqrt(d)), every other matrix of `matrix_type` with values O(1/sqrt(in)))."""
    rng = np.random.default_rng(seed)
    weights = {}
    shapes = family(config.architecture).tensor_shapes(config, with_output=not config.tied_embeddings)
    for name, shape in shapes.items():
        if len(shape) == 1:
            weights[name] = WeightTensor(name, GGMLType.F32, shape, np.ones(shape, np.float32).view(np.uint8))
        elif name in ("token_embd", "output"):
            weights[name] = synthetic_weight(name, embedding_type, shape, rng, 1.0 if name == "token_embd" else
                                             1 / math.sqrt(shape[1]))
        else:
            weights[name] = synthetic_weight(name, matrix_type, shape, rng, 1 / math.sqrt(shape[1]))
    return weights


@dataclass
class BenchResult:
    test: str
    n_tokens: int
    depth: int
    seconds: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [self.n_tokens / s for s in self.seconds]

    def row(self) -> dict:
        rates = self.rates
        return {"test": self.test, "tokens": self.n_tokens, "depth": self.depth,
                "tokens_per_s": statistics.fmean(rates), "sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                "runs": len(rates)}


def prefill_flops(config: ModelConfig, n: int) -> float:
    """Floating-point operations (2 per multiply-add) of an n-token prefill into an empty cache without logits: every
    layer's products (Q, K, V, O, gate, up, down) and attention over the n(n+1)/2 causal query-key pairs (QK^T and
    PV: 2 x 2 x heads x head_dim a pair; DCA remaps positions, not pairs)."""
    c = config
    q_width, kv_width = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    weights = c.d_model * (q_width + 2 * kv_width) + q_width * c.d_model + 3 * c.d_model * c.ffn_dim
    pairs = n * (n + 1) / 2
    return c.n_layers * (2.0 * n * weights + 4.0 * q_width * pairs)


PEAK_SIZES = {"cuda": 8192, "cpu": 1024}  # square operands of matmul_peak


def matmul_peak(backend, reps: int = 3) -> tuple[float, str]:
    """(FLOP/s, what was measured) of the backend's dense matrix product now: the fastest of `reps` products of two
    random square matrices (CUDA: fp16 on the tensor cores, 8192^2; CPU: float32 through numpy's BLAS, 1024^2)."""
    n = PEAK_SIZES[backend.name]
    if backend.name == "cuda":
        import cupy as cp

        with backend.activate():
            device_rng = cp.random.RandomState(0)  # drawn on the device: no 2 x 256 MB from the host
            a, b = (device_rng.standard_normal((n, n), dtype=cp.float32).astype(cp.float16) for _ in range(2))
            seconds = []
            for _ in range(reps + 1):  # the first product warms up (cuBLAS handle, workspace)
                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                cp.matmul(a, b)
                end.record()
                end.synchronize()
                seconds.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
        return 2.0 * n ** 3 / min(seconds[1:]), f"fp16 GEMM {n}^2"
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    seconds = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / min(seconds[1:]), f"float32 GEMM {n}^2"


def new_cache(model, capacity: int, cache_types: tuple[str, str] | None = None):
    """An empty KV cache of `capacity` tokens for `model`, storing keys/values as cache_types (None: the
    backend's own)."""
    c = model.config
    return pipeline.new_cache(model.stages, c.n_kv_heads, c.head_dim, capacity, cache_types)


def _prefill(model, cache, tokens: np.ndarray, ubatch: int) -> None:
    for i in range(0, len(tokens), ubatch):
        model.forward(tokens[i:i + ubatch], cache, logits_for="none")


def bench_prompt(model, n: int, reps: int, ubatch: int, rng, cache_types=None) -> BenchResult:
    result = BenchResult(f"pp{n}", n, 0)
    for rep in range(reps + 1):  # the first run warms up
        tokens = rng.integers(0, model.config.vocab_size, n)
        cache = new_cache(model, n, cache_types)
        pipeline.synchronize(model.stages)
        t0 = time.perf_counter()
        _prefill(model, cache, tokens, ubatch)
        pipeline.synchronize(model.stages)
        if rep:
            result.seconds.append(time.perf_counter() - t0)
        del cache
    return result


WARM_STEPS = 2  # decode steps before timing: the first runs eagerly, the second captures the graph


def generation_length(n: int, depth: int) -> int:
    """Tokens a tgN @ dD test puts in its cache: the context (at least one token), the warm-up steps, N steps."""
    return max(depth, 1) + WARM_STEPS + n


def bench_generation(model, decoders, n: int, depth: int, reps: int, ubatch: int, rng,
                     cache_types=None) -> BenchResult:
    from .sampling import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    result = BenchResult(f"tg{n}", n, depth)
    for rep in range(reps + 1):
        prompt = rng.integers(0, model.config.vocab_size, max(depth, 1))
        cache = new_cache(model, generation_length(n, depth), cache_types)
        _prefill(model, cache, prompt[:-1], ubatch)
        logits = model.head_backend.to_numpy(model.forward(prompt[-1:], cache, logits_for="last"))[0]
        # the backend's decode loop (CUDA: graph replay), warmed (eager step, capture) before timing
        decoder = decoders.decoder(model, cache, greedy, list(prompt))
        token = decoder.first(logits)
        for _ in range(WARM_STEPS):
            token = decoder.step(token)
        pipeline.synchronize(model.stages)
        t0 = time.perf_counter()
        for _ in range(n):
            token = decoder.step(token)
        pipeline.synchronize(model.stages)
        if rep:
            result.seconds.append(time.perf_counter() - t0)
        cache = decoder = None  # free this repetition's cache before the next one allocates
    return result


def hf_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def hf_results(path: Path, prompts: list[int], n_gen: int, depths: list[int], reps: int, rng) -> list[BenchResult]:
    """The same tests on HF transformers (bf16, SDPA, plain attention) for a HF folder or a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = {"pretrained_model_name_or_path": path} if path.is_dir() else {
        "pretrained_model_name_or_path": path.parent, "gguf_file": path.name}  # transformers dequantizes GGUF
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    vocab = model.config.vocab_size

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    results = []
    with torch.inference_mode():
        for n in prompts:
            result = BenchResult(f"pp{n}", n, 0)
            for rep in range(reps + 1):
                ids = torch.as_tensor(rng.integers(0, vocab, (1, n)), device=device)
                seconds = timed(lambda: model(ids, use_cache=False, logits_to_keep=1))
                if rep:
                    result.seconds.append(seconds)
            results.append(result)
        for depth in depths:
            result = BenchResult(f"tg{n_gen}", n_gen, depth)
            for rep in range(reps + 1):
                ids = torch.as_tensor(rng.integers(0, vocab, (1, max(depth, 1))), device=device)
                prefilled = model(ids, use_cache=True, logits_to_keep=1)  # not timed: the context

                def generate(out=prefilled):
                    for _ in range(n_gen - 1):
                        out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)

                seconds = timed(generate)
                if rep:
                    result.seconds.append(seconds)
            results.append(result)
    return results


def shape_model(name: str) -> LoadedModel:
    """Random weights of a preset's shapes (models/presets.py) stored as llama.cpp's Q4_K_M files hold them:
    Q4_K matrices, Q6_K embedding and output head."""
    config = preset(name)
    weights = synthetic_weights(config, GGMLType.Q4_K, GGMLType.Q6_K)
    return LoadedModel(Path(name), "synthetic", config, None, weights)


def load_bench_model(settings: LoadSettings, synthetic: bool, shape: str | None = None) -> tuple[LLM, str]:
    """The model under test, loaded by engine.load, and its label. synthetic: random weights with the shapes
    and matrix type of settings.model (SmolLM2-135M's, Q4_1 with a Q8_0 embedding, when no model is given);
    shape: random weights of a preset's shapes (shape_model).

    The LLM's own context-sized KV cache is released: each test allocates a cache of its size (new_cache),
    as llama-bench does.
    """
    resolve_dtype(settings.dtype, resolve_device(settings.device))  # refuse a wrong --dtype before reading
    if shape is not None:
        loaded = shape_model(shape)
        llm, label = settings.load(loaded), loaded.config.name
    elif not synthetic:
        llm, label = settings.load(), None
    elif settings.model is None:
        loaded = LoadedModel(Path("synthetic"), "synthetic", SMOLLM2_CONFIG, None, synthetic_weights(SMOLLM2_CONFIG))
        llm, label = settings.load(loaded), SMOLLM2_CONFIG.name
    else:
        real = open_model(settings.model)
        types = {w.ggml_type for n, w in real.weights.items() if n.startswith("blk.") and len(w.shape) == 2}
        matrix_type = next(iter(types)) if len(types) == 1 else GGMLType.Q4_1
        llm = settings.load(dataclasses.replace(real, weights=synthetic_weights(real.config, matrix_type)))
        label = f"{real.path.name} (synthetic weights)"
    llm.cache, llm.caches = None, []
    return llm, label or llm.loaded.path.name


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from exc


@click.command("bench")
@load_options
@click.option("--synthetic", is_flag=True, help="random weights with the model's (or SmolLM2-135M's) shapes and types")
@click.option("--shape", type=click.Choice(list(PRESETS)), default=None,
              help="random weights of a real model's shapes (Q4_K matrices, Q6_K embedding and head)")
@click.option("--save-gguf", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="with --shape: write those weights as a GGUF file (llama.cpp reads it too) and stop; its "
                   "vocabulary comes from -m (a GGUF file), by default the default model's")
@click.option("-p", "--n-prompt", default="512,8192,32768", show_default=True,
              help="prompt lengths (ppN; 0: no prompt test, as in llama-bench)")
@click.option("-n", "--n-gen", default=128, show_default=True,
              help="generated tokens (tgN; 0: no generation test, as in llama-bench)")
@click.option("-d", "--depth", default="512,32768", show_default=True, help="contexts before generation")
@click.option("-r", "--repetitions", default=3, show_default=True)
@click.option("-ub", "--ubatch", type=int, default=None,
              help="tokens per forward during prefill  [default: the backend's prefill batch, as generate uses]")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@click.option("--hf/--no-hf", default=True, show_default=True,
              help="also measure HF transformers on the same model (when torch and transformers import)")
def bench(settings: LoadSettings, synthetic, shape, save_gguf, n_prompt, n_gen, depth, repetitions, ubatch, as_json,
          hf):
    """Prompt-processing and generation throughput, llama-bench style.

    The model is laid out for -c tokens (default: the longest test); each test runs in a KV cache of its own size.
    """
    if save_gguf is not None:
        if shape is None:
            raise ConfigError("--save-gguf writes the random weights of a --shape; give one")
        from .convert.synthetic import write_synthetic_gguf

        loaded = shape_model(shape)
        donor = default_model_path() if settings.model is None else settings.model
        stats = write_synthetic_gguf(save_gguf, loaded.config, tokenizer_source=donor, weights=loaded.weights)
        click.echo(stats.summary())
        return
    if shape is not None and (synthetic or settings.model is not None):
        raise ConfigError("--shape is a model of its own: drop -m and --synthetic")
    prompts, depths = _ints(n_prompt), _ints(depth)
    if repetitions < 1 or n_gen < 0 or (ubatch is not None and ubatch < 1) or any(p < 0 for p in prompts) \
            or any(d < 0 for d in depths):
        raise click.BadParameter("repetitions and ubatch must be positive, lengths and depths not negative")
    prompts, depths = [p for p in prompts if p > 0], depths if n_gen > 0 else []  # 0: no such test (llama-bench)
    if not prompts and not depths:
        raise click.BadParameter("no test left: give a prompt length or a number of tokens to generate above 0")
    longest = max(prompts + [generation_length(n_gen, d) for d in depths])
    if settings.context is not None and settings.context < longest:
        raise ConfigError(f"context of {settings.context} tokens is shorter than the longest test ({longest} "
                          f"tokens); raise -c or drop it")
    llm, label = load_bench_model(dataclasses.replace(settings, context=settings.context or longest), synthetic, shape)
    model, backend, dca = llm.model, llm.backend, llm.dca
    activations = activation_dtype(backend)
    ubatch = ubatch or backend.prefill_batch
    rng = np.random.default_rng(0)
    tests = [(f"pp{p}", 0, lambda p=p: bench_prompt(model, p, repetitions, ubatch, rng, llm.cache_types))
             for p in prompts]
    tests += [(f"tg{n_gen}", d, lambda d=d: bench_generation(model, llm.decoders, n_gen, d, repetitions, ubatch, rng,
                                                             llm.cache_types)) for d in depths]
    rows = []
    for i, (test, test_depth, run) in enumerate(tests):  # progress on stderr, as llama-bench shows each row done
        click.echo(f"bench: {test} @ {test_depth} (test {i + 1} of {len(tests)}: a warm-up run and {repetitions} "
                   f"timed)...", err=True)
        rows.append(run().row())
        click.echo(f"bench: {test} @ {test_depth}: {rows[-1]['tokens_per_s']:.1f} tokens/s", err=True)
    peak = matmul_peak(backend) if prompts else None
    for row in rows:
        if row["test"].startswith("pp"):
            row["tflops"] = prefill_flops(model.config, row["tokens"]) * row["tokens_per_s"] / row["tokens"] / 1e12
            row["peak_fraction"] = row["tflops"] * 1e12 / peak[0]
    hf_rows = None
    if hf and not synthetic and shape is None and hf_available():
        path = Path(settings.model) if settings.model is not None else default_model_path()
        click.echo("bench: the same tests with HF transformers (--no-hf skips them)...", err=True)
        try:
            hf_rows = [r.row() for r in hf_results(path, prompts, n_gen, depths, repetitions, rng)]
        except Exception as exc:  # an optional peer (its version, its extras, its memory): the engine's table stands
            reason = (str(exc).strip().splitlines() or [""])[0]
            click.echo(f"bench: HF transformers could not run this model ({type(exc).__name__}: {reason}); the "
                       f"table leaves it out", err=True)
        for row, theirs in zip(rows, hf_rows or []):
            row["hf_tokens_per_s"] = theirs["tokens_per_s"]
            row["speedup_vs_hf"] = row["tokens_per_s"] / theirs["tokens_per_s"]
    if as_json:
        click.echo(json.dumps({"model": label, "device": backend.name, "dtype": activations, "dca": dca is not None,
                               "cache_types": "/".join(llm.cache_types),
                               "matmul_peak_tflops": peak and peak[0] / 1e12, "matmul_peak": peak and peak[1],
                               "results": rows}, indent=2))
        return
    click.echo(f"model: {label}   device: {backend.name}   dtype: {activations}   dca: {'on' if dca else 'off'}   "
               f"KV cache: {'/'.join(llm.cache_types)}")
    extra = f" {'HF tokens/s':>12} | {'ratio':>6} |" if hf_rows else ""
    click.echo(f"| {'test':>8} | {'depth':>6} | {'tokens/s':>20} | {'TFLOP/s':>8} | {'of peak':>7} |{extra}")
    click.echo(f"| {'-' * 8} | {'-' * 6} | {'-' * 20} | {'-' * 8} | {'-' * 7} |"
               + (f" {'-' * 12} | {'-' * 6} |" if hf_rows else ""))
    for row in rows:
        line = f"| {row['test']:>8} | {row['depth']:>6} | {row['tokens_per_s']:>11.1f} ± {row['sd']:>6.1f} |"
        line += (f" {row['tflops']:>8.2f} | {row['peak_fraction']:>7.1%} |" if "tflops" in row else
                 f" {'':>8} | {'':>7} |")
        if hf_rows:
            line += f" {row['hf_tokens_per_s']:>12.1f} | {row['speedup_vs_hf']:>5.2f}x |"
        click.echo(line)
    if peak:
        click.echo(f"of peak: against a {peak[1]} measured now, {peak[0] / 1e12:.2f} TFLOP/s")


def main() -> None:  # `python -m engine.bench`
    try:
        bench(standalone_mode=True)
    except EngineError as exc:
        raise SystemExit(f"error: {exc}")


if __name__ == "__main__":
    main()
