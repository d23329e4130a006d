"""CUDA kernel sources and their loader: read a .cu file, compile it once with NVRTC, cache the handles.

The .cu sources live in the top-level ``kernels/`` folder of the repository; ``pip install`` carries
them as the package data ``engine/kernel_sources`` (pyproject.toml maps the folder onto it). Each file holds one op
family and opens with a short design header; ``common.cuh`` (fp16/bf16 conversions through PTX, the
activation type, warp/block reductions) is prepended to every file, ``dca.cuh`` (DCA positions) to every
file that rotates keys or queries, ``mma.cuh`` (tensor-core PTX, shared-memory addresses) and ``flash.cuh`` (query
rotation, prefill epilogue) to the fused attention kernels, ``mbarrier.cuh`` (mbarriers, cp.async and bulk copies
completing on them) to the sm_90a one and gemv.cu, ``wgmma.cuh`` (Hopper's warpgroup MMA) to the sm_90a one,
``dequant.cuh`` (block decoders) to the two that read quantized weights, and ``kv_q8.cuh`` (q8_0 KV cache rows) to the two that read or write them, so no CUDA header is ever included and NVRTC from the ``cupy-cudaXXx`` +
``nvidia-cuda-nvrtc`` wheels compiles them as they are.

Architecture-specific files (``ARCH_FILES``: dca_flash_attn_sm90 needs sm_90a) are compiled by
``cubin.py`` to a cubin for that exact target, cached on disk; CuPy compiles the rest for the
current GPU and caches them itself.

Activation dtype. Every file whose kernels read or write activations is built once per activation dtype
from one source: "f16" as written, "bf16" with ``-DACT_BF16`` (common.cuh then makes ``act_t`` bf16 bits
and ``ACT_IS_BF16`` true); kernel names carry no dtype. Files without activations (``DTYPE_FREE_FILES``:
sampling reads fp32 logits) are built once ("f16").

Instances. Templated kernels (the fused attention kernels' tile configurations, the weight-type kernels of
gemv.cu and quant.cu) are instantiated per build by one macro line appended to the file
(``function(..., instance="DCA_DECODE(64, 32)")``, ``per_type("GEMV_KERNELS", "q4_k")``): a run compiles
only the configurations and weight types it launches. Other configurations (measurement variants) are built the
same way from the development area (dev/cuda/), never by production code.

    function("gemv", "gemv_q4_1", "bf16", instance=per_type("GEMV_KERNELS", "q4_1"))   -> cupy.RawKernel
                                                (compiled for the current GPU on first use)
    function("dca_decode", "dca_decode_64", "f16", instance="DCA_DECODE(64, 32)")
    compile_ptx("attention", "sm_90", "bf16") -> PTX text, through NVRTC alone (no GPU or driver needed)

The two share ``source()`` and ``nvrtc_options()``, so what the CPU test compiles is what the GPU runs.
"""
from __future__ import annotations

import functools
from pathlib import Path

from ...errors import DeviceError



def _kernel_dir() -> Path:
    """The installed copy (engine/kernel_sources, a wheel install) or the checkout's kernels/ folder
    (running from the repository, or an editable install)."""
    package = Path(__file__).resolve().parents[2]
    installed = package / "kernel_sources"
    return installed if installed.is_dir() else package.parent / "kernels"


KERNEL_DIR = _kernel_dir()
KERNEL_FILES = ("quant", "gemv", "elementwise", "attention", "sampling", "dca_flash_attn", "dca_decode",
                "dca_flash_attn_sm90", "kv_q8")  # <name>.cu
# headers prepended to a file's source, in order (no #include: NVRTC needs no include paths)
PRELUDES = {"quant": ("common.cuh", "dequant.cuh"),
            "gemv": ("common.cuh", "dequant.cuh", "dca.cuh", "mma.cuh", "mbarrier.cuh"),
            "elementwise": ("common.cuh", "dca.cuh"), "attention": ("common.cuh", "dca.cuh"),
            "dca_flash_attn": ("common.cuh", "mma.cuh", "dca.cuh", "flash.cuh"),
            "dca_decode": ("common.cuh", "mma.cuh", "dca.cuh", "flash.cuh", "kv_q8.cuh"),
            "kv_q8": ("common.cuh", "dca.cuh", "kv_q8.cuh"),
            "dca_flash_attn_sm90": ("common.cuh", "mma.cuh", "dca.cuh", "flash.cuh", "mbarrier.cuh", "wgmma.cuh")}
