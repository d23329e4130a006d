"""CUDA kernel sources and their loader: read a .cu file, compile it once with NVRTC, cache the handles.

The .cu sources live inside the Python package (engine/kernels/, not a top-level kernels/ folder) so
that ``pip install`` carries them: pyproject.toml lists them as package data. Each file holds one op
family and opens with a short design header; ``common.cuh`` (fp16 conversions through PTX, warp/block
reductions) is prepended to every file, ``mma.cuh`` (tensor-core PTX) to the fused attention kernels,
and ``dequant.cuh`` (block decoders) to the two that read
quantized weights, so no CUDA header is ever included and NVRTC from the ``cupy-cudaXXx`` +
``nvidia-cuda-nvrtc`` wheels compiles them as they are.

    function("quant", "gemv_q4_1")      -> cupy.RawKernel (compiled for the current GPU on first use)
    compile_ptx("attention", "sm_90")   -> PTX text, through NVRTC alone (no GPU or driver needed)

The two share ``source()`` and ``NVRTC_OPTIONS``, so what the CPU test compiles is what the GPU runs.
"""
from __future__ import annotations

import functools
from pathlib import Path

from ..errors import DeviceError

KERNEL_DIR = Path(__file__).resolve().parent
KERNEL_FILES = ("quant", "decode", "elementwise", "attention", "sampling", "dca_flash_attn", "dca_decode")  # <name>.cu
# headers prepended to a file's source, in order (no #include: NVRTC needs no include paths)
PRELUDES = {"quant": ("common.cuh", "dequant.cuh"), "decode": ("common.cuh", "dequant.cuh"),
            "dca_flash_attn": ("common.cuh", "mma.cuh"), "dca_decode": ("common.cuh", "mma.cuh")}
DEFAULT_PRELUDE = ("common.cuh",)
NVRTC_OPTIONS = ("-std=c++17",)


@functools.cache
def source(name: str) -> str:
    """The full source NVRTC compiles for kernels/<name>.cu (its preludes prepended)."""
    if name not in KERNEL_FILES:
        raise DeviceError(f"unknown kernel file {name!r} (known: {', '.join(KERNEL_FILES)})")
    parts = [f"#line 1 \"{header}\"\n{(KERNEL_DIR / header).read_text()}"
             for header in PRELUDES.get(name, DEFAULT_PRELUDE)]
    parts.append(f"#line 1 \"{name}.cu\"\n{(KERNEL_DIR / f'{name}.cu').read_text()}")
    return "\n".join(parts)


@functools.cache
def module(name: str):
    """The cupy.RawModule of kernels/<name>.cu, compiled once per process for the current device."""
    import cupy

    return cupy.RawModule(code=source(name), options=NVRTC_OPTIONS, name_expressions=None)


@functools.cache
def function(name: str, kernel: str):
    """One compiled kernel (extern "C" name) of kernels/<name>.cu."""
    return module(name).get_function(kernel)


def compile_ptx(name: str, arch: str = "sm_90") -> str:
    """Compile kernels/<name>.cu to PTX for `arch` through NVRTC alone (works without a GPU or driver).

    Raises DeviceError with NVRTC's log when the source does not compile.
    """
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DeviceError(f"cannot compile kernels: CuPy's NVRTC bindings are unavailable ({exc})") from exc
    virtual_arch = arch.replace("sm_", "compute_")
    prog = nvrtc.createProgram(source(name), f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={virtual_arch}", "-ftz=true", *NVRTC_OPTIONS])
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise DeviceError(f"kernels/{name}.cu does not compile for {arch}: {exc}\n{log}") from exc
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx
