"""Programmatic dependent launch and thread block clusters (Hopper): dev/cuda/NOTES.md v20, v22.

A kernel launched with CUDA's programmatic stream serialization attribute is scheduled once every block of the kernel
before it in the stream has exited (or, from a kernel whose grid leaves SMs free, released its dependents: common.cuh
pdl_wait), without waiting for that kernel to complete: the launch latency and the new
kernel's first weight loads overlap the previous kernel's tail. The kernels launched so (gemv.cu's, dca_decode.cu's
decode attention and combine) ask for their first weight rows, then execute common.cuh's pdl_wait (the previous
kernel complete, its writes visible) before touching anything an earlier kernel writes. Launched without the
attribute they run as before. On the H100 it shortened the decode step by 2-3% at 8B shapes, 6% at 1B and 10% at
SmolLM2-135M (v20), the early release from small grids SmolLM2's by 7.6% more (v21). ENABLED (on by default) turns it
off for measurement (tools/profile_decode.py --no-pdl). A cluster launch (v22) puts each `cluster` consecutive blocks
in one thread block cluster: gemv_add's prenorm epilogue hands a 32-row group between them with a cluster barrier.

    launch(fn, grid, block, args, shared_mem, cluster=1)
        fn(grid, block, args, shared_mem=...) as CuPy runs it, or, with ENABLED on compute capability >= 9.0 or with
        cluster > 1, through the driver's cuLaunchKernelEx with the attributes (dependent; blocks in clusters of
        `cluster` along x, which needs clusters_available()), on the current CuPy stream

CuPy's RawKernel call takes no launch attributes, so the dependent launch goes to libcuda through ctypes: the kernel's
CUfunction (fn.kernel.ptr), the grid, block, dynamic shared memory and stream in a CUlaunchConfig, its
CUlaunchAttributes, and each argument as CuPy passes it (``kernel_params``: a CuPy array its device pointer, a numpy
scalar its value in its own C type). Captured into the decode step's CUDA graph, the launch becomes a kernel node
whose edge from the node before it is programmatic.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from ...errors import DeviceError

ENABLED = True  # off: every launch plain (tools/profile_decode.py --no-pdl)

# cuda.h: CUlaunchAttributeID CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION and
# CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION; CUresult CUDA_SUCCESS
CLUSTER_DIMENSION = 4
PROGRAMMATIC_STREAM_SERIALIZATION = 6
CUDA_SUCCESS = 0


class ClusterDimension(ctypes.Structure):
    """cuda.h CUlaunchAttributeValue's clusterDim: blocks of a cluster along x, y, z."""
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


class LaunchAttributeValue(ctypes.Union):
    """cuda.h CUlaunchAttributeValue: a union padded to 64 bytes (8-aligned: some members hold pointers)."""
    _fields_ = [("pad", ctypes.c_uint64 * 8), ("programmatic_stream_serialization_allowed", ctypes.c_int),
                ("cluster_dim", ClusterDimension)]


class LaunchAttribute(ctypes.Structure):
    """cuda.h CUlaunchAttribute (72 bytes): the attribute's id (a 4-byte enum), padding to 8, its value."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", LaunchAttributeValue)]


class LaunchConfig(ctypes.Structure):
    """cuda.h CUlaunchConfig (56 bytes)."""
    _fields_ = [("grid_dim_x", ctypes.c_uint), ("grid_dim_y", ctypes.c_uint), ("grid_dim_z", ctypes.c_uint),
                ("block_dim_x", ctypes.c_uint), ("block_dim_y", ctypes.c_uint), ("block_dim_z", ctypes.c_uint),
                ("shared_mem_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


# the numpy scalar types the engine's launches pass, as the C types their kernel parameters have
SCALAR_TYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
                np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
                np.dtype(np.float32): ctypes.c_float}


def kernel_params(args: tuple) -> list:
    """Each launch argument as the C value the kernel receives: a CuPy array -> its device pointer (void *), a numpy
    scalar of SCALAR_TYPES -> that C type; anything else is refused (a Python int or float has no fixed width)."""
    import cupy

    values = []
    for i, arg in enumerate(args):
        if isinstance(arg, cupy.ndarray):
            values.append(ctypes.c_void_p(arg.data.ptr))
        elif isinstance(arg, np.generic) and arg.dtype in SCALAR_TYPES:
            values.append(SCALAR_TYPES[arg.dtype](arg.item()))
        else:
            raise DeviceError(f"a dependent launch takes CuPy arrays and numpy scalars of "
                              f"{', '.join(map(str, SCALAR_TYPES))}; argument {i} is a {type(arg).__name__} "
                              f"{getattr(arg, 'dtype', '')}".rstrip())
    return values


@functools.cache
def _driver():
    """libcuda's cuLaunchKernelEx (CUDA 12.0 or later) and cuGetErrorName, typed."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        launch_ex, error_name = lib.cuLaunchKernelEx, lib.cuGetErrorName
    except (OSError, AttributeError) as e:
        raise DeviceError(f"a dependent launch needs libcuda.so.1 with cuLaunchKernelEx (CUDA 12 or later): {e}") from e
    launch_ex.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                          ctypes.POINTER(ctypes.c_void_p)]
    launch_ex.restype = ctypes.c_int
    error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    error_name.restype = ctypes.c_int
    return lib


