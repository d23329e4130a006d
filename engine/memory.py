"""One memory plan: what a model needs on a device at a context, checked against what the device has.

Rows, in bytes, for a model (config + loader weights), a context, a device ("cpu" | "cuda") and the
activation dtype ("f32" on the CPU, "f16" | "bf16" on CUDA):
  weights      as stored. CPU: the tensors' bytes (memory-mapped from the file; a GGUF's Q/K rows are
               reordered into a copy at load), vectors as float32. CUDA: each tensor in the encoding it
               keeps on the device (cuda/weights.device_bytes).
  copies       CPU: float32 copies of the matrices not stored F32, when kept (``f32_copies``; by default
               only when the whole plan with them takes at most half of the available memory).
               CUDA: the 16-bit prefill copies of the matrices (cuda/weights.planned_fp16_copies: up to half
               the free GPU memory; none where the plan with them would leave less than a sixteenth free).
  KV cache     layers x context x KV heads x (bytes of a head's key row + of its value row), as the cache
               types store them (kv_storage.row_bytes: head_dim x 4 for f32 on the CPU, x 2 for f16/bf16 (CUDA),
               34/32 a value for q8_0, ...), once per slot (``engine serve --parallel N``: each slot has its
               own cache of the whole context)
  scratch      CPU: one dequantized block of rows (host_weights.SCRATCH_BYTES) unless every matrix is
               float32. CUDA: the largest matrix (Q/K/V and gate/up fused where their encodings agree) as
               16-bit values, unless prefill copies are kept; plus, for a q8_0 K or V cache, one layer's rows
               of the whole context in 16 bits (cuda/kv_q8.DequantScratch: prefill reads them; shared by the
               slots)
  activations  one prefill batch, min(prefill batch, context) tokens, through a layer: residual stream,
               norm, Q/K/V, attention output, gate/up/product (CPU also: the attention tiles)
  logits       one slab of ``logits_rows`` rows: the logits and their log-softmax temporaries
  runtime      CPU only: the interpreter, numpy and the tokenizer tables (a fixed allowance)
Available: MemAvailable on the CPU, free GPU memory (plus CuPy's pooled free blocks) on CUDA
(``available_bytes``, the one place that asks the machine). ``require`` refuses a plan that does not
fit, naming the rows, the largest context that fits (with several slots: also the most slots that fit at
this context) and, on the CPU, --device cuda where a GPU is usable.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .backends.host_weights import SCRATCH_BYTES
from .backends.numpy_backend import NumpyBackend
from .errors import ConfigError, ContextError, DeviceError
from .kv_storage import NATIVE_TYPE, row_bytes
from .weights.quant import GGMLType

GiB = 2 ** 30
LOGITS_SLAB_BYTES = 256 << 20  # logits (and their log-softmax temporaries) held at once
RUNTIME_BYTES = 256 << 20  # CPU: interpreter, numpy, tokenizer
COMFORT_FRACTION = 0.5  # float32 copies by default only when the plan with them takes at most this share
UNKNOWN_MEMORY_F32_BUDGET = 1 << 30  # ... or, where available memory is unknown, when they take at most this
COPIES_HEADROOM = 16  # CUDA: 16-bit prefill copies are kept only where the plan with them leaves 1/16 free
Q8_0_CACHE = ("q8_0", "q8_0")  # -ctk q8_0 -ctv q8_0, which the refusal suggests where it fits
ATTENTION_TILE = 128 * 256  # CPU: query rows x keys of one attention tile (dca.blockwise_attention)


def prefill_batch(device: str) -> int:
    """Tokens per forward during prefill: the backend's prefill_batch."""
    if device == "cpu":
        return NumpyBackend.prefill_batch
    from .backends.cuda import CudaBackend

    return CudaBackend.prefill_batch


def logit_bytes(device: str) -> int:
    """Bytes per logit held while scoring: float32 logits + float64 log-softmax copies on the CPU
    (NumpyBackend.target_logprobs), float32 logits + two float32 temporaries on CUDA."""
    return 4 + 8 + 8 if device == "cpu" else 4 + 4 + 4


