"""What an evaluation will cost before it runs: memory (refuse what cannot fit) and work (time estimates).

Memory: the model's memory plan (engine/memory.py) at the longest length, as loading it would check.
Work of a prefill of n tokens after `start` cached ones (multiply-adds counted as 2 flops):
  2 * linear_params * n  +  4 * n_layers * n_heads * head_dim * (number of causal query-key pairs)
"""
from __future__ import annotations

from .. import memory
from ..backends import resolve_device, resolve_dtype
from ..kv_storage import resolve_cache_types
from ..loader import LoadedModel
from ..options import LoadSettings


def check_memory(model: LoadedModel, n_tokens: int, settings: LoadSettings, what: str = "") -> memory.MemoryPlan:
    """Raise ContextError/DeviceError, naming the numbers, when n_tokens cannot fit on the device the load
    settings ask for (with their --dtype and --cache-type-k/-v, checked here); else the plan.

    what: how the error names the request (default: "{n_tokens} tokens").
    """
    name = resolve_device(settings.device)
    available = memory.available_bytes(name)
    activations = resolve_dtype(settings.dtype, name, model.weights)
    types = resolve_cache_types(settings.cache_type_k, settings.cache_type_v, name, activations,
                                model.config.head_dim)
    plan = memory.plan_memory(model.config, model.weights, n_tokens, name, activations, available=available,
                              cache_types=types)
    memory.require(plan, available, what=what or f"{n_tokens} tokens", advice="use shorter lengths")
    return plan


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