def _error_name(driver, result: int) -> str:
    name = ctypes.c_char_p()
    if driver.cuGetErrorName(result, ctypes.byref(name)) != CUDA_SUCCESS or not name.value:
        return f"CUresult {result}"
    return name.value.decode()


def _dims(dims) -> tuple[int, int, int]:
    """A CuPy grid or block (an int, or a tuple of 1-3) as (x, y, z)."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


def _current_stream() -> int:
    import cupy

    return cupy.cuda.get_current_stream().ptr


def _device_capability() -> int:
    """The current device's compute capability as major * 10 + minor (90 for Hopper)."""
    import cupy

    return _capability_of(cupy.cuda.runtime.getDevice())


@functools.cache
def _capability_of(device: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device).compute_capability)


def active() -> bool:
    """Whether launch() launches dependent: ENABLED, on a device of compute capability >= 9.0 (griddepcontrol), with a
    driver that has cuLaunchKernelEx (else every launch is plain)."""
    return ENABLED and _device_capability() >= 90 and _driver_launches_ex()


@functools.cache
def _driver_launches_ex() -> bool:
    try:
        _driver()
    except DeviceError:
        return False
    return True


def clusters_available() -> bool:
    """Whether launch() can put blocks in clusters: compute capability >= 9.0 and a driver with cuLaunchKernelEx."""
    return _device_capability() >= 90 and _driver_launches_ex()


def launch_ex(fn, grid, block, args: tuple, shared_mem: int = 0, dependent: bool = True, cluster: int = 1) -> None:
    """fn (a cupy.RawKernel) launched through cuLaunchKernelEx on the current stream, with the grid, block, arguments
    and dynamic shared memory of fn(grid, block, args, shared_mem=shared_mem), and the attributes: dependent,
    programmatic stream serialization (fn's kernel waits: common.cuh pdl_wait); cluster > 1, blocks in clusters of
    `cluster` along x (the grid's x a multiple of it)."""
    values = kernel_params(args)
    params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
    attributes = []
    if dependent:
        attributes.append(LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION))
        attributes[-1].value.programmatic_stream_serialization_allowed = 1
    if cluster > 1:
        attributes.append(LaunchAttribute(id=CLUSTER_DIMENSION))
        attributes[-1].value.cluster_dim = ClusterDimension(cluster, 1, 1)
    array = (LaunchAttribute * max(1, len(attributes)))(*attributes)
    config = LaunchConfig(*_dims(grid), *_dims(block), int(shared_mem), _current_stream(), array, len(attributes))
    driver = _driver()
    result = driver.cuLaunchKernelEx(ctypes.byref(config), fn.kernel.ptr, params, None)
    if result != CUDA_SUCCESS:
        kind = ", ".join(["dependent"] * dependent + [f"clusters of {cluster}"] * (cluster > 1)) or "plain"
        raise DeviceError(f"cuLaunchKernelEx of {fn.name} ({kind}) failed: {_error_name(driver, result)}")


def launch(fn, grid, block, args: tuple, shared_mem: int = 0, cluster: int = 1) -> None:
    """fn(grid, block, args, shared_mem=shared_mem): dependent while active(), its blocks in clusters of `cluster`
    (> 1 needs clusters_available()); through launch_ex where either applies, else CuPy's plain launch."""
    dependent = active()
    if dependent or cluster > 1:
        launch_ex(fn, grid, block, args, shared_mem, dependent=dependent, cluster=cluster)
    else:
        fn(grid, block, args, shared_mem=shared_mem)
