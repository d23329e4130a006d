"""The Python API: ``engine.load(...)`` returns an ``LLM`` that tokenizes, scores and generates.

    llm = engine.load("model.gguf", device="cpu", dca=engine.DCAConfig(chunk_size=768, local_window=128))
    ids = llm.tokenize("text")
    logits = llm.logits(ids)                       # (len(ids), vocab) float32
    for piece in llm.generate("prompt", max_tokens=64, temperature=0.0):
        print(piece, end="")
    session = llm.session()                        # keeps its sequence: a shared prompt prefix is not read again
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .backends import activation_dtype, get_backend
from .config import DCAConfig, ModelConfig
from .default_model import default_model_path
from .errors import ConfigError, ContextError
from .kvcache import KVCache
from .loader import LoadedModel, open_model
from .model import Llama
from .rope import RotaryTable
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .session import Session

DCA_MODES = ("auto", "on", "off")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values were already cached (not prefilled again)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    stop_reason: str = ""  # "eos" | "length" | "context"

    @property
    def prompt_tokens_per_second(self) -> float:
        """Prefilled (not cached) prompt tokens per second."""
        return (self.prompt_tokens - self.cached_tokens) / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0


class LLM:
    def __init__(self, loaded: LoadedModel, backend, context: int, dca: DCAConfig | None,
                 attention_temperature: bool):
        self.loaded = loaded
        self.config: ModelConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        self.backend = backend
        self.context = context
        self.dca = dca
        self.load_seconds = 0.0  # set by load(): reading, validating and preparing the weights
        c = self.config
        # allocated once for the whole context (fixed buffers); refused up front if memory is short
        self.cache = backend.new_cache(c.n_layers, context, c.n_kv_heads, c.head_dim)
        # With DCA, query positions never exceed chunk_size; without, they run to the context end.
        n_positions = dca.chunk_size + 1 if dca else context
        rotary = RotaryTable(self.config.rope, n_positions, context=context)
        self.model = Llama(self.config, backend.prepare_weights(loaded.weights), backend, rotary, dca,
                           attention_temperature)
        self.last_stats = GenerationStats()

    @property
    def device(self) -> str:
        return self.backend.name

    @property
    def dtype(self) -> str:
        """The activation dtype: "f16" or "bf16" on CUDA, "f32" on the CPU."""
        return activation_dtype(self.backend)

    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def session(self, system: str | None = None) -> "Session":
        """A Session on this LLM's cache (engine/session.py): prompts sharing a prefix with its sequence
        prefill only the rest. system: the system message of its chat."""
        from .session import Session

        return Session(self, system=system)

    def new_cache(self) -> KVCache:
        """The context's KV cache, emptied. One sequence at a time: a new call discards the previous one."""
        self.cache.reset()
        return self.cache

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Full-sequence prefill from an empty cache: (len(ids), vocab) float32 logits."""
        ids = self._check_ids(ids)
        cache = self.new_cache()
        cache.check_room(len(ids))
        batch = self.backend.prefill_batch
        rows = [self.backend.to_numpy(self.model.forward(ids[i:i + batch], cache))
                for i in range(0, len(ids), batch)]
        return np.concatenate(rows).astype(np.float32, copy=False)

    def token_logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """log p(ids[t+1] | ids[:t+1]) for t = 0 .. n-2: (n-1,) float64, holding one batch of logits at a time."""
        ids = self._check_ids(ids)
        cache = self.new_cache()
        out = []
        batch = self.backend.prefill_batch
        for i in range(0, len(ids), batch):
            targets = ids[i + 1:i + batch + 1]  # the next token of each row; none after the last
            logits = self.model.forward(ids[i:i + batch], cache, logits_for="all" if len(targets) else "none")
            if len(targets):
                out.append(self.backend.target_logprobs(logits[:len(targets)], targets))
        return np.concatenate(out) if out else np.zeros(0)

    def prefill(self, ids: Sequence[int], cache: KVCache,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Append ids to the cache; the (vocab,) logits of the last one.

        progress(done, total) is called after each prefill batch (tokens of ids done so far).
        """
        ids = self._check_ids(ids)
        cache.check_room(len(ids))
        batch = self.backend.prefill_batch
        for i in range(0, len(ids), batch):
            piece = ids[i:i + batch]
            last = i + batch >= len(ids)
            logits = self.model.forward(piece, cache, logits_for="last" if last else "none")
            if progress is not None:
                progress(min(i + batch, len(ids)), len(ids))
        return self.backend.to_numpy(logits)[0]

    def generate_ids(self, prompt_ids: Sequence[int], max_tokens: int = 128,
                     sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None
                     ) -> Iterator[int]:
        """Stream generated token ids of a fresh sequence; the end-of-generation token itself is not yielded."""
        yield from self.generate_on(self.new_cache(), prompt_ids, max_tokens, sampling, stop_ids)

    def generate_on(self, cache: KVCache, prompt_ids: Sequence[int], max_tokens: int = 128,
                    sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Iterator[int]:
        """generate_ids on a cache that already holds the keys/values of prompt_ids[:cache.length] (the caller
        vouches for them; fewer than len(prompt_ids)): only the rest is prefilled. Afterwards the cache holds
        the prompt and every generated token but the last (which was never fed back)."""
        if max_tokens < 0:
            raise ConfigError(f"max tokens must be >= 0, got {max_tokens}")
        stops = set(self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        history = [int(i) for i in self._check_ids(prompt_ids)]
        if cache.length >= len(history):
            raise ContextError(f"{cache.length} cached tokens leave nothing of the {len(history)}-token prompt "
                               f"to prefill")
        stats = self.last_stats = GenerationStats(prompt_tokens=len(history), cached_tokens=cache.length)
        t0 = time.perf_counter()
        logits = self.prefill(history[cache.length:], cache, progress)
        stats.prompt_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats.stop_reason = "length"
        if max_tokens > 0:
            decoder = self.backend.decoder(self.model, cache, sampling, history)
            token = decoder.first(logits)
            while True:
                if token in stops:
                    stats.stop_reason = "eos"
                    break
                stats.generated_tokens += 1
                yield token
                if stats.generated_tokens == max_tokens:
                    break
                if cache.free == 0:
                    stats.stop_reason = "context"
                    break
                token = decoder.step(token)
        stats.generation_seconds = time.perf_counter() - t0

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = None, chat: bool = False,
                 system: str | None = None) -> Iterator[str]:
        """Stream text pieces (never a broken UTF-8 character) of the continuation of `prompt`.

        chat=True renders the prompt as a user message through the model's chat template.
        """
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        ids = self.prompt_ids(prompt, chat=chat, system=system)
        yield from self.text_stream(self.generate_ids(ids, max_tokens, sampling))

    def text_stream(self, tokens: Iterator[int]) -> Iterator[str]:
        """Token ids -> text pieces, never a broken UTF-8 character."""
        decoder = self.tokenizer.stream()
        for token in tokens:
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def prompt_ids(self, prompt: str | Sequence[int], chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            return self.chat_ids(([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}])
        return self.tokenize(prompt)

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """The token ids of chat messages through the model's template, ready for the assistant's answer."""
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        # the template writes BOS itself where the model wants one
        return self.tokenize(text, add_bos=False)

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise ConfigError("empty prompt: at least one token is needed")
        if arr.min() < 0 or arr.max() >= self.config.vocab_size:
            raise ConfigError(f"token ids must be in [0, {self.config.vocab_size}), got {arr.min()}..{arr.max()}")
        if arr.size > self.context:
            raise ContextError(
                f"prompt of {arr.size} tokens exceeds the context of {self.context} tokens; "
                f"raise it with -c/--ctx-size"
            )
        return arr


def resolve_dca(mode: str | DCAConfig | None, context: int, training_length: int,
                chunk_size: int | None = None, local_window: int | None = None) -> DCAConfig | None:
    """--dca auto|on|off (+ optional chunk settings) -> the DCA config in force, or None."""
    if isinstance(mode, DCAConfig):
        mode.check_against(training_length)
        return mode
    mode = "auto" if mode is None else mode
    if mode not in DCA_MODES:
        raise ConfigError(f"unknown DCA mode {mode!r} (choose from {', '.join(DCA_MODES)})")
    if mode == "off" or (mode == "auto" and context <= training_length):
        return None
    return DCAConfig.for_training_length(training_length, chunk_size, local_window)


def plan(config: ModelConfig, context: int | None, dca: str | DCAConfig | None, dca_chunk_size: int | None,
         dca_local_window: int | None, rope_scaling: str | None, rope_scale: float | None
         ) -> tuple[ModelConfig, int, DCAConfig | None]:
    """The layout a model runs with: (config with the RoPE override, context size, DCA config or None).

    --rope-scaling without --rope-scale scales by context / training context (at least 1).
    """
    context = config.context_length if context is None else int(context)
    if context <= 0:
        raise ConfigError(f"context size must be positive, got {context}")
    if rope_scaling is not None or rope_scale is not None:
        if rope_scale is None and rope_scaling not in (None, "none") and config.rope.factor == 1.0:
            rope_scale = max(1.0, context / config.context_length)
        rope = config.rope.with_scaling(rope_scaling or config.rope.scaling, rope_scale)
        config = dataclasses.replace(config, rope=rope)
    return config, context, resolve_dca(dca, context, config.context_length, dca_chunk_size, dca_local_window)


def load(model: str | Path | None = None, device: str = "cpu", context: int | None = None,
         dca: str | DCAConfig | None = "auto", dca_chunk_size: int | None = None,
         dca_local_window: int | None = None, rope_scaling: str | None = None, rope_scale: float | None = None,
         attention_temperature: bool = False, dtype: str = "auto") -> LLM:
    """Load a GGUF file or HF folder (default: the default model) onto a device.

    dtype: activation dtype on CUDA, "auto" (bf16 when the model's matrices are stored BF16, else f16),
    "f16" or "bf16"; the CPU backend computes in float32 (an explicit dtype there is a ConfigError).
    context: KV cache capacity in tokens (default: the model's training context).
    dca: "auto" (on when context > training context) | "on" | "off" | a DCAConfig.
    rope_scaling / rope_scale: override the model's RoPE scaling (none|linear|ntk|dynamic|yarn).
    """
    t0 = time.perf_counter()
    loaded = open_model(default_model_path() if model is None else model)
    backend = get_backend(device, dtype, loaded.weights)
    loaded.config, context, dca_config = plan(loaded.config, context, dca, dca_chunk_size, dca_local_window,
                                              rope_scaling, rope_scale)
    llm = LLM(loaded, backend, context, dca_config, attention_temperature)
    llm.load_seconds = time.perf_counter() - t0
    return llm
