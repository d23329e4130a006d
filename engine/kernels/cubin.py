"""Kernels for one exact architecture (sm_90a: Hopper's wgmma) compiled to a cubin and cached on disk.

CuPy's RawModule compiles for the generic target of the current GPU (sm_90), which lacks the
architecture-specific instructions; these files are compiled here with NVRTC for the "a" target
instead, written to ``$ENGINE_CACHE_DIR`` (default ``~/.cache/engine/kernels``) under a hash of the
source, the options and the NVRTC version, and loaded as a RawModule from that file.

    load_cubin_module(source, "x.cu", "sm_90a", options)  -> cupy.RawModule
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import DeviceError


def cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "engine" / "kernels")


def compile_cubin(source: str, filename: str, arch: str, options: tuple[str, ...]) -> bytes:
    """NVRTC source -> cubin for `arch` (e.g. "sm_90a"); DeviceError with NVRTC's log on failure."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "-ftz=true", *options])
        except nvrtc.NVRTCError as exc:
            raise DeviceError(f"kernels/{filename} does not compile for {arch}: {exc}\n"
                              f"{nvrtc.getProgramLog(prog)}") from exc
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


def load_cubin_module(source: str, filename: str, arch: str, options: tuple[str, ...]):
    """The RawModule of `source` compiled for `arch`, from the disk cache when it is there."""
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    key = hashlib.sha256("\0".join((source, arch, *options, repr(nvrtc.getVersion()))).encode()).hexdigest()[:24]
    path = cache_dir() / f"{Path(filename).stem}-{arch}-{key}.cubin"
    if not path.exists():
        cubin = compile_cubin(source, filename, arch, options)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        tmp.replace(path)  # atomic: a concurrent process never loads half a file
    return cupy.RawModule(path=str(path))
