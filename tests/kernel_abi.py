"""Host launches against the kernels' parameter lists, on the CPU: a stand-in for a compiled kernel that keeps its
launch's arguments, each argument's kind, and the .param kinds NVRTC compiles for a kernel (tests/test_cuda_launch_abi.py,
tests/test_cuda_kv_q8.py)."""
from __future__ import annotations

import re

import numpy as np

from engine.backends.cuda import kernels


class Recorder:
    """Stands in for a compiled kernel: keeps the arguments of its launch."""

    shared_size_bytes = 0  # static shared memory (a CuPy kernel's attribute)

    def __init__(self, name):
        self.name, self.args = name, None

    def __call__(self, grid, block, args, shared_mem=0):
        self.grid, self.block, self.args, self.shared_mem = grid, block, args, shared_mem


def kind(arg) -> str:
    """A launch argument's PTX kind: float .f32, int .u32, 64-bit integer or pointer (a stand-in array) .u64."""
    if isinstance(arg, np.float32):
        return "f32"
    if isinstance(arg, np.int32):
        return "u32"
    if isinstance(arg, (np.int64, np.uint64)):
        return "u64"
    assert hasattr(arg, "shape") and not isinstance(arg, np.generic), f"argument {arg!r} of unknown kind"
    return "u64"  # a pointer


def params(file: str, kernel: str, dtype: str, instance: str | None = None) -> list[str]:
    """The .param kinds of `kernel` in the `dtype` build of kernels/<file>.cu (with `instance`)."""
    ptx = kernels.compile_ptx(file, "sm_90", dtype, instance=instance)
    entries = {m.group(1): re.findall(r"\.param\s+\.(\w+)", m.group(2))
               for m in re.finditer(r"\.entry\s+(\w+)\(([^)]*)\)", ptx)}
    return entries[kernel]
