"""The `engine` command line (click). Flag names follow llama.cpp where one exists.

Every EngineError, and every bad option or command, becomes one line on stderr and exit status 1; Ctrl-C exits 130
quietly.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from . import api, memory, restore
from .api import plan, temperature_length
from .backends import cuda_unavailable_reason, resolve_device, resolve_dtype
from .bench import bench
from .convert.commands import convert, quantize
from .default_model import default_model_path
from .errors import ConfigError, EngineError
from .eval.commands import eval_group
from .eval.report import check_output_path
from .extensions import dca_mode_beside, describe_attention, resolve_extension
from .kv_storage import resolve_cache_types
from .loader import open_model
from .options import LoadSettings, load_options, sampling_options
from .sampling import SamplingParams
from .split import device_count, parse_tensor_split, resolve_split, share_plans

DTYPE_NAMES = {"f16": "fp16", "bf16": "bf16"}  # --dtype values as `engine info` prints them


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="engine")
def cli() -> None:
    """LLM inference with Dual Chunk Attention for contexts far beyond training."""


@cli.command()
@load_options
@click.option("-p", "--prompt", default=None, help="prompt text")
@click.option("-f", "--file", "prompt_file", type=click.Path(path_type=Path), default=None,
              help="read the prompt from a file (UTF-8; - reads stdin)")
@click.option("-n", "--n-predict", "n_predict", type=click.IntRange(min=-1), default=128, show_default=True,
              help="tokens to generate (-1 = until the end of the context)")
@sampling_options
@click.option("--chat", is_flag=True, help="wrap the prompt in the model's chat template")
@click.option("-sys", "--system-prompt", "system", default=None, help="system message (with --chat)")
@click.option("--prompt-cache", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="session file: reuse the cached prefix of the prompt when it exists, save the session after")
def generate(settings: LoadSettings, prompt, prompt_file, n_predict, sampling: SamplingParams, chat, system,
             prompt_cache) -> None:
    """Generate text from a prompt, streamed to stdout; speeds go to stderr."""
    text = _read_prompt(prompt, prompt_file)
    check_output_path(prompt_cache, "prompt cache")  # before the work whose session it would save
    restoring = prompt_cache is not None and prompt_cache.exists()
    pinning = restore.pin_ring_in_background() if restoring and settings.device != "cpu" else None
    llm = settings.load()
    session = llm.session() if prompt_cache is not None else None
    if restoring:
        if pinning is not None:
            pinning.join()  # the restore's pinned buffers pooled while the model loaded
        session.load(prompt_cache)
    source = llm if session is None else session  # a session reuses the file's cached prefix
    pieces = source.generate(text, max_tokens=_max_tokens(n_predict, llm), chat=chat, system=system,
                             **dataclasses.asdict(sampling))
    for piece in pieces:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    sys.stdout.flush()
    s = llm.last_stats
    if session is not None:
        session.save(prompt_cache)
        click.echo(f"prompt cache: {s.cached_tokens} of {s.prompt_tokens} prompt tokens reused; "
                   f"{len(session.tokens)} tokens saved to {prompt_cache}", err=True)
    click.echo(
        f"load: {llm.load_seconds:.2f} s | prompt: {s.prompt_tokens} tokens, {s.prompt_seconds:.2f} s, "
        f"{s.prompt_tokens_per_second:.1f} tokens/s | generation: {s.generated_tokens} tokens, "
        f"{s.generation_seconds:.2f} s, {s.generation_tokens_per_second:.1f} tokens/s | "
        f"attention: {describe_attention(llm.dca, llm.extension, llm.context)} | {_rope_in_force(llm.config.rope)}"
        f"device: {llm.device} ({llm.dtype}){_split_in_force(llm)}",
        err=True,
    )
    if s.stop_reason == "context":
        click.echo(f"note: generation stopped at the end of the context ({llm.context} tokens); raise -c",
                   err=True)


@cli.command()
@click.argument("model_arg", metavar="[MODEL]", required=False, type=click.Path(path_type=Path))
@load_options
def info(model_arg, settings: LoadSettings) -> None:
    """Describe a model and the plan it would run with (device and dtype, context, DCA chunking, RoPE)."""
    s = settings
    if model_arg is not None and s.model is not None and Path(model_arg) != Path(s.model):
        raise ConfigError(f"model twice: {model_arg} and -m {s.model}; give one")
    path = model_arg or s.model or default_model_path()
    loaded = open_model(path)
    extension = resolve_extension(s.grp_attn_n, s.grp_attn_w, s.streaming_sinks, s.streaming_window)
    dca_mode = dca_mode_beside(extension, s.dca, s.dca_chunk_size, s.dca_local_window)
    c, context, dca_plan = plan(loaded.config, s.context, dca_mode, s.dca_chunk_size, s.dca_local_window,
                               s.rope_scaling, s.rope_scale)
    device, dtype = s.device, s.dtype
    attn_temperature = temperature_length(c, dca_plan, s.attention_temperature)
    if s.split_mode == "layer" and device == "cuda" and cuda_unavailable_reason() is not None:
        device_name = "cuda"  # planning a multi-GPU run where there is no GPU: each GPU's free memory unknown
    else:
        device_name = resolve_device(device)
    activations = resolve_dtype(dtype, device_name, loaded.weights)
    cuda_dtype = resolve_dtype(dtype, "cuda", loaded.weights)  # what the CUDA figures below assume
    tok = loaded.tokenizer
    types = ", ".join(f"{name} x{n}" for name, n in sorted(loaded.tensor_type_counts().items()))
    size = sum(f.stat().st_size for f in ([path] if Path(path).is_file() else Path(path).glob("*.safetensors")))
    # the cache types on the chosen device (refused as load would); the CPU figures use them when it is the CPU
    cache_types = resolve_cache_types(s.cache_type_k, s.cache_type_v, device_name, activations, c.head_dim)
    cpu_types = cache_types if device_name == "cpu" else ("f32", "f32")
    cuda_types = cache_types if device_name == "cuda" else (cuda_dtype, cuda_dtype)
    plans = {"cpu": memory.plan_memory(c, loaded.weights, context, "cpu", available=memory.available_bytes("cpu"),
                                       cache_types=cpu_types),
             "cuda": memory.plan_memory(c, loaded.weights, context, "cuda", cuda_dtype,
                                        available=memory.available_bytes("cuda"), cache_types=cuda_types)}
    rows = [
        ("file", f"{path} ({loaded.file_format}, {size / 2**20:.1f} MiB)"),
        ("name", c.name or "-"),
        ("architecture", f"{c.architecture}: {c.n_layers} layers, d_model {c.d_model}, ffn {c.ffn_dim}"),
        ("attention", f"{c.n_heads} heads, {c.n_kv_heads} KV heads (GQA group {c.n_groups}), head_dim {c.head_dim}"),
        ("parameters", f"{loaded.n_parameters() / 1e6:.1f} M"),
        ("tensor types", types),
        ("output head", "tied to token_embd" if c.tied_embeddings else "separate"),
        ("training context", str(c.context_length)),
        ("rope", _describe_rope(c.rope)),
        ("tokenizer", f"{tok.kind}, {tok.vocab_size} tokens, bos {tok.bos_id}, eos {tok.eos_id}"),
        ("chat template", "present" if tok.chat_template else "absent (ChatML fallback)"),
        ("plan: device", _describe_device(device_name, activations, cache_types)),
        ("plan: context", str(context)),
        ("plan: weights", _describe_weights(plans)),
        ("plan: KV cache", _describe_kv_cache(plans, cpu_types, cuda_types)),
        ("plan: memory", _describe_memory(plans[device_name], memory.available_bytes(device_name))),
        ("plan: DCA", _describe_dca(dca_plan)),
        ("plan: attention", describe_attention(dca_plan, extension, context)),
        ("plan: attention on CUDA", _describe_cuda_attention(c, extension, attn_temperature)),
        ("plan: attention temperature", f"on, L = {attn_temperature}" if attn_temperature else "off"),
    ] + _split_rows(s, c, loaded.weights, context, device_name, activations, cache_types, plans[device_name])
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _split_in_force(llm: api.LLM) -> str:
    """The summary line's note of a layer split (', layer split: GPU 0 layers 0-15, GPU 1 layers 16-29')."""
    if llm.shares is None:
        return ""
    what = "GPU" if llm.device == "cuda" else "CPU rank"
    return ", layer split: " + ", ".join(f"{what} {share.device} layers {share.layers.start}-{share.layers.stop - 1}"
                                         for share in llm.shares)


