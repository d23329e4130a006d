"""Backends implement one op set over their own arrays; ``model.py`` is written once against it.

Op set (x: (n_tokens, features) activations; weights as the backend prepared them):
  prepare_weights(weights) -> dict      embedding(table, ids)       rmsnorm(x, w, eps)
  linear(x, w) = x @ w.T                swiglu(gate, up)            rotate_keys(k, pos, rotary, dca)
  attention(q, k_cache, v_cache, q_pos, rotary, dca, logit_scale)   new_cache(...)   to_numpy(x)
"""
from __future__ import annotations

from ..errors import ConfigError, DeviceError
from .numpy_backend import NumpyBackend

DEVICES = ("auto", "cpu", "cuda")


def get_backend(device: str):
    """The backend for --device auto|cpu|cuda."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "cuda":
        raise DeviceError("this build has no CUDA backend yet; use --device cpu")
    return NumpyBackend()
