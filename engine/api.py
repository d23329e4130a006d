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

from . import extensions, memory, pipeline, split
from .backends import activation_dtype, get_backend
from .config import DCAConfig, ModelConfig
from .default_model import default_model_path
from .errors import ConfigError, ContextError
from .kv_storage import resolve_cache_types
from .kvcache import KVCache
from .loader import LoadedModel, open_model
from .models import Llama
from .rope import RotaryTable
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .session import Session

DCA_MODES = ("auto", "on", "off")
_SAMPLING = SamplingParams()  # the defaults of generate()'s sampling arguments
LOGIT_SLAB_BYTES = 256 * 2**20  # float32 logits held at once by logits() and token_logprobs()


def slab_rows(vocab_size: int) -> int:
    """Rows of float32 logits that fit in LOGIT_SLAB_BYTES (at least one)."""
    return max(1, LOGIT_SLAB_BYTES // (4 * vocab_size))


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
                 attention_temperature: bool | None, slots: int = 1,
                 extension: extensions.Extension | None = None, cache_types: tuple[str, str] | None = None,
                 shares: Sequence[split.Share] | None = None):
        """cache_types: the K and V cache types (kv_storage.resolve_cache_types; None: the backend's own).
        shares: a layer split (engine/split.py): each share's layers run on a backend like `backend` bound to
        its device (CUDA: GPU share.device; CPU: a rank of the simulation), the first one taking the tokens."""
        self.loaded = loaded
        self.config: ModelConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        self.shares = list(shares) if shares is not None else None
        dtype = "auto" if backend.name == "cpu" else backend.dtype
        backends = [backend] if shares is None else [get_backend(backend.name, dtype, gpu=s.device) for s in shares]
        backend = self.backend = backends[0]
        self.context = context
        self.dca = dca
        self.extension = extension  # Self-Extend or StreamingLLM instead of DCA (engine/extensions.py)
        self.load_seconds = 0.0  # set by load(): reading, validating and preparing the weights
        c = self.config
        self.cache_types = resolve_cache_types(*(cache_types or (None, None)), backend.name,
                                               activation_dtype(backend), c.head_dim)
        extensions.require_16bit_cache(extension, backend.name, self.cache_types)
        # the memory plan (engine/memory.py), refused before anything is allocated when it does not fit
        available = memory.available_bytes(backend.name)
        self.memory = memory.plan_memory(c, loaded.weights, context, backend.name, activation_dtype(backend),
                                         getattr(backend, "f32_copies", None), available, slots, self.cache_types)
        # a split's plan per device (its layers' weights and KV cache ...); on CUDA each GPU's is checked
        # against its own free memory, on the CPU the ranks share the host: the whole plan is checked
        self.share_memory = None if shares is None else split.share_plans(
            c, loaded.weights, shares, context, backend.name, activation_dtype(backend), self.cache_types, slots,
            self.memory.f32_copies)
        if shares is None or backend.name == "cpu":
            memory.require(self.memory, available)
        else:
            split.require_shares(shares, self.share_memory, memory.gpus_free_bytes() or [])
        if backend.name == "cpu":
            for b in backends:
                b.f32_copies = self.memory.f32_copies
        elif shares is None:  # the plan's 16-bit prefill copies (a split's stages keep their default budget)
            backend.prefill_copy_budget = memory.cuda_copy_budget(self.memory, available)
        self.stages = [pipeline.Stage(b, range(c.n_layers) if shares is None else s.layers)
                       for b, s in zip(backends, shares or [None])]
        # allocated once for the whole context (fixed buffers); one per slot (sessions of their own, `slots`)
        self.caches = [pipeline.new_cache(self.stages, c.n_kv_heads, c.head_dim, context, self.cache_types)
                       for _ in range(slots)]
        self.cache = self.caches[0]
        self.attention_temperature = attention_temperature
        self._weights = {}  # each stage's backend prepares the weights it holds (unsplit: all of them)
        for b, share in zip(backends, shares or [None]):
            held = loaded.weights if share is None else split.share_tensors(loaded.weights, share,
                                                                            c.tied_embeddings)
            self._weights.update(b.prepare_weights(held))
        self.model = self._new_model(context)
        # the decode loops: the backend's own, or eager steps with host sampling across a split's stages
        self.decoders = backend if shares is None else pipeline.HostDecoders(self.model.head_backend)
        self.last_stats = GenerationStats()

    def _new_model(self, rope_context: int) -> Llama:
        """The forward pass of self.config's RoPE and self.dca over the prepared weights."""
        # With DCA, query positions never exceed chunk_size; without, they run to the context end.
        n_positions = self.dca.chunk_size + 1 if self.dca else self.context
        rotary = RotaryTable(self.config.rope, n_positions, context=rope_context)
        return Llama(self.config, self._weights, self.backend, rotary, self.dca,
                     temperature_length(self.config, self.dca, self.attention_temperature), self.extension,
                     self.stages)

    def relayout(self, dca: str | DCAConfig | None = "auto", dca_chunk_size: int | None = None,
                 dca_local_window: int | None = None, rope_scaling: str | None = None,
                 rope_scale: float | None = None, rope_context: int | None = None, grp_attn_n: int = 1,
                 grp_attn_w: int = extensions.GRP_ATTN_W_DEFAULT,
                 streaming_sinks: int = extensions.STREAMING_SINKS_DEFAULT,
                 streaming_window: int | None = None) -> None:
        """Switch DCA (or Self-Extend / StreamingLLM) and the RoPE scaling (load's arguments of the same names)
        without reloading the weights
        or reallocating the cache: the evaluations load once and run every (method, length) cell this way.

        The RoPE override applies to the model's configuration as it is now. rope_context: the context length
        in use, which dynamic NTK scales to (default: the whole context).
        """
        extension = extensions.resolve_extension(grp_attn_n, grp_attn_w, streaming_sinks, streaming_window)
        dca = extensions.dca_mode_beside(extension, dca, dca_chunk_size, dca_local_window)
        extensions.require_16bit_cache(extension, self.backend.name, self.cache_types)
        self.config, _, self.dca = plan(self.config, self.context, dca, dca_chunk_size, dca_local_window,
                                        rope_scaling, rope_scale)
        self.extension = extension
        self.model = self._new_model(self.context if rope_context is None else rope_context)

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

    def session(self, system: str | None = None, slot: int = 0) -> "Session":
        """A Session on this LLM's cache (engine/session.py): prompts sharing a prefix with its sequence
        prefill only the rest. system: the system message of its chat. slot: which of the `slots` caches
        allocated at load it uses (sessions on different slots keep their sequences side by side)."""
        from .session import Session

        if not 0 <= slot < len(self.caches):
            raise ConfigError(f"slot {slot} does not exist: this model was loaded with {len(self.caches)} slot(s)")
        return Session(self, system=system, cache=self.caches[slot])

    def new_cache(self) -> KVCache:
        """The context's KV cache, emptied. One sequence at a time: a new call discards the previous one."""
        self.cache.reset()
        return self.cache

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Full-sequence prefill from an empty cache: (len(ids), vocab) float32 logits.

        The returned array is the only full-size one: each prefill batch's logits are computed a slab of
        rows at a time (``_logit_slabs``) and copied into it.
        """
        ids = self._check_ids(ids)
        cache = self.new_cache()
        cache.check_room(len(ids))
        out = np.empty((len(ids), self.config.vocab_size), dtype=np.float32)
        for start, logits in self._logit_slabs(ids, cache, len(ids)):
            out[start:start + logits.shape[0]] = self.model.head_backend.to_numpy(logits)
        return out

    def token_logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """log p(ids[t+1] | ids[:t+1]) for t = 0 .. n-2: (n-1,) float64, holding one slab of logits at a time."""
        ids = self._check_ids(ids)
        cache = self.new_cache()
        cache.check_room(len(ids))
        out = np.empty(len(ids) - 1, dtype=np.float64)
        for start, logits in self._logit_slabs(ids, cache, len(ids) - 1):
            out[start:start + logits.shape[0]] = self.model.head_backend.target_logprobs(
                logits, ids[start + 1:start + 1 + logits.shape[0]])
        return out

    def _logit_slabs(self, ids: np.ndarray, cache: KVCache, n_rows: int) -> Iterator[tuple[int, object]]:
        """Prefill ids into the cache; yield (row, logits of rows row .. row+k-1) for the first n_rows positions.

        k <= slab_rows(vocab) whatever the prefill batch: a (k, vocab) backend array; with the caller's previous
        one, at most two slabs are alive (the batch's (batch, d) final hidden states are the other buffer).
        """
        batch, slab = self.backend.prefill_batch, slab_rows(self.config.vocab_size)
        for i in range(0, len(ids), batch):
            wanted = min(n_rows - i, batch)  # rows of this batch whose logits are asked for
            hidden = self.model.forward(ids[i:i + batch], cache, logits_for="hidden" if wanted > 0 else "none")
            for r in range(0, max(wanted, 0), slab):
                yield i + r, self.model.head(hidden[r:min(r + slab, wanted)])

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
        return self.model.head_backend.to_numpy(logits)[0]

    def generate_ids(self, prompt_ids: Sequence[int], max_tokens: int = 128,
                     sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None
                     ) -> Iterator[int]:
        """Stream generated token ids of a fresh sequence; the end-of-generation token itself is not yielded."""
        yield from self.generate_on(self.new_cache(), prompt_ids, max_tokens, sampling, stop_ids)

    def generate_on(self, cache: KVCache, prompt_ids: Sequence[int], max_tokens: int = 128,
                    sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    stats: GenerationStats | None = None, decoders=None) -> Iterator[int]:
        """generate_ids on a cache that already holds the keys/values of prompt_ids[:cache.length] (the caller
        vouches for them; fewer than len(prompt_ids)): only the rest is prefilled. Afterwards the cache holds
        the prompt and every generated token but the last (which was never fed back).
        stats: filled in as the generation goes (default: a new one); also ``last_stats`` from the start (where
        several generations take turns, each keeps its own).
        decoders: what makes the decode loop, ``decoders.decoder(model, cache, sampling, history)`` (default: the
        backend; the server's DecodeBatcher, engine/server/batching.py, batches several slots' steps)."""
        if max_tokens < 0:
            raise ConfigError(f"max tokens must be >= 0, got {max_tokens}")
        stops = set(self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        history = self._check_ids(prompt_ids).tolist()  # Python ints (tolist: a 32k-token prompt in ~0.2 ms)
        if cache.length >= len(history):
            raise ContextError(f"{cache.length} cached tokens leave nothing of the {len(history)}-token prompt "
                               f"to prefill")
        stats = self.last_stats = GenerationStats() if stats is None else stats
        stats.prompt_tokens, stats.cached_tokens = len(history), cache.length
        # Only the prompt's last token left (a restored or reused prefix): one decode step, whose split-K attention
        # reads a long cache across the GPU, where a prefill of one query row would not.
        by_step = max_tokens > 0 and cache.length == len(history) - 1
        t0 = time.perf_counter()
        if not by_step:
            logits = self.prefill(history[cache.length:], cache, progress)
            stats.prompt_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
        stats.stop_reason = "length"
        if max_tokens > 0:
            decoder = (self.decoders if decoders is None else decoders).decoder(self.model, cache, sampling, history)
            try:
                if by_step:
                    token = decoder.start(history[-1])
                    stats.prompt_seconds = time.perf_counter() - t0  # the prompt's last token and the first sample
                    t0 = time.perf_counter()
                    if progress is not None:
                        progress(1, 1)
                else:
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
            finally:
                decoder.close()
        stats.generation_seconds = time.perf_counter() - t0

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128,
                 temperature: float = _SAMPLING.temperature, top_k: int = _SAMPLING.top_k,
                 top_p: float = _SAMPLING.top_p, min_p: float = _SAMPLING.min_p,
                 repeat_penalty: float = _SAMPLING.repeat_penalty, repeat_last_n: int = _SAMPLING.repeat_last_n,
                 seed: int | None = _SAMPLING.seed, chat: bool = False, system: str | None = None) -> Iterator[str]:
        """Stream text pieces (never a broken UTF-8 character) of the continuation of `prompt`.

        chat=True renders the prompt as a user message through the model's chat template.
        Sampling defaults are SamplingParams' (llama.cpp's).
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
        if system is not None and not chat:
            raise ConfigError("a system message (-sys) applies to chat prompts: add --chat (chat=True)")
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