def logits_rows(vocab_size: int, device: str) -> int:
    """Rows of logits to hold at once (LLM.logits / token_logprobs slabs): LOGITS_SLAB_BYTES worth, at least
    one, at most a prefill batch."""
    return max(1, min(prefill_batch(device), LOGITS_SLAB_BYTES // (vocab_size * logit_bytes(device))))


@dataclass(frozen=True)
class MemoryPlan:
    device: str  # "cpu" | "cuda"
    dtype: str  # "f32" | "f16" | "bf16"
    context: int
    f32_copies: bool  # CPU: float32 copies of the matrices kept
    weights: int
    copies: int
    kv_cache: int
    scratch: int
    activations: int
    logits: int
    runtime: int
    kv_per_token: int
    activations_per_token: int
    activations_fixed: int
    slots: int = 1  # KV caches of `context` tokens each
    kv_per_token_q8_0: int = 0  # the KV bytes per token with -ctk q8_0 -ctv q8_0, when that plan is smaller (else 0)
    scratch_per_token: int = 0  # CUDA: the q8_0 cache's dequantization scratch per context token (in `scratch`)
    scratch_per_token_q8_0: int = 0  # CUDA: that scratch with -ctk q8_0 -ctv q8_0 (with kv_per_token_q8_0)

    @property
    def total(self) -> int:
        return (self.weights + self.copies + self.kv_cache + self.scratch + self.activations + self.logits
                + self.runtime)

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) of every non-empty row, in the plan's order."""
        copies = "float32 copies" if self.device == "cpu" else f"{self.dtype} prefill copies"
        kv_label = "KV cache" if self.slots == 1 else f"KV caches ({self.slots} slots)"
        rows = [("weights as stored", self.weights), (copies, self.copies), (kv_label, self.kv_cache),
                ("scratch", self.scratch), ("activations", self.activations), ("logits", self.logits),
                ("runtime", self.runtime)]
        return [(label, n) for label, n in rows if n]

    def describe(self) -> str:
        """'weights as stored 0.09 + KV cache 0.04 + ... = 0.51 GiB'."""
        return " + ".join(f"{label} {n / GiB:.2f}" for label, n in self.rows()) + f" = {self.total / GiB:.2f} GiB"

    def at_context(self, context: int) -> MemoryPlan:
        """The same model, device and slots at another context."""
        tokens = min(context, prefill_batch(self.device))
        return dataclasses.replace(self, context=context, kv_cache=self.kv_per_token * context * self.slots,
                                   activations=self.activations_fixed + self.activations_per_token * tokens,
                                   scratch=self.scratch + self.scratch_per_token * (context - self.context))

    def with_slots(self, slots: int) -> MemoryPlan:
        """The same model, device and context with `slots` KV caches (activations are shared: one model step
        runs at a time)."""
        return dataclasses.replace(self, slots=slots, kv_cache=self.kv_per_token * self.context * slots)


def plan_memory(config: ModelConfig, weights, context: int, device: str, dtype: str = "f32",
                f32_copies: bool | None = None, available: int | None = None, slots: int = 1,
                cache_types: tuple[str, str] | None = None) -> MemoryPlan:
    """The plan for loader `weights` of `config` at `context` tokens on `device` with activations of `dtype`,
    with `slots` KV caches of that context storing keys and values as `cache_types` (None: the backend's own).

    f32_copies (CPU): keep float32 copies of the matrices; None: when the whole plan with them takes at most
    COMFORT_FRACTION of `available` bytes (unknown: when the copies take at most UNKNOWN_MEMORY_F32_BUDGET).
    """
    if slots < 1:
        raise ConfigError(f"the number of slots must be at least 1, got {slots}")
    native = NATIVE_TYPE["f32" if device == "cpu" else dtype]
    kv_per_token = kv_bytes_per_token(config, cache_types or (native, native))
    if device == "cpu":
        q8_0 = kv_bytes_per_token(config, Q8_0_CACHE) if config.head_dim % 32 == 0 else kv_per_token
        smaller = {"kv_per_token_q8_0": q8_0 if q8_0 < kv_per_token else 0}
        plan = _cpu_plan(config, weights, context, keep=True, kv_per_token=kv_per_token).with_slots(slots)
        if f32_copies is None:
            f32_copies = _comfortable(plan.total, plan.copies, available)
        plan = plan if f32_copies else _cpu_plan(config, weights, context, False, kv_per_token).with_slots(slots)
        return dataclasses.replace(plan, **smaller)
    from .backends.cuda.weights import prefill_copy_budget

    types, budget = cache_types or (native, native), prefill_copy_budget(available)
    plan = _cuda_plan(config, weights, context, dtype, kv_per_token, types, budget).with_slots(slots)
    if plan.copies and available is not None and plan.total > available - available // COPIES_HEADROOM:
        # the copies give way to the context, and leave room for what the plan does not count (cuBLAS's
        # workspace, the decode graph's pool, split-K partials)
        budget = 0
        plan = _cuda_plan(config, weights, context, dtype, kv_per_token, types, budget).with_slots(slots)
    if config.head_dim % 32 == 0:  # what a q8_0 cache (its dequantization scratch included) would take instead
        q8_0 = _cuda_plan(config, weights, context, dtype, kv_bytes_per_token(config, Q8_0_CACHE), Q8_0_CACHE,
                          budget)
        if q8_0.with_slots(slots).total < plan.total:
            plan = dataclasses.replace(plan, kv_per_token_q8_0=q8_0.kv_per_token,
                                       scratch_per_token_q8_0=q8_0.scratch_per_token)
    return plan


def cuda_copy_budget(plan: MemoryPlan, available: int | None) -> int:
    """The CUDA backend's budget for its 16-bit prefill copies (weights.keep_half) under `plan`, made with
    `available` bytes free: the one the plan counted them under, 0 where the plan keeps none."""
    from .backends.cuda.weights import prefill_copy_budget

    return prefill_copy_budget(available) if plan.copies else 0


def kv_bytes_per_token(config: ModelConfig, cache_types: tuple[str, str]) -> int:
    """KV cache bytes one token takes over all layers, keys and values stored as cache_types."""
    c = config
    return c.n_layers * c.n_kv_heads * sum(row_bytes(t, c.head_dim) for t in cache_types)


def f32_copies_fit(weights, available: int | None = None) -> bool:
    """Whether float32 copies of these loader weights fit comfortably by themselves (no KV cache counted):
    the default of a NumpyBackend used without a plan (api.load decides with the whole plan)."""
    copies, stored = _cpu_weight_bytes(weights)
    return _comfortable(stored + copies, copies, available_bytes("cpu") if available is None else available)


def _comfortable(total: int, copies: int, available: int | None) -> bool:
    """Whether float32 copies are kept by default: a plan of `total` bytes with them takes at most
    COMFORT_FRACTION of the available memory (unknown: the copies take at most UNKNOWN_MEMORY_F32_BUDGET)."""
    if available is None:
        return copies <= UNKNOWN_MEMORY_F32_BUDGET
    return total <= COMFORT_FRACTION * available


def _cpu_weight_bytes(weights) -> tuple[int, int]:
    """(float32 copies, as stored) bytes of loader weights on the CPU backend."""
    copies = stored = 0
    for w in weights.values():
        n = int(np.prod(w.shape))
        if len(w.shape) != 2:
            stored += 4 * n  # vectors are dequantized to float32 at load
            continue
        stored += int(w.raw.nbytes)
        if w.ggml_type != GGMLType.F32:
            copies += 4 * n
    return copies, stored


def _cpu_plan(config: ModelConfig, weights, context: int, keep: bool, kv_per_token: int) -> MemoryPlan:
    c = config
    copies, stored = _cpu_weight_bytes(weights)
    f32_matrices_only = copies == 0
    per_token = 4 * (6 * c.d_model + (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 3 * c.ffn_dim)
    attention_tiles = 4 * 4 * c.n_heads * ATTENTION_TILE  # scores, probabilities, mask, rotated queries
    plan = MemoryPlan(
        device="cpu", dtype="f32", context=context, f32_copies=keep, weights=stored, copies=copies if keep else 0,
        kv_cache=0, scratch=0 if keep or f32_matrices_only else SCRATCH_BYTES, activations=0,
        logits=logits_rows(c.vocab_size, "cpu") * c.vocab_size * logit_bytes("cpu"), runtime=RUNTIME_BYTES,
        kv_per_token=kv_per_token, activations_per_token=per_token, activations_fixed=attention_tiles)
    return plan.at_context(context)


def _cuda_plan(config: ModelConfig, weights, context: int, dtype: str, kv_per_token: int,
               cache_types: tuple[str, str], copy_budget: int) -> MemoryPlan:
    """copy_budget: bytes the 16-bit prefill copies may take."""
    from .backends.cuda.kv_q8 import scratch_bytes_per_token
    from .backends.cuda.weights import device_bytes, device_type, planned_fp16_copies

    c = config
    stored = sum(device_bytes(w) for w in weights.values())
    copies = planned_fp16_copies(weights, dtype, copy_budget)
    as_stored = GGMLType.F16 if dtype == "f16" else GGMLType.BF16
    scratch = 0 if copies else 2 * max((rows * cols for rows, cols, t in _cuda_matrices(c, weights, device_type)
                                        if t != as_stored), default=0)
    # a prompt's rows: fp32 residual and embedding; 16-bit normed inputs (two: the prompt blocks keep one a block),
    # q, k, v, the attention output, gate, up and the SwiGLU output (backends/cuda/prefill.py)
    per_token = 2 * 4 * c.d_model + 2 * (2 * c.d_model + (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim
                                         + 3 * c.ffn_dim)
    plan = MemoryPlan(
        device="cuda", dtype=dtype, context=0, f32_copies=False, weights=stored, copies=copies, kv_cache=0,
        scratch=scratch, activations=0, logits=logits_rows(c.vocab_size, "cuda") * c.vocab_size * logit_bytes("cuda"),
        runtime=0, kv_per_token=kv_per_token, activations_per_token=per_token,
        activations_fixed=0, scratch_per_token=scratch_bytes_per_token(c.n_kv_heads, c.head_dim, cache_types))
    return plan.at_context(context)  # adds the rows that grow with the context


def _cuda_matrices(c: ModelConfig, weights, device_type):
    """(rows, cols, device type) of each matrix a CUDA prefill product dequantizes whole: a layer's Q/K/V and
    gate/up as one when their device encodings agree (CudaBackend.prepare_weights fuses them), the rest alone."""
    groups = [(f"blk.{i}.{name}",) for i in range(c.n_layers) for name in ("attn_output", "ffn_down")]
    for i in range(c.n_layers):
        for group in (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up")):
            names = tuple(f"blk.{i}.{g}" for g in group)
            types = {device_type(weights[n].ggml_type) for n in names}
            groups += [names] if len(types) == 1 else [(n,) for n in names]
    groups += [(name,) for name in ("output", "token_embd") if name in weights]
    for names in groups:
        parts = [weights[n] for n in names]
        yield sum(int(p.shape[0]) for p in parts), int(parts[0].shape[1]), device_type(parts[0].ggml_type)


def available_bytes(device: str, gpu: int | None = None) -> int | None:
    """Memory the device can still give: MemAvailable on the CPU; on CUDA free GPU memory plus CuPy's pooled
    free blocks, of GPU `gpu` (None: the current one). None where the system does not say."""
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None
    try:
        import cupy

        with cupy.cuda.Device(gpu) if gpu is not None else contextlib.nullcontext():
            free, _total = cupy.cuda.runtime.memGetInfo()
            return int(free) + int(cupy.get_default_memory_pool().free_bytes())
    except Exception:  # no CuPy, no driver, no such GPU: unknown
        return None


def gpus_free_bytes() -> list[int | None] | None:
    """Each visible GPU's available bytes (available_bytes), or None where no GPU can be asked."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver
        return None
    return [available_bytes("cuda", i) for i in range(count)] or None


def largest_context(plan: MemoryPlan, available: int) -> int:
    """The largest context (< plan.context) whose plan fits in `available` bytes; 0 if none does."""
    low, high = 0, plan.context - 1  # invariant: low fits (0 meaning none found), high + 1 does not
    while low < high:
        mid = (low + high + 1) // 2
        if plan.at_context(mid).total <= available:
            low = mid
        else:
            high = mid - 1
    return low


def largest_slots(plan: MemoryPlan, available: int) -> int:
    """The most slots (< plan.slots) whose plan at plan.context fits in `available` bytes; 0 if none does."""
    return next((n for n in range(plan.slots - 1, 0, -1) if plan.with_slots(n).total <= available), 0)


def require(plan: MemoryPlan, available: int | None, what: str | None = None, advice: str | None = None) -> None:
    """Raise, naming the numbers, when `plan` does not fit in `available` bytes (None: unknown, no check).

    ContextError when a smaller context fits (giving the largest), DeviceError when not even one token does.
    what: how the message names the request (default: "a context of N tokens", with several slots "N slots
    of a context of M tokens each"); advice: what to do when a smaller context fits (default: the largest
    such context as -c, and with several slots first the most slots that fit at this context as --parallel).
    """
    if available is None or plan.total <= available:
        return
    several = plan.slots > 1
    what = what or (f"{plan.slots} slots of a context of {plan.context} tokens each" if several
                    else f"a context of {plan.context} tokens")
    where = "on the CPU" if plan.device == "cpu" else f"on the GPU ({plan.dtype})"
    message = f"{what}: {plan.describe()} needed {where}, but only {available / GiB:.2f} GiB is available"
    fits, slots = largest_context(plan, available), largest_slots(plan, available)
    other_device = _other_device_advice(plan)
    if fits == 0 and slots == 0:
        one_slot = largest_context(plan.with_slots(1), available) if several else 0
        if one_slot == 0:
            raise DeviceError(f"{message}; the model does not fit even with a context of 1 token" + other_device)
        advice = advice or f"one slot fits with a context of at most {one_slot} tokens: use --parallel 1 -c {one_slot}"
    if advice is None:
        hints = [f"at this context at most {slots} slot{'s fit' if slots > 1 else ' fits'}: use --parallel {slots}"
                 ] if slots else []
        if fits:
            hints.append(f"{f'with {plan.slots} slots ' if several else ''}the largest context that fits is "
                         f"{fits} tokens: use -c {fits}")
        advice = "; ".join(hints)
    raise ContextError(f"{message}; {advice}" + _q8_0_cache_advice(plan, available) + other_device)


def _q8_0_cache_advice(plan: MemoryPlan, available: int) -> str:
    """', or keep this context with a q8_0 KV cache ...' when that plan fits, else ''."""
    if not plan.kv_per_token_q8_0:
        return ""
    extra_scratch = (plan.scratch_per_token_q8_0 - plan.scratch_per_token) * plan.context  # CUDA's, shared by slots
    smaller = dataclasses.replace(plan, kv_per_token=plan.kv_per_token_q8_0,
                                  kv_cache=plan.kv_per_token_q8_0 * plan.context * plan.slots,
                                  scratch=plan.scratch + extra_scratch, scratch_per_token=plan.scratch_per_token_q8_0)
    if smaller.total > available:
        return ""
    return (f", or keep this context with a q8_0 KV cache (-ctk q8_0 -ctv q8_0: {smaller.kv_cache / GiB:.2f} GiB "
            f"instead of {plan.kv_cache / GiB:.2f})")


def _other_device_advice(plan: MemoryPlan) -> str:
    if plan.device != "cpu":
        return ""
    from .backends import cuda_unavailable_reason

    return ", or run it on the GPU with --device cuda" if cuda_unavailable_reason() is None else ""
