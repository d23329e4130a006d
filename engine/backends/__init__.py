"""Backends implement one op set over their own arrays; the model (engine/models/) is written once against it.

Op set (x: (n_tokens, features) activations; weights as the backend prepared them;
positions: (n,) backend int array of absolute positions):
  prepare_weights(weights) -> dict    new_cache(n_layers, capacity, n_kv_heads, head_dim, types=(k, v))
  tokens(ids) / positions(start, n)   host -> backend arrays;   to_numpy(x)   backend -> host
  activate() -> context manager the ops of a split model's stage run in (its GPU current on CUDA)
  synchronize()   wait until this backend's queued work is done (CUDA: its GPU; numpy: nothing queued)
  receive(x) -> x of the previous stage (another instance of this backend) as this one's array
                (CUDA: a device-to-device copy; numpy: a copy) -- engine/pipeline.py
  embedding(table, ids)   rmsnorm(x, w, eps)   linear(x, w) = x @ w.T   swiglu(gate, up)
  linear_group(x, [w1, w2, ...]) = [x @ w1.T, ...]   (one product when the backend stored them fused)
  add_linear(x, a, w) = x + a @ w.T                  (x may be updated in place and returned)
  add_bias(y, b) = y + b                             y (n, out) activations (maybe a column view), b (out,)
  concat_rows([a1, a2, ...]) -> the arrays' rows one after another (batches of several sequences only)
  store_kv(cache, layer, k, v, positions, rotary, dca)   write cache rows: keys rotated at their
                                                         (DCA) key positions, values as given
  attention(q, cache, layer, positions, rotary, dca, temperature_length)   q unrotated -> (n, Hq, hd)
      dca: the attention layout, a DCAConfig or None; on the numpy backend also a Self-Extend or
      StreamingLLM scheme (tiled_attention.PositionScheme), which the CUDA backend refuses at load
  target_logprobs(logits, targets) -> (n,) float64 host array of log p(target) per row
  decode_blocks(model) -> the blocks a one-token step runs: the model itself, or fused forms of its
                          attention_block / mlp_block / head (same signatures, same arithmetic)
  prefill_blocks(model) -> the blocks a prompt (n > 1 tokens) runs: the model itself, or the backend's forms of
                           them (same signatures, same arithmetic)
  decoder(model, cache, sampling, history) -> decode loop (.first(last_logits), .step(token), .close())
  batched_decode: True when Llama.forward_batch runs on it (several sequences' rows in one forward: numpy);
                  the server then batches its slots' decode steps (engine/server/batching.py)

Arithmetic: the numpy backend computes in float32; the CUDA backend keeps the residual stream and
logits in float32 and every activation that feeds a matrix product (and the KV cache) in fp16 or
bf16 (``--dtype``; ``resolve_dtype``). The numpy backend's KV cache may be stored in any of llama.cpp's
cache types (``--cache-type-k/-v``: f16, q8_0, ...; engine/kv_storage.py), decoded a tile at a time.
"""
from __future__ import annotations

from ..errors import ConfigError, DeviceError
from ..weights.quant import GGMLType
from .numpy_backend import NumpyBackend

DEVICES = ("auto", "cpu", "cuda")
# activation dtype of the CUDA backend (vLLM's --dtype): auto = bf16 for models stored in BF16, else f16
DTYPES = ("auto", "f16", "bf16")
DTYPE_HELP = "activation dtype on CUDA; auto = bf16 when the model's matrices are stored BF16, else f16"


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


def resolve_device(device: str) -> str:
    """--device auto|cpu|cuda -> "cpu" or "cuda" (auto: CUDA when CuPy and a GPU are present, else CPU)."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "cpu":
        return "cpu"
    reason = cuda_unavailable_reason()
    if reason is None:
        return "cuda"
    if device == "cuda":
        raise DeviceError(f"--device cuda is unavailable: {reason}")
    return "cpu"


def stored_dtype(weights) -> str:
    """The activation dtype a model's stored matrices ask for: "bf16" when any 2-D weight is stored BF16
    (GGUF BF16 tensors, safetensors BF16: the model was trained and published in bf16), else "f16"."""
    return "bf16" if any(len(w.shape) == 2 and w.ggml_type == GGMLType.BF16 for w in weights.values()) else "f16"


def resolve_dtype(dtype: str, device: str, weights=None) -> str:
    """--dtype auto|f16|bf16 on the resolved device ("cpu" | "cuda") -> "f32" (CPU), "f16" or "bf16" (CUDA).

    weights: the loader's weights, for auto (None: f16). An explicit dtype on the CPU is an error.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if device == "cpu":
        if dtype != "auto":
            raise ConfigError("--dtype applies to --device cuda; the CPU backend computes in float32")
        return "f32"
    if dtype == "auto":
        return stored_dtype(weights) if weights is not None else "f16"
    return dtype


def activation_dtype(backend) -> str:
    """The dtype a backend's activations are in: "f32" (numpy backend), "f16" or "bf16" (CUDA)."""
    return "f32" if backend.name == "cpu" else backend.dtype


def get_backend(device: str, dtype: str = "auto", weights=None, gpu: int | None = None):
    """The backend for --device auto|cpu|cuda and --dtype auto|f16|bf16 (weights: for dtype auto).
    gpu: CUDA, the GPU a split model's stage is bound to (None: the current one); the CPU has no such choice."""
    name = resolve_device(device)
    activations = resolve_dtype(dtype, name, weights)
    if name == "cpu":
        return NumpyBackend()
    from .cuda import CudaBackend

    return CudaBackend(dtype=activations, device=gpu)