def temperature_length(config: ModelConfig, dca: DCAConfig | None, setting: bool | None) -> int | None:
    """L of the attention temperature 0.1*ln(n/L)+1, or None when it is off.

    setting: True/False (--[no-]attn-temperature) or None (auto: on when the model carries its own L -- Qwen2.5-1M's
    original_max_position_embeddings -- and DCA is in use, as vLLM's DCA backend does). L is the model's own when it
    has one, else its training context."""
    on = (config.temperature_length is not None and dca is not None) if setting is None else setting
    return (config.temperature_length or config.context_length) if on else None


def resolve_dca(mode: str | DCAConfig | None, context: int, training_length: int,
                chunk_size: int | None = None, local_window: int | None = None,
                tuned: DCAConfig | None = None) -> DCAConfig | None:
    """--dca auto|on|off (+ optional chunk settings) -> the DCA config in force, or None. auto: on when the
    context exceeds the training length or a chunk setting is given.

    tuned: the model's tuned settings (ModelConfig.tuned_dca), used when no chunk setting is given."""
    if isinstance(mode, DCAConfig):
        mode.check_against(training_length)
        return mode
    mode = "auto" if mode is None else mode
    if mode not in DCA_MODES:
        raise ConfigError(f"unknown DCA mode {mode!r} (choose from {', '.join(DCA_MODES)})")
    sizes_given = chunk_size is not None or local_window is not None  # asking for DCA, as beside an extension
    if mode == "off" or (mode == "auto" and context <= training_length and not sizes_given):
        return None
    if tuned is not None and chunk_size is None and local_window is None:
        tuned.check_against(training_length)
        return tuned
    return DCAConfig.for_training_length(training_length, chunk_size, local_window)


