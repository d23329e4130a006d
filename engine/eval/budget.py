"""What an evaluation will cost before it runs: memory (refuse what cannot fit) and work (time estimates).

Memory of one scoring pass at n tokens:
  KV cache   2 (k, v) * n_layers * n * n_kv_heads * head_dim * itemsize   (itemsize of the backend's cache)
  weights    as the backend holds them: float32 on the CPU backend (it dequantizes), stored bytes elsewhere
  logits     one prefill batch of float32 logits and two float64 copies (log-softmax)
Work of a prefill of n tokens after `start` cached ones (multiply-adds counted as 2 flops):
  2 * linear_params * n  +  4 * n_layers * n_heads * head_dim * (number of causal query-key pairs)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..backends import get_backend
from ..errors import ContextError
from ..loader import LoadedModel

GiB = 2 ** 30


@dataclass(frozen=True)
class MemoryEstimate:
    kv_cache: int
    kv_itemsize: int
    weights: int
    logits: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.weights + self.logits


def estimate_memory(model: LoadedModel, n_tokens: int, backend) -> MemoryEstimate:
    c = model.config
    probe = backend.new_cache(c.n_layers, 1, c.n_kv_heads, c.head_dim)  # one row: tells the cache's dtype
    itemsize = probe.k.dtype.itemsize
    kv = 2 * c.n_layers * n_tokens * c.n_kv_heads * c.head_dim * itemsize
    if backend.name == "cpu":
        weights = 4 * model.n_parameters()
    else:
        weights = sum(int(w.raw.nbytes) for w in model.weights.values())
    logits = min(n_tokens, backend.prefill_batch) * c.vocab_size * (4 + 8 + 8)
    return MemoryEstimate(kv, itemsize, weights, logits)


def available_memory(backend) -> int | None:
    """Bytes the backend can still allocate: MemAvailable on the CPU, free device memory on CUDA; None if unknown."""
    if backend.name == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    try:
        import cupy
    except ImportError:
        return None
    free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())


def check_memory(model: LoadedModel, n_tokens: int, device: str, what: str = "", dtype: str = "auto"
                 ) -> MemoryEstimate:
    """Raise ContextError, naming the numbers, when n_tokens cannot fit on the device; else the estimate.

    what: how the error names the request (default: "{n_tokens} tokens"). dtype: --dtype (checked here).
    """
    backend = get_backend(device, dtype, model.weights)
    need = estimate_memory(model, n_tokens, backend)
    have = available_memory(backend)
    if have is not None and need.total > have:
        c = model.config
        raise ContextError(
            f"{what or f'{n_tokens} tokens'} need about {need.total / GiB:.1f} GiB on {backend.name} "
            f"(KV cache {need.kv_cache / GiB:.1f} GiB = 2 x {c.n_layers} layers x {n_tokens} tokens x "
            f"{c.n_kv_heads} KV heads x {c.head_dim} dims x {need.kv_itemsize} bytes, "
            f"weights {need.weights / GiB:.1f} GiB, logits {need.logits / GiB:.1f} GiB) "
            f"but only {have / GiB:.1f} GiB is available; use shorter lengths"
        )
    return need


def linear_params(model: LoadedModel) -> int:
    """Parameters of every matrix a token goes through (projections and the output head)."""
    c = model.config
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = c.d_model * (q_out + 2 * kv_out) + q_out * c.d_model + 3 * c.d_model * c.ffn_dim
    return c.n_layers * per_layer + c.vocab_size * c.d_model


def prefill_flops(model: LoadedModel, n_tokens: int, start: int = 0) -> float:
    """Flops of running n_tokens new tokens after `start` cached ones (attention over all earlier keys)."""
    c = model.config
    # query at position p attends p + 1 keys: sum over p = start .. start+n-1
    pairs = n_tokens * start + n_tokens * (n_tokens + 1) / 2
    return 2.0 * linear_params(model) * n_tokens + 4.0 * c.n_layers * c.n_heads * c.head_dim * pairs
