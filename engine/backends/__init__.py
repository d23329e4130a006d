"""Backends implement one op set over their own arrays; ``model.py`` is written once against it.

Op set (x: (n_tokens, features) activations; weights as the backend prepared them;
positions: (n,) backend int array of absolute positions):
  prepare_weights(weights) -> dict    new_cache(n_layers, capacity, n_kv_heads, head_dim)
  tokens(ids) / positions(start, n)   host -> backend arrays;   to_numpy(x)   backend -> host
  embedding(table, ids)   rmsnorm(x, w, eps)   linear(x, w) = x @ w.T   swiglu(gate, up)
  linear_group(x, [w1, w2, ...]) = [x @ w1.T, ...]   (one product when the backend stored them fused)
  add_linear(x, a, w) = x + a @ w.T                  (x may be updated in place and returned)
  rotate_keys(k, positions, rotary, dca)        keys rotated at their DCA key positions
  store_kv(cache, layer, k_rot, v, positions)   write cache rows
  attention(q, cache, layer, positions, rotary, dca, temperature_length)   q unrotated -> (n, Hq, hd)
  target_logprobs(logits, targets) -> (n,) float64 host array of log p(target) per row
  decoder(model, cache, sampling, history) -> decode loop (.first(last_logits), .step(token))
"""
from __future__ import annotations

from ..errors import ConfigError, DeviceError
from .numpy_backend import NumpyBackend

DEVICES = ("auto", "cpu", "cuda")


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here (CuPy missing, no GPU, driver error), or None if it can."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'engine[cuda]', i.e. cupy-cuda12x)"
    except Exception as exc:  # a broken CuPy install raises all sorts of errors at import
        return f"CuPy failed to import ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, no device node...
        return f"no usable CUDA driver or GPU ({exc})"
    if count == 0:
        return "no CUDA GPU is visible"
    return None


def get_backend(device: str):
    """The backend for --device auto|cpu|cuda (auto: CUDA when CuPy and a GPU are present, else CPU)."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "cpu":
        return NumpyBackend()
    reason = cuda_unavailable_reason()
    if reason is None:
        from .cuda import CudaBackend

        return CudaBackend()
    if device == "cuda":
        raise DeviceError(f"--device cuda is unavailable: {reason}")
    return NumpyBackend()