# files built for one exact architecture (its "a" features, e.g. Hopper's wgmma): cubins cached by cubin.py
ARCH_FILES = {"dca_flash_attn_sm90": "sm_90a"}
DEFAULT_PRELUDE = ("common.cuh",)
NVRTC_OPTIONS = ("-std=c++17",)
ACTIVATION_DTYPES = ("f16", "bf16")
# files without activations (sampling reads fp32 logits): one build, named "f16"
DTYPE_FREE_FILES = ("sampling",)


def dtypes(name: str) -> tuple[str, ...]:
    """The builds of kernels/<name>.cu: both activation dtypes, or ("f16",) for a file without activations."""
    return ("f16",) if name in DTYPE_FREE_FILES else ACTIVATION_DTYPES


def nvrtc_options(name: str, dtype: str = "f16") -> tuple[str, ...]:
    """NVRTC options of one build of kernels/<name>.cu (bf16: -DACT_BF16)."""
    if dtype not in dtypes(name):
        raise DeviceError(f"kernels/{name}.cu has no {dtype!r} build (builds: {', '.join(dtypes(name))})")
    return NVRTC_OPTIONS + (("-DACT_BF16",) if dtype == "bf16" else ())


@functools.cache
def source(name: str, instance: str | None = None) -> str:
    """The full source NVRTC compiles for kernels/<name>.cu: its preludes, the file, and `instance` (a line
    that instantiates one configuration of a templated kernel through the file's macro, e.g.
    "DCA_DECODE(64, 32)"), so a build holds only the kernels that are launched."""
    if name not in KERNEL_FILES:
        raise DeviceError(f"unknown kernel file {name!r} (known: {', '.join(KERNEL_FILES)})")
    parts = [f"#line 1 \"{header}\"\n{(KERNEL_DIR / header).read_text()}"
             for header in PRELUDES.get(name, DEFAULT_PRELUDE)]
    parts.append(f"#line 1 \"{name}.cu\"\n{(KERNEL_DIR / f'{name}.cu').read_text()}")
    if instance is not None:
        parts.append(f"#line 1 \"{name}.cu instance\"\n{instance}\n")
    return "\n".join(parts)


def per_type(macro: str, suffix: str) -> str:
    """The instance line of a file whose kernels are instantiated per weight type: MACRO(q4_k, T_Q4_K)."""
    return f"{macro}({suffix}, T_{suffix.upper()})"


def function(name: str, kernel: str, dtype: str = "f16", instance: str | None = None):
    """One compiled kernel (extern "C" name) of the `dtype` build of kernels/<name>.cu (with `instance` appended:
    see ``source``), compiled for the current device on first use and cached per device (a module is loaded
    into one GPU's context: a split model's stages run on several, engine/pipeline.py)."""
    import cupy

    if dtype not in dtypes(name):
        nvrtc_options(name, dtype)  # the DeviceError naming the builds, before any GPU is asked
    return _function(name, kernel, dtype, instance, cupy.cuda.runtime.getDevice())


@functools.cache  # called with every argument given, so a defaulted call shares the cached build
def _module(name: str, dtype: str, instance: str | None, device: int):
    """The module of one build, loaded on `device` (the current one: CuPy loads it there)."""
    options = nvrtc_options(name, dtype)
    code = source(name, instance)
    if name in ARCH_FILES:
        from .cubin import load_cubin_module

        return load_cubin_module(code, f"{name}.cu", ARCH_FILES[name], options)
    import cupy

    return cupy.RawModule(code=code, options=options, name_expressions=None)


@functools.cache
def _function(name: str, kernel: str, dtype: str, instance: str | None, device: int):
    return _module(name, dtype, instance, device).get_function(kernel)


def compile_ptx(name: str, arch: str = "sm_90", dtype: str = "f16", instance: str | None = None) -> str:
    """Compile one build of kernels/<name>.cu (with `instance`) to PTX for `arch` (a file of ARCH_FILES: for its
    own architecture) through NVRTC alone (works without a GPU).

    Raises DeviceError with NVRTC's log when the source does not compile.
    """
    from .cubin import nvrtc_compile

    virtual_arch = ARCH_FILES.get(name, arch).replace("sm_", "compute_")
    return nvrtc_compile(source(name, instance), f"{name}.cu ({dtype})", virtual_arch, nvrtc_options(name, dtype),
                         "ptx")
