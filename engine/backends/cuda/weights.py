"""Weights on the device, kept in their GGUF encoding, and the matrix products over them.

A 2-D weight becomes a ``DeviceMatrix``: its stored bytes as a (rows, row_bytes) uint8 device array
plus the ggml type. Matrices that read the same input (a layer's Q, K, V; gate and up) are stored as
one matrix when their encodings agree (``fuse``): each part is a row range of the whole, so GEMV
decode is unchanged and a prefill product of the group is one GEMM (``linear`` on ``whole``).
``linear`` picks per call:
  n == 1  GEMV kernel (gemv.gemv: kernels/gemv.cu gemv_<type>), no cuBLAS: capturable in a graph
  n > 1   dequantize into one shared scratch buffer in the activation dtype (dequant_<type>) + cuBLAS
          GEMM, 16-bit inputs, fp32 accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F); weights stored in
          the activation dtype (F16 for f16, BF16 for bf16) are used as stored, and a small model keeps
          dequantized copies in the activation dtype (``keep_half``) instead
Activation dtype ("f16" or "bf16", MatrixOps(cp, dtype)): CuPy has no bfloat16, so bf16 arrays are
uint16 bit patterns (``activation_type``, ``to_activation``); the kernels are the bf16 build of quant.cu.
Output: the activation dtype, or fp32 for the output head (``f32_out``; logits keep their precision).
Types kept quantized: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K. Other ggml types the loader
accepts (Q5_0, Q5_1, Q5_K) are dequantized once on the host and kept as F16.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError, DeviceError
from . import gemv
from .kernels import ACTIVATION_DTYPES, function, per_type
from ...weights.bf16 import to_bf16_bits
from ...weights.quant import GGMLType, dequantize

KERNEL_SUFFIX = {
    GGMLType.F32: "f32", GGMLType.F16: "f16", GGMLType.BF16: "bf16", GGMLType.Q8_0: "q8_0",
    GGMLType.Q4_0: "q4_0", GGMLType.Q4_1: "q4_1", GGMLType.Q4_K: "q4_k", GGMLType.Q6_K: "q6_k",
}
QUANT_MACRO = "QUANT_KERNELS"  # quant.cu's kernels, instantiated per weight type
OUTPUT_HEADS = ("output", "token_embd")  # weights whose products are logits (fp32 out)
# A model whose matrices take at most prefill_copy_budget bytes as 16-bit values keeps copies in the activation
# dtype for prefill GEMMs: dequantizing per prefill batch costs a small model ~4% of a 32k-token prefill (many
# small launches; SmolLM2-135M: 0.27 GB of copies) and Llama-3.2-1B 59% of a 512-token one (H100, session 13:
# pp512 39.3k -> 94.7k tokens/s with its 2.5 GB of copies kept, pp8192 +3%) and Llama-3-8B's pp512 38% (session
# 19: 26.2k -> 42.1k tokens/s with its 15 GB of copies, pp8192 +3%). The budget: half the GPU memory free at load
# (~39 GB on an 80 GB H100), at least PREFILL_FP16_BUDGET; the memory plan drops the copies where the context would
# not fit with them or they would leave less than a sixteenth free (memory.plan_memory): they never take the KV
# cache's memory.
PREFILL_FP16_BUDGET = 1 << 30
PREFILL_FP16_SHARE = 2

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_R_16F, _R_16BF, _R_32F = 2, 14, 0
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1
# alpha / beta of the GEMMs: fp32 on the host (cuBLAS's default pointer mode), made once and kept for the process
_SCALAR_ARRAYS = {value: np.full(1, value, dtype=np.float32) for value in (0.0, 1.0)}
_SCALARS = {value: array.ctypes.data for value, array in _SCALAR_ARRAYS.items()}  # value -> its address


@dataclass
class DeviceMatrix:
    """A (rows, cols) weight as stored: raw bytes (rows, row_bytes) uint8 on the device."""

    name: str
    ggml_type: GGMLType
    rows: int
    cols: int
    data: object  # cupy uint8 (rows, row_bytes)
    f32_out: bool
    whole: "DeviceMatrix | None" = None  # the fused matrix this one is a row range of
    row_offset: int = 0  # first row within `whole`
    half: object = None  # a dequantized (rows, cols) copy in the activation dtype for prefill GEMMs (keep_half)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def suffix(self) -> str:
        return KERNEL_SUFFIX[self.ggml_type]


def activation_type(cp, dtype: str):
    """The CuPy dtype of activation arrays: float16 for "f16", uint16 (bf16 bit patterns) for "bf16"."""
    if dtype not in ACTIVATION_DTYPES:
        raise ConfigError(f"unknown activation dtype {dtype!r} (choose from {', '.join(ACTIVATION_DTYPES)})")
    return cp.float16 if dtype == "f16" else cp.uint16


def to_activation(cp, x, dtype: str):
    """x as a C-contiguous activation array of `dtype`: as it is when it already is one; floats rounded to
    fp16, or to bf16 (round to nearest even on the float32 bits)."""
    act = activation_type(cp, dtype)
    if x.dtype == act:
        return cp.ascontiguousarray(x)
    if dtype == "f16":
        return cp.ascontiguousarray(x, dtype=cp.float16)
    return to_bf16_bits(x, cp)


def row_stride(x, act) -> int | None:
    """Elements between the rows of a (n, heads, D) activation array (dtype act) whose rows are each
    contiguous, when the 16-byte kernels can read it (stride % 8 == 0, 16-byte aligned); None otherwise."""
    if x.dtype != act or x.strides[2] != 2 or x.strides[1] != 2 * x.shape[2]:
        return None
    stride = x.strides[0] // 2 if x.shape[0] > 1 else x.shape[1] * x.shape[2]
    if stride % 8 or x.data.ptr % 16:
        return None
    return stride


def stored_as_activation(dtype: str) -> GGMLType:
    """The weight type a GEMM reads as stored, without a dequantized copy: F16 for f16, BF16 for bf16."""
    return GGMLType.F16 if dtype == "f16" else GGMLType.BF16


def upload_weight(cp, name: str, tensor) -> object:
    """A loader WeightTensor -> a fp32 device vector (1-D) or a DeviceMatrix (2-D)."""
    if len(tensor.shape) == 1:
        return cp.asarray(tensor.dequantize().astype(np.float32))
    if len(tensor.shape) != 2:
        raise DeviceError(f"weight {name}: the CUDA backend takes 1-D or 2-D tensors, got shape {tensor.shape}")
    rows, cols = (int(s) for s in tensor.shape)
    if cols % 8:
        raise DeviceError(f"weight {name}: row length {cols} is not a multiple of 8 (needed by the CUDA kernels)")
    ggml_type = device_type(tensor.ggml_type)
    raw = tensor.row_bytes()
    if ggml_type != tensor.ggml_type:  # no device decoder for this type: keep it as fp16
        raw = dequantize(tensor.raw, tensor.ggml_type, tensor.shape).astype("<f2").view(np.uint8).reshape(rows, -1)
    data = cp.asarray(np.ascontiguousarray(raw))
    return DeviceMatrix(name, ggml_type, rows, cols, data, name in OUTPUT_HEADS)


def device_type(ggml_type) -> GGMLType:
    """The encoding a weight of this type keeps on the device (types without a device decoder -> F16)."""
    return GGMLType(ggml_type) if GGMLType(ggml_type) in KERNEL_SUFFIX else GGMLType.F16


def device_bytes(tensor) -> int:
    """Device memory of a loader weight once uploaded (upload_weight): vectors as fp32, matrices as kept."""
    if len(tensor.shape) != 2:
        return 4 * int(np.prod(tensor.shape))
    if device_type(tensor.ggml_type) != tensor.ggml_type:
        return 2 * int(np.prod(tensor.shape))
    return int(tensor.raw.nbytes)


def prefill_copy_budget(available: int | None) -> int:
    """Bytes the 16-bit prefill copies may take with `available` bytes of GPU memory free (None: unknown)."""
    return max(PREFILL_FP16_BUDGET, (available or 0) // PREFILL_FP16_SHARE)


def planned_fp16_copies(weights, dtype: str = "f16", budget: int | None = None) -> int:
    """Bytes of the 16-bit prefill copies (MatrixOps.keep_half) the CUDA backend will keep for these loader
    weights with activations of `dtype`: the matrices not stored in that dtype, when they fit in `budget`
    (None: PREFILL_FP16_BUDGET), else 0."""
    as_stored = stored_as_activation(dtype)
    total = sum(2 * int(np.prod(w.shape)) for w in weights.values()
                if len(w.shape) == 2 and device_type(w.ggml_type) != as_stored)
    return total if total <= (PREFILL_FP16_BUDGET if budget is None else budget) else 0


def fuse(cp, parts: list[DeviceMatrix]) -> DeviceMatrix | None:
    """One matrix holding `parts` row after row, the parts becoming row-range views of it (in place);
    None (parts untouched) when their types, row lengths or output kinds differ."""
    first = parts[0]
    if any(p.ggml_type != first.ggml_type or p.cols != first.cols or p.f32_out or p.whole is not None
           or p.data.shape[1] != first.data.shape[1] for p in parts):
        return None
    whole = DeviceMatrix("+".join(p.name for p in parts), first.ggml_type, sum(p.rows for p in parts), first.cols,
                         cp.concatenate([p.data for p in parts]), False)
    offset = 0
    for p in parts:
        p.data, p.whole, p.row_offset = whole.data[offset:offset + p.rows], whole, offset
        offset += p.rows
    return whole


def fused_whole(parts) -> DeviceMatrix | None:
    """The fused matrix that `parts` are, in order, the consecutive row ranges of (None if they are not)."""
    whole = parts[0].whole
    offset = 0
    for p in parts:
        if p.whole is not whole or whole is None or p.row_offset != offset:
            return None
        offset += p.rows
    return whole if offset == whole.rows else None


class MatrixOps:
    """linear / embedding over DeviceMatrix weights with activations of `dtype` ("f16" | "bf16"); owns the
    dequantization scratch buffer (in the activation dtype)."""

    def __init__(self, cp, dtype: str = "f16"):
        self.cp = cp
        self.dtype = dtype
        self.act = activation_type(cp, dtype)
        self.as_stored = stored_as_activation(dtype)  # weights a GEMM reads without a copy
        self._scratch = None  # cupy uint8, grown to the largest matrix seen (16-bit values)
        self.gemm_path = "cublasGemmEx"  # switches to "cupy.matmul" if GemmEx is unavailable (f16 only)

    def embedding(self, table: DeviceMatrix, ids) -> object:
        """ids (n,) int32 device -> (n, cols) fp32."""
        cp = self.cp
        n = ids.shape[0]
        out = cp.empty((n, table.cols), dtype=cp.float32)
        if n:
            function("quant", f"embed_{table.suffix}", self.dtype, instance=per_type(QUANT_MACRO, table.suffix))(
                (n,), (128,), (table.data, ids, out, np.int32(table.cols), np.int64(table.data.shape[1])))
        return out

    def linear(self, x, w: DeviceMatrix) -> object:
        """x (n, cols) -> x @ W^T (n, rows): the activation dtype, or fp32 for an output head."""
        cp = self.cp
        if x.ndim != 2 or x.shape[1] != w.cols:
            raise DeviceError(f"linear: input of shape {x.shape} does not match weight {w.name} {w.shape}")
        x = to_activation(cp, x, self.dtype)
        n = x.shape[0]
        out_dtype = cp.float32 if w.f32_out else self.act
        if n == 1:
            y = cp.empty((1, w.rows), dtype=out_dtype)
            gemv.gemv(x, w, y, self.dtype)
            return y
        return self._gemm(x, self.dequantize(w), out_dtype)

    def linear_accumulate(self, acc, x, w: DeviceMatrix) -> None:
        """acc (n, rows) fp32 += x (n, cols) @ W^T, as one GEMM with beta = 1 (n > 1, not an output head)."""
        self.gemm_into(to_activation(self.cp, x, self.dtype), w, acc, accumulate=True)

    def gemm_into(self, x, w: DeviceMatrix, out, accumulate: bool = False) -> None:
        """out (n, rows) = x (n, cols) @ W^T, or += with accumulate (out fp32); x a C-contiguous activation array,
        out C-contiguous in the activation dtype or fp32 (n > 1, one GEMM)."""
        n, k = x.shape
        w16 = self.dequantize(w)
        if self.gemm_path == "cublasGemmEx":
            try:
                self._gemm_ex(x, w16, out, n, w.rows, k, beta=1.0 if accumulate else 0.0)
                return
            except Exception as exc:
                self._gemm_ex_failed(exc)
        product = self.cp.matmul(x, w16.T)
        if accumulate:
            out += product.astype(out.dtype)
        else:
            out[...] = product

    def keep_half(self, matrices: list[DeviceMatrix], budget_bytes: int) -> int:
        """Give the matrices (fused wholes and unfused ones) dequantized copies in the activation dtype, and
        the parts of a whole row-range views of its copy, when the copies of all of them fit in
        budget_bytes; returns the bytes kept (0: none, prefill dequantizes per call)."""
        cp = self.cp
        needed = [m for m in matrices if m.ggml_type != self.as_stored and m.half is None]
        total = sum(2 * m.rows * m.cols for m in needed)
        if not needed or total > budget_bytes:
            return 0
        try:
            for m in needed:
                m.half = self.dequantize(m).copy()
        except cp.cuda.memory.OutOfMemoryError:
            for m in needed:
                m.half = None
            return 0
        self._scratch = None  # every product now reads a copy: the plan counts no scratch beside them
        return total

    def dequantize(self, w: DeviceMatrix) -> object:
        """W as (rows, cols) in the activation dtype: the stored bytes themselves when stored in it (F16 for
        f16, BF16 for bf16), the kept copy (keep_half), a row range of its fused whole's kept copy, or else a
        view of the shared scratch buffer (valid until the next call)."""
        cp = self.cp
        if w.ggml_type == self.as_stored:
            return w.data.view(self.act).reshape(w.rows, w.cols)
        if w.half is not None:
            return w.half
        if w.whole is not None and w.whole.half is not None:
            return w.whole.half[w.row_offset:w.row_offset + w.rows]
        nbytes = 2 * w.rows * w.cols
        if self._scratch is None or self._scratch.size < nbytes:
            self._scratch = cp.empty(nbytes, dtype=cp.uint8)
        out = self._scratch[:nbytes].view(self.act).reshape(w.rows, w.cols)
        chunks = w.rows * (w.cols // 8)
        function("quant", f"dequant_{w.suffix}", self.dtype, instance=per_type(QUANT_MACRO, w.suffix))(
            ((chunks + 255) // 256,), (256,),
            (w.data, out, np.int32(w.rows), np.int32(w.cols), np.int64(w.data.shape[1])))
        return out

    def _gemm(self, x, w16, out_dtype) -> object:
        """(n, k) @ (m, k)^T, both in the activation dtype -> (n, m) out_dtype, fp32 accumulation."""
        cp = self.cp
        n, k = x.shape
        m = w16.shape[0]
        out = cp.empty((n, m), dtype=out_dtype)
        if self.gemm_path == "cublasGemmEx":
            try:
                self._gemm_ex(x, w16, out, n, m, k)
                return out
            except Exception as exc:  # an older CuPy/cuBLAS without GemmEx: use CuPy's own matmul
                self._gemm_ex_failed(exc)
        return cp.matmul(x, w16.T).astype(out_dtype, copy=False)

    def _gemm_ex_failed(self, exc: Exception) -> None:
        """Fall back to cupy.matmul for fp16; bf16 has no fallback (CuPy has no bfloat16 matmul)."""
        if self.dtype == "bf16":
            raise DeviceError(f"cuBLAS gemmEx failed on bf16 activations ({type(exc).__name__}: {exc}); "
                              "CuPy has no bf16 matmul to fall back to, use --dtype f16") from exc
        self.gemm_path = "cupy.matmul"

    def _gemm_ex(self, x, w16, out, n: int, m: int, k: int, beta: float = 0.0) -> None:
        """Row-major out (n, m) = x (n, k) @ w16 (m, k)^T + beta * out (beta 0 or 1): column-major out^T = w16 x^T."""
        from cupy_backends.cuda.libs import cublas

        cp = self.cp
        handle = cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
        ab_type = _R_16F if self.dtype == "f16" else _R_16BF
        c_type = _R_32F if out.dtype == cp.float32 else ab_type
        cublas.gemmEx(handle, _OP_T, _OP_N, m, n, k, _SCALARS[1.0], w16.data.ptr, ab_type, k,
                      x.data.ptr, ab_type, k, _SCALARS[beta], out.data.ptr, c_type, m, _COMPUTE_32F,
                      _GEMM_DEFAULT)
