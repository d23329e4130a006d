"""What an evaluation will cost before it runs: memory (refuse what cannot fit) and work (time estimates).

Memory: the model's memory plan (engine/memory.py) at the longest length, as loading it would check.
Work of a prefill of n tokens after `start` cached ones (multiply-adds counted as 2 flops):
  2 * linear_params * n  +  4 * n_layers * n_heads * head_dim * (number of causal query-key pairs)
"""
from __future__ import annotations

from .. import memory
from ..backends import resolve_device, resolve_dtype
from ..loader import LoadedModel


def check_memory(model: LoadedModel, n_tokens: int, device: str, what: str = "", dtype: str = "auto"
                 ) -> memory.MemoryPlan:
    """Raise ContextError/DeviceError, naming the numbers, when n_tokens cannot fit on the device; else the plan.

    what: how the error names the request (default: "{n_tokens} tokens"). dtype: --dtype (checked here).
    """
    name = resolve_device(device)
    available = memory.available_bytes(name)
    plan = memory.plan_memory(model.config, model.weights, n_tokens, name, resolve_dtype(dtype, name, model.weights),
                              available=available)
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