def _split_rows(s: LoadSettings, c, weights, context: int, device: str, dtype: str, cache_types,
                whole: memory.MemoryPlan) -> list[tuple[str, str]]:
    """The rows of a layer split (--split-mode layer): the split, then each GPU's (CPU: rank's) share of the
    memory against its free memory ("free: unknown" where no GPU can be asked: the plan is still shown)."""
    free = memory.gpus_free_bytes() if device == "cuda" and s.split_mode == "layer" else None
    shares = resolve_split(s.split_mode, s.tensor_split, s.gpus, c.n_layers, free)
    if shares is None:
        return []
    what = "GPU" if device == "cuda" else "CPU rank"
    how = ("each GPU its layers' weights and KV cache, x copied device to device between stages, eager decode "
           "with host sampling (not yet run on several GPUs)" if device == "cuda" else
           "simulated on the CPU: one numpy backend per rank, x copied between stages")
    count = device_count(parse_tensor_split(s.tensor_split), s.gpus, free)
    idle = sorted(set(range(count)) - {share.device for share in shares})
    over = f"{count} {what}s" + (f" ({what} {', '.join(map(str, idle))}: no layer by llama.cpp's rule, the "
                                 f"output head counted as one more layer)" if idle else "")
    rows = [("plan: split", f"layer over {over}; {how}")]
    plans = share_plans(c, weights, shares, context, device, dtype, cache_types, f32_copies=whole.f32_copies)
    for share, share_plan in zip(shares, plans):
        available = free[share.device] if free else None
        text = f"{share.describe()}: {share_plan.describe()}"
        if device == "cpu":
            text += " (the ranks share the host's memory)"
        elif available is None:
            text += "; free: unknown"
        else:
            text += (f" of {available / 2**30:.2f} GiB free" if share_plan.total <= available else
                     f": does not fit in the {available / 2**30:.2f} GiB free")
        rows.append((f"plan: {what} {share.device}", text))
    return rows


