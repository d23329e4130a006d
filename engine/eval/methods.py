"""The context-extension methods the evaluations compare, each as the LoadSettings of engine.load.

For a model trained on L tokens and evaluated at n tokens, with f = max(1, n / L):

  rope      the model's RoPE with no scaling, DCA off
  pi        position interpolation (linear scaling), factor f, DCA off
  ntk       static NTK-aware base change, factor f, DCA off
  dynamic   dynamic NTK (HF rule, factor 1): the base grows with the context in use, DCA off.
            The context is n, so on a window scored in one pass this equals ntk at factor n / L;
            the two differ only where the context is not the evaluation length (passkey: + the answer)
  yarn      YaRN, factor f, DCA off
  dca       DCA on with the given (or default 3L/4, L/8) chunk settings, no RoPE scaling
  dca+ntk   DCA on + static NTK with factor ``ntk_factor`` (default 2) when n > L, factor 1 when n <= L
  self-extend  Self-Extend (engine/self_extend.py), neighbour window W = L/8 and the smallest group size G with
            W + (n - W)/G <= L/2: LongLM's rule of thumb (its README: keep W + (N-W)/G within 1/2..2/3 of L, the
            well-trained positions); G = 1 (plain RoPE) for n <= L. DCA off, no RoPE scaling
  streaming StreamingLLM (engine/streaming.py), 4 sinks + a window of L - 4 (a cache of L tokens: positions stay
            below L), at every length (for n <= L it is plain RoPE). DCA off, no RoPE scaling

So for n <= L every scaling factor is 1 and the RoPE methods are plain RoPE. DCA stays on at every
length (with n <= chunk_len it is exactly ordinary attention). Everything else (model, device, dtype, DCA
chunk settings, attention temperature) comes from the run's LoadSettings, the same for every method.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from ..api import LLM
from ..config import DCAConfig
from ..errors import ConfigError
from ..options import LoadSettings

METHODS = ("rope", "pi", "ntk", "dynamic", "yarn", "dca", "dca+ntk", "self-extend", "streaming")
_SCALING = {"rope": "none", "pi": "linear", "ntk": "ntk", "dynamic": "dynamic", "yarn": "yarn", "dca": "none",
            "dca+ntk": "ntk", "self-extend": "none", "streaming": "none"}
STREAMING_SINKS = 4


def check_methods(methods: tuple[str, ...], settings: LoadSettings, ntk_factor: float, training_length: int) -> None:
    """Refuse impossible settings before any work (the same errors engine.load would raise later)."""
    refuse_unknown(methods)
    if any(uses_dca(m) for m in methods):
        DCAConfig.for_training_length(training_length, settings.dca_chunk_size, settings.dca_local_window)
    if not ntk_factor > 0:
        raise ConfigError(f"--ntk-factor must be positive, got {ntk_factor}")


def refuse_unknown(methods) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")


def uses_dca(method: str) -> bool:
    return method.startswith("dca")


def scale_factor(length: int, training_length: int) -> float:
    """The context-extension factor n / L, never below 1."""
    return max(1.0, length / training_length)


def method_settings(method: str, length: int, training_length: int, settings: LoadSettings = LoadSettings(),
                    ntk_factor: float = 2.0) -> LoadSettings:
    """`settings` with the DCA mode and RoPE scaling of `method` for `length` tokens (the context is left as is)."""
    refuse_unknown([method])
    if method == "dca+ntk":
        factor = ntk_factor if length > training_length else 1.0
    elif method in ("rope", "dca", "dynamic", "self-extend", "streaming"):
        factor = 1.0
    else:
        factor = scale_factor(length, training_length)
    group, window = self_extend_settings(length, training_length) if method == "self-extend" else (1, 1)
    recent = max(1, training_length - STREAMING_SINKS) if method == "streaming" else None
    return dataclasses.replace(settings, rope_scaling=_SCALING[method], rope_scale=factor,
                               dca="on" if uses_dca(method) else "off", grp_attn_n=group, grp_attn_w=window,
                               streaming_sinks=STREAMING_SINKS, streaming_window=recent)


def self_extend_settings(length: int, training_length: int) -> tuple[int, int]:
    """(group size G, neighbour window W) of the self-extend method at `length` tokens: W = L/8 and the smallest G
    with W + (n - W)/G <= L/2; G = 1 for n <= L."""
    window = max(1, training_length // 8)
    if length <= training_length:
        return 1, window
    return max(2, math.ceil((length - window) / max(1, training_length // 2 - window))), window


def model_for_cell(llm: LLM | None, cell: LoadSettings, rope_context: int, load: Callable[..., LLM]) -> LLM:
    """The run's one model laid out for a cell (a method at a length): on the first cell (llm None) loaded by
    `load` with the cell's settings (their context: the run's largest), then switched in place to the cell's
    DCA and RoPE scaling (LLM.relayout), so the weights are loaded once per run, not once per cell.
    rope_context: the context the cell runs in (dynamic NTK scales to it)."""
    if llm is None:
        llm = load(**cell.load_kwargs())
    llm.relayout(**cell.layout_kwargs(), rope_context=rope_context)
    return llm


def parse_methods(text: str) -> tuple[str, ...]:
    """'rope,dca' -> ('rope', 'dca'): known names, no repeats, at least one."""
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not names:
        raise ConfigError("no method given (choose from " + ", ".join(METHODS) + ")")
    refuse_unknown(names)
    if len(set(names)) != len(names):
        raise ConfigError(f"method list {text!r} repeats a method")
    return names


def parse_lengths(text: str, minimum: int = 2) -> tuple[int, ...]:
    """'2048,4k,8K' -> (2048, 4096, 8192): positive token counts ('k' = 1024), sorted, no repeats."""
    lengths = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        multiplier = 1024 if part[-1] in "kK" else 1
        digits = part[:-1] if multiplier > 1 else part
        if not digits.isdigit():
            raise ConfigError(f"length {part!r} is not a whole number of tokens (e.g. 2048 or 2k)")
        lengths.append(int(digits) * multiplier)
    if not lengths:
        raise ConfigError("no length given (e.g. --lengths 2048,4096)")
    if min(lengths) < minimum:
        raise ConfigError(f"length {min(lengths)} is too short: at least {minimum} tokens are needed")
    if len(set(lengths)) != len(lengths):
        raise ConfigError(f"length list {text!r} repeats a length")
    return tuple(sorted(lengths))


def parse_depths(text: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0): fractions of the prompt in [0, 1], sorted, no repeats."""
    depths = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            depth = float(part)
        except ValueError:
            raise ConfigError(f"depth {part!r} is not a number between 0 and 1") from None
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"depth {part} is outside [0, 1]")
        depths.append(depth)
    if not depths:
        raise ConfigError("no depth given (e.g. --depths 0,0.5,1)")
    if len(set(depths)) != len(depths):
        raise ConfigError(f"depth list {text!r} repeats a depth")
    return tuple(sorted(depths))
