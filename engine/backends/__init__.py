"""Backends implement one op set over their own arrays; ``model.py`` is written once against it.

Op set (x: (n_tokens, features) activations; weights as the backend prepared them;
positions: (n,) backend int array of absolute positions):
  prepare_weights(weights) -> dict    new_cache(n_layers, capacity, n_kv_heads, head_dim)
  tokens(ids) / positions(start, n)   host -> backend arrays;   to_numpy(x)   backend -> host
  embedding(table, ids)   rmsnorm(x, w, eps)   linear(x, w) = x @ w.T   add(x, y)   swiglu(gate, up)
  rotate_keys(k, positions, rotary, dca)        keys rotated at their DCA key positions
  store_kv(cache, layer, k_rot, v, positions)   write cache rows
  attention(q, cache, layer, positions, rotary, dca, temperature_length)   q unrotated -> (n, Hq, hd)
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
