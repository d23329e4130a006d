"""Kernel launches that may overlap the kernel before them: programmatic dependent launch (Hopper and later).

    launch(fn, grid, block, args, shared_mem, dependent=True)

A decode step is ~6 short kernels a layer, each a few microseconds to tens: between two of them the GPU drains the
first grid, then ramps the second up, and only then does the second ask HBM for its first weight rows. A kernel
launched *dependent* (CUDA's programmatic stream serialization attribute, through the driver's cuLaunchKernelEx:
CuPy's RawKernel call has no launch attributes) may be scheduled while the kernel before it still runs; it asks for
its first weight rows, then waits in `wait_for_prior_grid()` (kernels/common.cuh: griddepcontrol.wait) until that
kernel has completed and its writes are visible, and only then reads its input or writes anything. So only kernels
that call it on every path may be launched dependent (DEPENDENT_KERNELS names them; tests/test_kernels_compile.py
checks their PTX); the rest launch as CuPy does.

Dependent launches are used while a CUDA graph is captured (the decode step, graph.py: the graph keeps them as
programmatic edges), on GPUs of compute capability 9.0 and above; an eager launch goes through CuPy (no ctypes
marshalling on the host per call). ENGINE_CUDA_PDL=0 turns them off.
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

from ...errors import DeviceError

# kernel name prefixes whose every path calls wait_for_prior_grid() before touching data other kernels write
DEPENDENT_KERNELS = ("gemv_", "gemv_add_", "qkv_", "gateup_", "head_", "dca_decode_", "dca_combine")
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_SCALARS = {np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64,
            np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float}


def _argument(value):
    """The ctypes value of one kernel argument: a device array's address, or a numpy scalar of the parameter's
    type (the launches pass np.int32, np.float32, ... as CuPy's RawKernel call needs them too)."""
    data = getattr(value, "data", None)
    if hasattr(data, "ptr"):  # a cupy.ndarray
        return ctypes.c_void_p(data.ptr)
    kind = _SCALARS.get(type(value))
    if kind is None:
        raise DeviceError(f"dependent launch: an argument of type {type(value).__name__} (give a device array or a "
                          f"numpy scalar)")
    return kind(value.item())


@functools.cache
def _driver_launch():
    """cuLaunchKernelEx of the driver library, or None where the driver has none."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return fn


@functools.cache
def _device_supports(device: int) -> bool:
    import cupy as cp

    return int(cp.cuda.Device(device).compute_capability) >= 90


def enabled() -> bool:
    return os.environ.get("ENGINE_CUDA_PDL", "0") != "0"


def _padded(dims) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in dims)
    return dims + (1,) * (3 - len(dims))


def launch(fn, grid, block, args, shared_mem: int = 0, dependent: bool = False) -> None:
    """Launch the cupy.RawKernel fn on the current stream; dependent (fn must be one of DEPENDENT_KERNELS): with the
    programmatic-serialization attribute while a graph is being captured on a GPU that has it."""
    if dependent and not fn.name.startswith(DEPENDENT_KERNELS):
        raise DeviceError(f"{fn.name} does not wait for the kernel before it: it cannot be launched dependent")
    driver = _driver_launch() if dependent and enabled() else None
    if driver is None:
        fn(grid, block, args, shared_mem=shared_mem)
        return
    import cupy as cp

    stream = cp.cuda.get_current_stream()
    if not stream.is_capturing() or not _device_supports(cp.cuda.runtime.getDevice()):
        fn(grid, block, args, shared_mem=shared_mem)
        return
    values = [_argument(a) for a in args]
    params = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1  # programmaticStreamSerializationAllowed
    (gx, gy, gz), (bx, by, bz) = _padded(grid), _padded(block)
    config = _LaunchConfig(gx, gy, gz, bx, by, bz, int(shared_mem), ctypes.c_void_p(stream.ptr),
                           ctypes.pointer(attribute), 1)
    status = driver(ctypes.byref(config), ctypes.c_void_p(fn.kernel.ptr), params, None)
    if status != 0:
        raise DeviceError(f"{fn.name}: cuLaunchKernelEx failed with CUresult {status}")