def _describe_rope(rope) -> str:
    text = f"base {rope.theta:g}, dim {rope.dim}, scaling {rope.scaling}"
    if rope.scaling != "none":
        text += f" x{rope.factor:g} (original context {rope.original_context})"
    if rope.freq_factors is not None:
        text += ", frequency factors from rope_freqs"
    return text


def _rope_in_force(rope) -> str:
    """The summary line's note of a RoPE scaling in force ('rope: yarn x4 | '), empty without one."""
    return "" if rope.scaling == "none" else f"rope: {rope.scaling} x{rope.factor:g} | "


def _describe_device(device: str, dtype: str, cache_types: tuple[str, str]) -> str:
    if device == "cpu":
        return "cpu, float32"
    if cache_types == (dtype, dtype):
        return f"cuda, {DTYPE_NAMES[dtype]} activations and KV cache (float32 residual stream and logits)"
    return (f"cuda, {DTYPE_NAMES[dtype]} activations, KV cache k {cache_types[0]}, v {cache_types[1]} "
            f"(float32 residual stream and logits)")


def _describe_weights(plans) -> str:
    cpu, cuda = plans["cpu"], plans["cuda"]
    text = f"{cpu.weights / 2**30:.2f} GiB on the CPU as stored"
    if cpu.copies:
        text += f" + {cpu.copies / 2**30:.2f} GiB of float32 copies"
    text += f", {cuda.weights / 2**30:.2f} GiB on CUDA as stored"
    if cuda.copies:
        text += f" + {cuda.copies / 2**30:.2f} GiB of {DTYPE_NAMES[cuda.dtype]} copies for prefill"
    return text


def _describe_kv_cache(plans, cpu_types: tuple[str, str], cuda_types: tuple[str, str]) -> str:
    cpu, cuda = plans["cpu"], plans["cuda"]
    cuda_kinds = (DTYPE_NAMES[cuda.dtype] if cuda_types == (cuda.dtype, cuda.dtype)
                  else f"k {cuda_types[0]}, v {cuda_types[1]}")
    return (f"{cpu.kv_cache / 2**30:.2f} GiB on the CPU (k {cpu_types[0]}, v {cpu_types[1]}), "
            f"{cuda.kv_cache / 2**30:.2f} GiB on CUDA ({cuda_kinds})")


def _describe_memory(plan, available: int | None) -> str:
    """The chosen device's plan against what it has (engine/memory.py)."""
    text = f"{plan.device}: {plan.describe()}"
    if available is None:
        return text + " (available memory unknown)"
    text += f" of {available / 2**30:.2f} GiB available"
    if plan.total <= available:
        return text
    fits = memory.largest_context(plan, available)
    return text + (f": does not fit; the largest context that fits is {fits}" if fits else ": does not fit")