def plan(config: ModelConfig, context: int | None, dca: str | DCAConfig | None, dca_chunk_size: int | None,
         dca_local_window: int | None, rope_scaling: str | None, rope_scale: float | None
         ) -> tuple[ModelConfig, int, DCAConfig | None]:
    """The layout a model runs with: (config with the RoPE override, context size, DCA config or None).

    --rope-scaling without --rope-scale scales by context / training context (at least 1); --rope-scale without
    --rope-scaling is linear unless the model has a scaling of its own. Such an override turns auto DCA off (it
    extends the context instead; ``--dca on`` combines them, as eval's dca+ntk does).
    """
    context = config.context_length if context is None else int(context)
    if context <= 0:
        raise ConfigError(f"context size must be positive, got {context}")
    if config.sliding_window is not None and context > config.sliding_window:
        raise ConfigError(f"this model attends through a sliding window of {config.sliding_window} tokens, which the "
                          f"engine does not implement; a context of {context} would silently differ from the model: "
                          f"run with -c {config.sliding_window} or less")
    if config.dca is not None and context > config.context_length:  # the model extends its context itself
        raise ConfigError(f"a context of {context} tokens exceeds the model's limit of {config.context_length} "
                          f"(max_position_embeddings; it runs its own DCA up to there): lower -c")
    if config.dca is not None and dca in (None, "auto", "on") and dca_chunk_size is None and dca_local_window is None:
        dca = config.dca  # the model's own settings, whatever the context (below one chunk DCA is plain attention)
    if rope_scaling is not None or rope_scale is not None:
        if rope_scaling == "none" and rope_scale not in (None, 1.0):
            raise ConfigError(f"--rope-scale {rope_scale:g} scales nothing with --rope-scaling none: drop one")
        if rope_scale is None and rope_scaling not in (None, "none") and config.rope.factor == 1.0:
            rope_scale = max(1.0, context / config.context_length)
        if rope_scaling is None and config.rope.scaling == "none":
            rope_scaling = "linear"  # --rope-scale alone: linear unless the model has a scaling (llama.cpp)
        rope = config.rope.with_scaling(rope_scaling or config.rope.scaling, rope_scale)
        config = dataclasses.replace(config, rope=rope)
        if dca in (None, "auto") and rope.scaling != "none":
            dca = "off"  # the RoPE scaling asked for extends the context instead (--dca on combines them)
    return config, context, resolve_dca(dca, context, config.context_length, dca_chunk_size, dca_local_window,
                                        config.tuned_dca)


