"""NVRTC compilation outside CuPy: PTX for any target (the CPU compile test), and cubins for one exact
architecture (sm_90a: Hopper's wgmma) cached on disk.

CuPy's RawModule compiles for the generic target of the current GPU (sm_90), which lacks the
architecture-specific instructions; those files are compiled here with NVRTC for the "a" target
instead, written to ``$ENGINE_CACHE_DIR`` (default ``~/.cache/engine/kernels``) under a hash of the
source, the options and the NVRTC version, and loaded as a RawModule from that file.

    nvrtc_compile(source, "x.cu", "compute_90", options, "ptx")   -> PTX text (no GPU or driver needed)
    load_cubin_module(source, "x.cu", "sm_90a", options)          -> cupy.RawModule
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ...errors import DeviceError


def cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "engine" / "kernels")


def nvrtc_compile(source: str, label: str, arch: str, options: tuple[str, ...], output: str):
    """source -> "ptx" (str) or "cubin" (bytes) for `arch` (compute_XX for PTX, sm_XX[a] for a cubin);
    DeviceError naming `label` with NVRTC's log when it does not compile."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DeviceError(f"cannot compile kernels: CuPy's NVRTC bindings are unavailable ({exc})") from exc
    prog = nvrtc.createProgram(source, label, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-ftz=true", *options])
        except nvrtc.NVRTCError as exc:
            raise DeviceError(f"kernels/{label} does not compile for {arch}: {exc}\n"
                              f"{nvrtc.getProgramLog(prog)}") from exc
        if output == "cubin":
            return nvrtc.getCUBIN(prog)
        ptx = nvrtc.getPTX(prog)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)


def load_cubin_module(source: str, filename: str, arch: str, options: tuple[str, ...]):
    """The RawModule of `source` compiled for `arch`, from the disk cache when it is there."""
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    key = hashlib.sha256("\0".join((source, arch, *options, repr(nvrtc.getVersion()))).encode()).hexdigest()[:24]
    path = cache_dir() / f"{Path(filename).stem}-{arch}-{key}.cubin"
    if not path.exists():
        cubin = nvrtc_compile(source, filename, arch, options, "cubin")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        tmp.replace(path)  # atomic: a concurrent process never loads half a file
    return cupy.RawModule(path=str(path))