def _describe_cuda_attention(c, extension=None, temperature_length: int | None = None) -> str:
    from .backends.cuda.extension import fused_reason
    from .backends.cuda.flash_attention import unsupported_reason

    if extension is not None:
        composed = fused_reason(c.head_dim, c.rope.dim, c.n_heads, c.n_kv_heads, temperature_length)
        if composed is None:
            return "two passes of the mma.sync flash kernel a relation each, merged; decode steps as a CUDA graph"
        return f"the tiled algorithm over CuPy arrays (fp32 tiles of the cache; {composed}), eager decode steps"

    prefill = unsupported_reason(c.head_dim, c.rope.dim, c.n_heads, c.n_kv_heads)
    decode = unsupported_reason(c.head_dim, c.rope.dim, c.n_heads, c.n_kv_heads, decode=True)
    if prefill is not None:
        return f"simple tiled kernels (the fused tensor-core kernels do not support {prefill})"
    text = "fused tensor-core prefill (wgmma on Hopper, mma.sync on other GPUs)"
    if decode is not None:
        return text + f"; simple tiled decode (the fused decode kernel does not support {decode})"
    return text + ", split-K tensor-core decode"


def _describe_dca(plan) -> str:
    if plan is None:
        return "off (plain causal attention)"
    return (f"on: chunk_size {plan.chunk_size}, local_window {plan.local_window}, "
            f"chunk_len {plan.chunk_len}")


def _max_tokens(n_predict: int, llm: api.LLM) -> int:
    """-n as max_tokens: -1 (llama.cpp's 'no limit') lets generation run to the end of the context."""
    return llm.context if n_predict == -1 else n_predict


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give the prompt with -p or -f, not both")
    if prompt_file is not None:
        try:
            if str(prompt_file) == "-":
                return sys.stdin.buffer.read().decode("utf-8")
            return prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read prompt file {prompt_file}: {e}") from None
    if prompt is None:
        raise ConfigError("no prompt: give one with -p TEXT or -f FILE (-f - reads stdin)")
    return prompt


@cli.command()
@load_options
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("-a", "--alias", default=None, help="model name in the API (default: the model file's name)")
@click.option("-np", "--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="slots: sequences served at once, each with its own KV cache of the whole context")
@click.option("--batch-decode/--no-batch-decode", default=True, show_default=True,
              help="run the decoding slots' next tokens as one batched forward (CPU); off: one slot at a time")
def serve(settings: LoadSettings, host, port, alias, parallel, batch_decode) -> None:
    """OpenAI-compatible HTTP server (needs the `server` extra); --parallel slots, prompt prefixes reused."""
    from .server.command import run_server

    path = Path(settings.model) if settings.model is not None else default_model_path()
    model_name = alias or path.name.removesuffix(".gguf")
    run_server(lambda: api.load(**settings.load_kwargs(path), slots=parallel), model_name, host, port, batch_decode)


@cli.command()
@load_options
@click.option("-sys", "--system-prompt", "system", default=None, help="system message")
@click.option("-n", "--n-predict", "n_predict", type=click.IntRange(min=-1), default=128, show_default=True,
              help="tokens to generate per answer at most (-1 = until the end of the context)")
@sampling_options
def chat(settings: LoadSettings, system, n_predict, sampling: SamplingParams) -> None:
    """Interactive chat with the model's template: only new messages are prefilled; /help lists the commands.
    Reads one message per line when stdin is not a terminal."""
    from .chat_cli import run_chat, terminal_io

    llm = settings.load()
    run_chat(llm.session(system=system), _max_tokens(n_predict, llm), dataclasses.asdict(sampling), *terminal_io())


cli.add_command(eval_group)
cli.add_command(bench)
cli.add_command(convert)
cli.add_command(quantize)


def main() -> None:
    run(cli)


def run(group: click.Group) -> None:
    """Run a click group the engine's way: EngineError or a usage error -> one line and exit 1, Ctrl-C -> exit 130."""
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:  # a bad option or command: one line too, naming the --help to read
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"error: {e.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EngineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        sys.exit(0)
    except MemoryError:
        click.echo("error: out of memory; lower the context size with -c", err=True)
        sys.exit(1)