def load(model: str | Path | LoadedModel | None = None, device: str = "cpu", context: int | None = None,
         dca: str | DCAConfig | None = "auto", dca_chunk_size: int | None = None,
         dca_local_window: int | None = None, rope_scaling: str | None = None, rope_scale: float | None = None,
         attention_temperature: bool | None = None, dtype: str = "auto", f32_copies: bool | None = None,
         slots: int = 1, grp_attn_n: int = 1, grp_attn_w: int = extensions.GRP_ATTN_W_DEFAULT,
         streaming_sinks: int = extensions.STREAMING_SINKS_DEFAULT, streaming_window: int | None = None,
         cache_type_k: str | None = None, cache_type_v: str | None = None, split_mode: str = "none",
         tensor_split: str | Sequence[float] | None = None, gpus: int | None = None) -> LLM:
    """Load a GGUF file or HF folder (default: the default model), or an opened LoadedModel, onto a device.

    dtype: activation dtype on CUDA, "auto" (bf16 when the model's matrices are stored BF16, else f16),
    "f16" or "bf16"; the CPU backend computes in float32 (an explicit dtype there is a ConfigError).
    context: KV cache capacity in tokens (default: the model's training context).
    dca: "auto" (on when context > training context or a DCA size is given) | "on" | "off" | a DCAConfig.
    rope_scaling / rope_scale: override the model's RoPE scaling (none|linear|ntk|dynamic|yarn).
    attention_temperature: True/False, or None for the model's own setting (see temperature_length).
    f32_copies (CPU): keep float32 copies of the matrices (fast) instead of dequantizing a block of rows at a
    time from the stored weights; None: when the memory plan with them takes at most half the available memory.
    slots: KV caches of the whole context, one per concurrent session (``engine serve --parallel``).
    Memory: the plan (LLM.memory) is checked first; ContextError/DeviceError name the numbers when it does not fit.
    grp_attn_n / grp_attn_w: Self-Extend when grp_attn_n > 1; streaming_sinks / streaming_window: StreamingLLM when
    streaming_window is given (engine/extensions.py: either replaces DCA).
    cache_type_k / cache_type_v: how the KV cache stores keys / values, llama.cpp's names (engine/kv_storage.py):
    None = the backend's own (CPU f32; CUDA its activation dtype); on the CPU also f16, bf16, q8_0, q5_1, q5_0,
    q4_1, q4_0; on CUDA also q8_0.
    split_mode / tensor_split / gpus: "layer" spreads the layers over GPUs 0..N-1 (llama.cpp's --split-mode layer
    and --tensor-split proportions, e.g. (1, 1); engine/split.py), each GPU's share checked against its free
    memory; on the CPU the same split runs as a simulation (one numpy backend per rank, the handovers copies),
    which needs gpus or tensor_split to say how many ranks. "row" (tensor parallelism) is refused.
    """
    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else open_model(default_model_path() if model is None else model)
    backend = get_backend(device, dtype, loaded.weights)
    if backend.name == "cpu":
        backend.f32_copies = f32_copies
    extension = extensions.resolve_extension(grp_attn_n, grp_attn_w, streaming_sinks, streaming_window)
    dca = extensions.dca_mode_beside(extension, dca, dca_chunk_size, dca_local_window)
    loaded.config, context, dca_config = plan(loaded.config, context, dca, dca_chunk_size, dca_local_window,
                                              rope_scaling, rope_scale)
    # each GPU's free memory, asked only for a split (asking makes a context on every GPU); CPU ranks: simulated
    free = memory.gpus_free_bytes() if backend.name == "cuda" and split_mode == "layer" else None
    shares = split.resolve_split(split_mode, tensor_split, gpus, loaded.config.n_layers, free)
    llm = LLM(loaded, backend, context, dca_config, attention_temperature, slots, extension,
              (cache_type_k, cache_type_v), shares)
    llm.load_seconds = time.perf_counter() - t0
    return llm
