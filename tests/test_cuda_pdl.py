"""Programmatic dependent launch (engine/backends/cuda/pdl.py; dev/cuda/NOTES.md v20).

On the CPU: pdl.py's ctypes structures are cuda.h's (sizes, offsets, the attribute's id; compiled against a local
cuda.h where one is found, and the values CUDA 13.0's declares); every argument kind the engine's launches pass
reaches the driver as the bytes CuPy would pass; with pdl.ENABLED (a stand-in driver) every launch helper of gemv.py
and flash_attention.py's decode attention and combine launch dependent with the plain launch's grid, block, shared
memory and arguments, while the prefill kernels (which do not wait) stay plain; and in the PTX of every kernel
launched so, no path from its entry reaches a global load or store, an atomic or a cp.async before
griddepcontrol.wait. On the GPU (marker cuda): a chain of a decode layer's launches and the whole decode step (graph
replay) give the same bits with the switch as without.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.backends.cuda import flash_attention as fa
from engine.backends.cuda import gemv, kernels, kv_q8, pdl
from engine.errors import DeviceError
from engine.weights.quant import GGMLType

cupy = pytest.importorskip("cupy")
pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) is not installed")
from nvrtc_check import requires_nvrtc  # noqa: E402
from kernel_abi import Recorder, kind, params  # noqa: E402
import test_cuda_launch_abi as abi  # noqa: E402  (its table of gemv.py launches)


# ---- the driver's structures ------------------------------------------------------------------------------------

# CUDA 13.0's cuda.h: sizeof / offsetof of CUlaunchAttribute and CUlaunchConfig, the attribute's id
CUDA_H = {"attribute": (72, 8, 8), "config": (56, 24, 32, 40, 48), "ids": (6, 4, 0), "cluster_dim": (12, 4, 8)}
LAYOUT_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <cuda.h>
int main(void) {
    printf("%zu %zu %zu\n", sizeof(CUlaunchAttribute), offsetof(CUlaunchAttribute, value), _Alignof(CUlaunchAttribute));
    printf("%zu %zu %zu %zu %zu\n", sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, sharedMemBytes),
           offsetof(CUlaunchConfig, hStream), offsetof(CUlaunchConfig, attrs), offsetof(CUlaunchConfig, numAttrs));
    printf("%d %d %d\n", (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
           (int)CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, (int)CUDA_SUCCESS);
    CUlaunchAttributeValue v;
    printf("%zu %zu %zu\n", sizeof(v.clusterDim), (size_t)((char*)&v.clusterDim.y - (char*)&v.clusterDim),
           (size_t)((char*)&v.clusterDim.z - (char*)&v.clusterDim));
    return 0;
}
"""


def ctypes_layout() -> dict:
    a, c = pdl.LaunchAttribute, pdl.LaunchConfig
    return {"attribute": (ctypes.sizeof(a), a.value.offset, ctypes.alignment(a)),
            "config": (ctypes.sizeof(c), c.shared_mem_bytes.offset, c.stream.offset, c.attrs.offset,
                       c.num_attrs.offset),
            "ids": (pdl.PROGRAMMATIC_STREAM_SERIALIZATION, pdl.CLUSTER_DIMENSION, pdl.CUDA_SUCCESS),
            "cluster_dim": (ctypes.sizeof(pdl.ClusterDimension), pdl.ClusterDimension.y.offset,
                            pdl.ClusterDimension.z.offset)}


def local_cuda_include() -> Path | None:
    """The include folder of a local CUDA toolkit (CUDA_HOME, CUDA_PATH, nvcc's, /usr/local/cuda), or None."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parents[1]) if nvcc else None]
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda.h").is_file():
            return Path(root) / "include"
    return None


def test_the_structures_are_cuda_h_s():
    assert ctypes_layout() == CUDA_H


def test_the_structures_match_a_local_cuda_h(tmp_path):
    include, cc = local_cuda_include(), shutil.which("cc")
    if include is None or cc is None:
        pytest.skip("no local cuda.h or C compiler")
    (tmp_path / "layout.c").write_text(LAYOUT_PROGRAM)
    subprocess.run([cc, "-std=c11", f"-I{include}", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")],
                   check=True)
    lines = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout.split("\n")
    compiled = {key: tuple(int(v) for v in line.split())
                for key, line in zip(("attribute", "config", "ids", "cluster_dim"), lines)}
    assert compiled == ctypes_layout()


# ---- arguments --------------------------------------------------------------------------------------------------

_addresses = itertools.count(0x7F00_0000_0000, 0x10_0000)  # a distinct made-up device address per stand-in
RUN_ADDRESSES = 0x7E00_0000_0000  # where a run's stand-ins start (plain_then_dependent): both runs get the same


def device(shape=(1,), dtype=np.float16):
    """A real cupy.ndarray over made-up device memory (no GPU needed: nothing reads it)."""
    memory = cupy.cuda.UnownedMemory(next(_addresses), 1 << 20, None, device_id=0)
    return cupy.ndarray(shape, dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


def cupy_bytes(arg) -> bytes:
    """The bytes CuPy's RawKernel call passes for an argument: an array's device pointer, a numpy scalar's value."""
    return arg.data.ptr.to_bytes(8, "little") if isinstance(arg, cupy.ndarray) else arg.tobytes()


@pytest.mark.parametrize("arg", [device(), device((4, 6), np.uint8)[1:], np.int32(-7), np.uint32(2 ** 32 - 1),
                                 np.int64(-(2 ** 40)), np.uint64(0), np.uint64(2 ** 64 - 2), np.float32(-0.1)],
                         ids=["array", "view", "int32", "uint32", "int64", "null", "uint64", "float32"])
def test_each_argument_kind_is_passed_as_cupy_passes_it(arg):
    (value,) = pdl.kernel_params((arg,))
    assert ctypes.sizeof(value) == (8 if isinstance(arg, cupy.ndarray) else arg.itemsize)
    assert ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value)) == cupy_bytes(arg)


@pytest.mark.parametrize("arg", [7, 0.5, None, np.float64(1), np.int16(3), np.zeros(3, np.float32),
                                 abi.DeviceArray()], ids=["int", "float", "None", "float64", "int16", "numpy", "other"])
def test_other_arguments_are_refused(arg):
    with pytest.raises(DeviceError, match="argument 1 is a"):
        pdl.kernel_params((device(), arg))


# ---- the launches routed --------------------------------------------------------------------------------------

@functools.cache
def param_kinds(file: str, kernel: str, dtype: str, instance: str | None) -> tuple[str, ...]:
    return tuple(params(file, kernel, dtype, instance))


class Kernel(Recorder):
    """A compiled kernel's stand-in: records a plain launch; has a CUfunction handle and its .param kinds (PTX)."""
    handles = itertools.count(0x5000)

    def __init__(self, file, kernel, dtype, instance):
        super().__init__(kernel)
        self.kernel = SimpleNamespace(ptr=next(self.handles))
        self.kinds = param_kinds(file, kernel, dtype, instance)


class Driver:
    """Stands in for libcuda: records each cuLaunchKernelEx, its arguments read as the kernel's parameters."""

    def __init__(self, made: list[Kernel]):
        self.made, self.launches = made, []

    def cuLaunchKernelEx(self, config, function, kernel_params, extra):
        c, kernel = config._obj, {k.kernel.ptr: k for k in self.made}[function]
        sizes = [8 if kind == "u64" else 4 for kind in kernel.kinds]
        self.launches.append(SimpleNamespace(
            kernel=kernel, grid=(c.grid_dim_x, c.grid_dim_y, c.grid_dim_z),
            block=(c.block_dim_x, c.block_dim_y, c.block_dim_z), shared_mem=c.shared_mem_bytes, stream=c.stream,
            attributes=[attribute(c.attrs[i]) for i in range(c.num_attrs)], extra=extra,
            args=[ctypes.string_at(kernel_params[i], size) for i, size in enumerate(sizes)]))
        return pdl.CUDA_SUCCESS


def attribute(a) -> tuple:
    """A CUlaunchAttribute as (id, its value): the flag of programmatic stream serialization, a cluster's (x, y, z)."""
    if a.id == pdl.CLUSTER_DIMENSION:
        return a.id, (a.value.cluster_dim.x, a.value.cluster_dim.y, a.value.cluster_dim.z)
    return a.id, a.value.programmatic_stream_serialization_allowed


STREAM = 0xC0FFEE


@pytest.fixture
def launches(monkeypatch):
    """gemv.py's and flash_attention.py's kernels replaced by Kernels, the driver by a Driver (an H100's limits and
    compute capability, a made-up current stream): (the Kernels made, the driver)."""
    made = []

    def fake_function(file, kernel, dtype="f16", instance=None):
        made.append(Kernel(file, kernel, dtype, instance))
        return made[-1]

    for module in (gemv, fa, kv_q8):
        monkeypatch.setattr(module, "function", fake_function)
    monkeypatch.setattr(gemv, "_device_limits", lambda: (132, 227 * 1024))
    monkeypatch.setattr(gemv, "_compute_capability", lambda: 90)
    monkeypatch.setattr(pdl, "_device_capability", lambda: 90)
    monkeypatch.setattr(pdl, "_current_stream", lambda: STREAM)
    monkeypatch.setattr(gemv, "CLUSTER_HANDOFF", False)  # plain launches to compare with (clusters: below)
    driver = Driver(made)
    monkeypatch.setattr(pdl, "_driver", lambda: driver)
    monkeypatch.setattr(pdl, "_driver_launches_ex", lambda: True)
    monkeypatch.setattr(abi, "DeviceArray", device)  # the launch table's stand-ins: real CuPy arrays
    monkeypatch.setattr(abi, "PRENORMED", gemv.Prenormed(device(), device(), 16))
    return made, driver


def plain_then_dependent(monkeypatch, launches, run) -> tuple[list, list]:
    """run() with pdl off (the Kernels' recorded launches), then with it on (the driver's), the stand-ins it makes at
    the same addresses both times."""
    made, driver = launches
    for enabled in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        monkeypatch.setattr(sys.modules[__name__], "_addresses", itertools.count(RUN_ADDRESSES, 0x10_0000))
        run()
        if not enabled:
            plain = [k for k in made if k.args is not None]
            assert len(plain) == len(made) and not driver.launches
    assert all(k.args is None for k in made[len(plain):]), "a plain launch while pdl.ENABLED"
    return plain, driver.launches


def assert_same_launches(plain, dependent):
    assert [k.name for k in plain] == [d.kernel.name for d in dependent]
    for k, d in zip(plain, dependent):
        dims = lambda t: tuple(t) + (1,) * (3 - len(t))  # noqa: E731
        assert (d.grid, d.block, d.shared_mem) == (dims(k.grid), dims(k.block), k.shared_mem), k.name
        assert d.stream == STREAM and d.extra is None, k.name
        assert d.attributes == [(pdl.PROGRAMMATIC_STREAM_SERIALIZATION, 1)], k.name
        assert len(k.args) == len(d.kernel.kinds), k.name
        assert d.args == [cupy_bytes(a) for a in k.args], k.name


def test_the_switch_is_on_by_default():
    assert pdl.ENABLED is True


@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("launch", sorted(abi.LAUNCHES))
@requires_nvrtc
def test_gemv_launches_go_dependent_with_the_plain_launch(monkeypatch, launches, launch, ggml_type):
    if ("+ring" in launch or launch.endswith("+prenormed")) and ggml_type not in gemv.INT8_TYPES:
        pytest.skip("refused for float weights (tests/test_cuda_launch_abi.py)")
    m = abi._matrix(256, 2048, ggml_type)
    plain, dependent = plain_then_dependent(monkeypatch, launches, lambda: abi.LAUNCHES[launch](m, "bf16"))
    assert len(plain) == 1
    assert_same_launches(plain, dependent)


# ---- the prenorm hand-off in thread block clusters (NOTES.md v22) ---------------------------------------------

@pytest.mark.parametrize("rows,cols,per_block,cluster", [
    (4096, 4096, None, 2), (4096, 14336, None, 2), (2048, 8192, None, 1), (8192, 28672, None, 1),
    (576, 1536, None, 4), (4096, 4096, 8, 1), (4096, 4096, 24, 1), (4096, 4096, 32, 1), (4096, 4096, 40, 1),
    (2080, 4096, 16, 2)],
    ids=["8b-o", "8b-down", "1b-down", "70b-down", "smollm2-down", "8-rows", "24-rows", "32-rows", "40-rows",
         "65-groups"])
@pytest.mark.parametrize("dependent", [False, True], ids=["plain", "pdl"])
@requires_nvrtc
def test_prenorm_groups_across_blocks_launch_as_clusters(monkeypatch, launches, rows, cols, per_block, cluster,
                                                         dependent):
    """A prenorm gemv_add whose 32-row groups span 2 whole blocks (per_block 16), or 4 (per_block 8) in a grid of
    no more blocks than SMs (SmolLM2's 576 rows: 72), launches them as one cluster each (the cluster attribute,
    beside the dependent one with pdl on), with the plain launch's grid, block, shared memory and arguments; others
    (per_block 24, 32, 40; 8 in 1B's grid of 256) keep the atomic hand-off, launched as before."""
    m = abi._matrix(rows, cols, GGMLType.Q4_K)
    prenorm = gemv.Prenorm(device(), device(), device(), device())

    def run():
        gemv.gemv_add(device(), m, device(), "bf16", per_block=per_block, prenorm=prenorm)

    plain, _ = plain_then_dependent(monkeypatch, launches, run)
    made, driver = launches
    driver.launches.clear()
    monkeypatch.setattr(gemv, "CLUSTER_HANDOFF", True)
    monkeypatch.setattr(pdl, "ENABLED", dependent)
    monkeypatch.setattr(sys.modules[__name__], "_addresses", itertools.count(RUN_ADDRESSES, 0x10_0000))
    run()
    expected = [(pdl.PROGRAMMATIC_STREAM_SERIALIZATION, 1)] * dependent
    expected += [(pdl.CLUSTER_DIMENSION, (cluster, 1, 1))] * (cluster > 1)
    if not expected:
        assert made[-1].args is not None and not driver.launches
        return
    (launch,) = driver.launches
    assert launch.attributes == expected
    if cluster > 1:  # each cluster one 32-row group
        assert launch.grid[0] % cluster == 0 and launch.grid[0] // cluster == rows // 32
    (k,) = plain
    assert (launch.grid, launch.block, launch.shared_mem) == ((k.grid[0], 1, 1), (k.block[0], 1, 1), k.shared_mem)
    assert launch.args == [cupy_bytes(a) for a in k.args]


@pytest.mark.parametrize("capability", [80, 89])
def test_below_hopper_no_clusters(monkeypatch, capability):
    monkeypatch.setattr(pdl, "_device_capability", lambda: capability)
    monkeypatch.setattr(pdl, "_driver_launches_ex", lambda: True)
    monkeypatch.setattr(gemv, "_device_limits", lambda: (132, 227 * 1024))
    assert gemv.prenorm_cluster(16, 256) == 1 and gemv.prenorm_cluster(8, 72) == 1
    monkeypatch.setattr(pdl, "_device_capability", lambda: 90)
    assert gemv.prenorm_cluster(16, 256) == 2 and gemv.prenorm_cluster(8, 72) == 4
    assert gemv.prenorm_cluster(8, 256) == 1  # clusters of 4 only in a grid that leaves SMs free
    monkeypatch.setattr(gemv, "CLUSTER_HANDOFF", False)
    assert gemv.prenorm_cluster(16, 256) == 1


def decode_inputs(k_q8: bool, v_q8: bool, n_splits: int = 4):
    """flash_decode's arguments as CuPy array stand-ins: 8 query heads, 2 KV heads of 128, a 512-row cache."""
    caches = [kv_q8.DeviceQ8Rows(device((512, 2, 128), np.int8), device((512, 2, 4))) if q8
              else device((512, 2, 128)) for q8 in (k_q8, v_q8)]
    workspace = (device((n_splits, 8, 128), np.float32), device((n_splits, 8), np.float32),
                 device((n_splits, 8), np.float32))
    return (device((1, 8, 128)), *caches, device((1,), np.int32), device((600, 64), np.float32),
            device((600, 64), np.float32)), workspace


@pytest.mark.parametrize("staged", [False, True], ids=["plain", "staged"])
@pytest.mark.parametrize("k_q8,v_q8", fa.DECODE_CACHE_KINDS)
@requires_nvrtc
def test_decode_attention_and_combine_go_dependent(monkeypatch, launches, k_q8, v_q8, staged):
    monkeypatch.setattr(cupy, "empty", lambda shape, dtype=None: device(shape, dtype or np.float32))
    args, workspace = decode_inputs(k_q8, v_q8)
    out_staged = device((gemv.staged_bytes(8 * 128),), np.uint8) if staged else None
    plain, dependent = plain_then_dependent(monkeypatch, launches, lambda: fa.flash_decode(
        *args, rope_dim=128, n_splits=4, workspace=workspace, out_staged=out_staged))
    assert [k.name for k in plain] == [fa.decode_build(128, k_q8, v_q8)[1], "dca_combine"]
    assert_same_launches(plain, dependent)


@pytest.mark.parametrize("k_q8,v_q8", [(True, True), (True, False), (False, True)])
@requires_nvrtc
def test_the_q8_0_row_store_goes_dependent(monkeypatch, launches, k_q8, v_q8):
    """store_kv_q8 sits between the fused step's qkv and the decode attention: launched dependent (it waits first)."""
    caches = [kv_q8.DeviceQ8Rows(device((512, 2, 128), np.int8), device((512, 2, 4))) if q8
              else device((512, 2, 128)) for q8 in (k_q8, v_q8)]
    rows = device((1, 2, 128))
    plain, dependent = plain_then_dependent(monkeypatch, launches, lambda: kv_q8.store(
        rows, 256, rows, 256, device((1,), np.int32), device((600, 64), np.float32), device((600, 64), np.float32),
        *caches, 128, 0, "bf16"))
    assert [k.name for k in plain] == ["store_kv_q8"]
    assert_same_launches(plain, dependent)


@requires_nvrtc
def test_the_prefill_kernels_stay_plain(monkeypatch, launches):
    """The prefill kernels execute no griddepcontrol.wait: launched dependent they could read what the kernel before
    them still writes, so they launch plainly with the switch on; a split prefill's combine (which waits) does not."""
    made, driver = launches
    monkeypatch.setattr(cupy, "empty", lambda shape, dtype=None: device(shape, dtype or np.float32))
    monkeypatch.setattr(fa, "wgmma_available", lambda cp: False)
    monkeypatch.setattr(pdl, "ENABLED", True)
    q, k, v = device((64, 8, 128)), device((512, 2, 128)), device((512, 2, 128))
    fa.flash_attention(q, k, v, device((64,), np.int32), device((600, 64), np.float32),
                       device((600, 64), np.float32), rope_dim=128, n_splits=2)
    assert [k_.name for k_ in made] == [fa.prefill_build(128, fa.PREFILL_TILES[128])[1], "dca_combine"]
    assert made[0].args is not None and made[1].args is None
    assert [d.kernel.name for d in driver.launches] == ["dca_combine"]


@pytest.mark.parametrize("dtype", [np.float16, np.uint16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kernel", ["mma", "wgmma"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "qkv-view"])
@requires_nvrtc
def test_prefill_launch_matches_the_kernel_and_reads_a_fused_product_in_place(monkeypatch, launches, dtype, kernel,
                                                                              strided):
    """Both prefill kernels' arguments against their .param lists; q, a view of the fused q+k+v product as the model
    passes it (8 query heads, 2 KV heads of 128), is handed to the kernel as it is, with its row stride."""
    made, _ = launches
    monkeypatch.setattr(cupy, "empty", lambda shape, dtype=None: device(shape, dtype or np.float32))
    monkeypatch.setattr(fa, "wgmma_available", lambda cp: True)
    width = (8 + 2 * 2) * 128
    q = device((64, width), dtype)[:, :8 * 128].reshape(64, 8, 128) if strided else device((64, 8, 128), dtype)
    fa.flash_attention(q, device((512, 2, 128), dtype), device((512, 2, 128), dtype), device((64,), np.int32),
                       device((600, 64), np.float32), device((600, 64), np.float32), rope_dim=128, kernel=kernel)
    (launch,) = made
    assert launch.name == (fa.wgmma_build(128, fa.WGMMA_TILES[128]) if kernel == "wgmma"
                           else fa.prefill_build(128, fa.PREFILL_TILES[128]))[1]
    assert tuple(kind(a) for a in launch.args) == launch.kinds
    assert launch.args[0] is q and launch.args[-1] == (width if strided else 8 * 128)  # q_stride, the last


@pytest.mark.parametrize("capability", [80, 89])
def test_below_hopper_the_switch_launches_plainly(monkeypatch, launches, capability):
    made, driver = launches
    monkeypatch.setattr(pdl, "_device_capability", lambda: capability)
    monkeypatch.setattr(pdl, "ENABLED", True)
    kernel = Recorder("k")
    pdl.launch(kernel, (3,), (256,), (device(), np.int32(1)), 512)
    assert (kernel.grid, kernel.block, kernel.shared_mem) == ((3,), (256,), 512) and not driver.launches


DRIVER_LAUNCHES_EX = pdl._driver_launches_ex.__wrapped__  # uncached (the launches fixture stands in for it)


def test_a_driver_without_launch_ex_launches_plainly(monkeypatch, launches):
    made, driver = launches

    def no_launch_ex():
        raise DeviceError("a dependent launch needs libcuda.so.1 with cuLaunchKernelEx")

    monkeypatch.setattr(pdl, "_driver", no_launch_ex)
    assert DRIVER_LAUNCHES_EX() is False
    monkeypatch.setattr(pdl, "_driver_launches_ex", DRIVER_LAUNCHES_EX)
    monkeypatch.setattr(pdl, "ENABLED", True)
    kernel = Recorder("k")
    pdl.launch(kernel, (3,), (256,), (device(), np.int32(1)), 512)
    assert (kernel.grid, kernel.block, kernel.shared_mem) == ((3,), (256,), 512) and not driver.launches


def test_a_driver_error_is_a_device_error_naming_it(monkeypatch):
    class Failing:
        def cuLaunchKernelEx(self, *args):
            return 1

        def cuGetErrorName(self, result, name):
            name._obj.value = b"CUDA_ERROR_INVALID_VALUE"
            return pdl.CUDA_SUCCESS

    monkeypatch.setattr(pdl, "_driver", lambda: Failing())
    monkeypatch.setattr(pdl, "_current_stream", lambda: 0)
    kernel = SimpleNamespace(name="gemv_q4_k", kernel=SimpleNamespace(ptr=1))
    with pytest.raises(DeviceError, match="gemv_q4_k .*CUDA_ERROR_INVALID_VALUE"):
        pdl.launch_ex(kernel, (1,), (32,), (np.int32(0),))


# ---- the kernels wait before touching what earlier kernels write ------------------------------------------------

# what a kernel launched dependent may do before griddepcontrol.wait: read its parameters, use shared memory and
# mbarriers, ask L2 for (prefetch.global) or bulk-copy (cp.async.bulk: head_ring's weight stages) weight rows
ALLOWED_BEFORE_WAIT = re.compile(r"(ld|st)\.(param|shared)|prefetch\.global|mbarrier\.|fence\.mbarrier_init"
                                 r"|cp\.async\.bulk\.shared::cluster\.global|bar\.")
MEMORY = re.compile(r"(ld|st|atom|red|cp\.async|prefetch|mbarrier|fence)\b")


def entries(ptx: str) -> dict[str, list[str]]:
    """Each .entry's body as a list of statements and labels ("$L__BB0_3:"), in PTX order."""
    out = {}
    for match in re.finditer(r"\.entry\s+(\w+)\(", ptx):
        start = ptx.index("{", ptx.index(")", match.end()))
        depth, end = 0, start
        for end in range(start, len(ptx)):
            depth += {"{": 1, "}": -1}.get(ptx[end], 0)
            if depth == 0:
                break
        items = []
        for line in ptx[start + 1:end].splitlines():
            line = line.split("//")[0].strip()
            if re.fullmatch(r"[$\w]+:", line):
                items.append(line)
            else:
                items += [s.strip().strip("{}").strip() for s in line.split(";") if s.strip().strip("{}").strip()]
        out[match.group(1)] = items
    return out


def before_wait(items: list[str]) -> list[str]:
    """The memory instructions some path from the entry reaches before a griddepcontrol.wait (following branches)."""
    labels = {item[:-1]: i for i, item in enumerate(items) if item.endswith(":")}
    seen, todo, found = set(), [0], []
    while todo:
        i = todo.pop()
        while i < len(items) and i not in seen:
            seen.add(i)
            item = items[i]
            guarded = re.match(r"@!?%p\w+\s+", item)
            op = item[guarded.end():] if guarded else item
            if op.startswith("griddepcontrol.wait"):
                break
            if (branch := re.match(r"bra(\.uni)?\s+([$\w]+)", op)):
                todo.append(labels[branch.group(2)])
                if not guarded:
                    break
            elif re.match(r"(ret|exit|trap)\b", op) and not guarded:
                break
            elif MEMORY.match(op):
                found.append(op.split()[0])
            i += 1
    return found


def dependent_builds():
    """(file, dtype, instance, kernels) of every build whose kernels pdl.py may launch: gemv.cu per weight type, the
    decode attention builds and the combine, the q8_0 row store."""
    types = ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "f16", "bf16", "f32"]
    out = [("gemv", kernels.per_type(gemv.INSTANCE_MACRO, t), None) for t in types]
    return out + [(file, instance, (kernel, "dca_combine")) for file, kernel, instance in fa.launched_builds()
                  if file == "dca_decode"] + [("kv_q8", None, ("store_kv_q8",))]


@requires_nvrtc
@pytest.mark.parametrize("file,instance,names", dependent_builds(), ids=lambda v: str(v))
def test_no_path_touches_global_memory_before_the_wait(file, instance, names):
    bodies = entries(kernels.compile_ptx(file, "sm_90", "bf16", instance=instance))
    assert bodies and (names is None or set(names) <= set(bodies))
    for name, items in bodies.items():
        if names is not None and name not in names:
            continue
        ops = before_wait(items)
        early = sorted({op for op in ops if not ALLOWED_BEFORE_WAIT.match(op)})
        assert not early, f"{name}: {early} before griddepcontrol.wait"
        # a kernel without the wait has an empty body (head_ring of a float weight type: never launched)
        waits = any(item.startswith("griddepcontrol.wait") for item in items)
        assert waits or all(op.startswith("ld.param") for op in ops), f"{name} never waits"


def test_the_path_walk_finds_an_early_access():
    """before_wait follows branches: a load on a branch taken before the wait is found, one after it is not."""
    items = ["ld.param.u64 %rd1, [p]", "@%p1 bra $L1", "griddepcontrol.wait", "ld.global.f32 %f1, [%rd1]", "ret",
             "$L1:", "st.global.f32 [%rd1], %f2", "bra.uni $L2", "$L2:", "griddepcontrol.wait"]
    assert before_wait(items) == ["ld.param.u64", "st.global.f32"]
    assert before_wait(items[:1] + items[2:5]) == ["ld.param.u64"]


# ---- on the GPU ---------------------------------------------------------------------------------------------------

def _layer_chain(m, dtype, buf):
    """Two decode layers' GEMVs and a head as the fused step chains them (prenormed inputs, staged outputs), each
    launch reading what the one before it wrote and overwriting what an earlier one read."""
    prenorm = gemv.Prenorm(buf["norm"], buf["normed"], buf["partials"], buf["arrivals"])
    prenormed = gemv.Prenormed(buf["normed"], buf["partials"], gemv.prenorm_blocks(m["o"].rows))
    for _ in range(2):
        gemv.quantize_input(buf["attn"], buf["staged"], dtype)
        gemv.gemv_add(buf["attn"], m["o"], buf["x"], dtype, staged=buf["staged"], prenorm=prenorm)
        gemv.gate_up(buf["x"], buf["norm"], 1e-5, m["gate"], m["up"], buf["gate_up"], dtype, out_staged=buf["staged"],
                     prenormed=prenormed)
        gemv.gemv_add(buf["gate_up"], m["down"], buf["x"], dtype, staged=buf["staged"], prenorm=prenorm)
        gemv.qkv(buf["x"], buf["norm"], 1e-5, m["q"], m["k"], m["v"], None, buf["q"], buf["cache_k"], buf["cache_v"],
                 buf["position"], buf["cos"], buf["sin"], 32, 8, 64, 64, 0, dtype, prenormed=prenormed)
        gemv.gemv(buf["q"], m["q_back"], buf["attn"], dtype)
    gemv.head(buf["x"], buf["norm"], 1e-5, m["output"], buf["logits"], dtype, prenormed=prenormed)
    gemv.head(buf["x"], buf["norm"], 1e-5, m["output"], buf["logits_staged"], dtype, ring=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("stream", ["default", "created"])
def test_a_chain_of_dependent_gemvs_equals_the_plain_chain(monkeypatch, dtype, stream):
    """At Llama-3.2-1B widths (d 2048, ffn 8192, 32 x 64 query and 8 KV heads; a 49,152-row Q6_K head, on the ring
    where it runs): every buffer the chain writes, launched dependent, bit for bit the plain chain's."""
    import cupy as cp

    from engine.backends.cuda.weights import to_activation, upload_weight
    from engine.bench import synthetic_weight

    if pdl._device_capability() < 90:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    rng = np.random.default_rng(16)
    d, ffn, vocab = 2048, 8192, 49152
    shapes = {"o": (d, d), "gate": (ffn, d), "up": (ffn, d), "down": (d, ffn), "q": (d, d), "k": (512, d),
              "v": (512, d), "q_back": (d, d), "output": (vocab, d)}
    m = {name: upload_weight(cp, name, synthetic_weight(name, GGMLType.Q6_K if name == "output" else GGMLType.Q4_K,
                                                        shape, rng, 1 / np.sqrt(shape[1])))
         for name, shape in shapes.items()}
    x, attn, norm = rng.standard_normal(d), rng.standard_normal(d), rng.uniform(0.5, 1.5, d)
    angles = np.arange(8)[:, None] * (1e4 ** (-np.arange(32) / 32))[None, :]

    def run(enabled: bool) -> dict:
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        act = to_activation(cp, cp.zeros(1, cp.float32), dtype).dtype
        buf = {"x": cp.asarray(x, cp.float32), "attn": to_activation(cp, cp.asarray(attn, cp.float32), dtype),
               "norm": cp.asarray(norm, cp.float32), "staged": cp.zeros(gemv.staged_bytes(ffn), cp.uint8),
               "normed": cp.zeros(gemv.staged_bytes(d), cp.uint8), "partials": cp.zeros(d // 8, cp.float32),
               "arrivals": cp.zeros(d // 32, cp.uint32), "gate_up": cp.zeros(ffn, act), "q": cp.zeros(d, act),
               "cache_k": cp.zeros((8, 8, 64), act), "cache_v": cp.zeros((8, 8, 64), act),
               "position": cp.asarray(np.array([5], np.int32)), "logits": cp.zeros(vocab, cp.float32),
               "logits_staged": cp.zeros(vocab, cp.float32), "cos": cp.asarray(np.cos(angles), cp.float32),
               "sin": cp.asarray(np.sin(angles), cp.float32)}
        cp.cuda.Device().synchronize()  # the buffers written on the null stream (a created one does not wait for it)
        with cp.cuda.Stream(non_blocking=True) if stream == "created" else cp.cuda.Stream.null:
            _layer_chain(m, dtype, buf)
        cp.cuda.Device().synchronize()
        return {name: cp.asnumpy(a).view(np.uint8) for name, a in buf.items()}

    plain, dependent = run(False), run(True)
    assert np.isfinite(plain["logits"].view(np.float32)).all() and plain["cache_k"].any()
    for name in plain:
        np.testing.assert_array_equal(dependent[name], plain[name], err_msg=name)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The tiny models whose decode step runs fused (tools/make_tiny_model.py): GQA Q4_1 / Q8_0 (head_dim 16: the
    SIMT attention), K-quant Q6_K, and head_dim 64 Q8_0 (the split-K decode attention and its combine)."""
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import VARIANTS, make_tiny_model

    paths = make_tiny_model(tmp_path_factory.mktemp("gqa"), VARIANTS["gqa"], gguf_types=("q4_1",), hf=False)
    paths["kquant-q6_k"] = make_tiny_model(tmp_path_factory.mktemp("kq"), VARIANTS["kquant"], gguf_types=("q6_k",),
                                           hf=False)["q6_k"]
    paths["d64-q8_0"] = make_tiny_model(tmp_path_factory.mktemp("d64"), VARIANTS["d64"], gguf_types=("q8_0",),
                                        hf=False)["q8_0"]
    return paths


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("key,dca,cache_type", [("q4_1", "off", None), ("kquant-q6_k", "off", None),
                                                ("d64-q8_0", "on", None), ("d64-q8_0", "off", None),
                                                ("d64-q8_0", "on", "q8_0")])
def test_the_decode_step_is_the_same_bits_with_dependent_launches(monkeypatch, tiny_models, key, dca, cache_type,
                                                                  dtype):
    """One fused decode step (eager: logits and the token's cache rows) and 48 greedy tokens of the graph decoder
    (captured with the dependent launches) equal the plain launches' bit for bit; with q8_0 caches too (the row
    store between qkv and the attention goes dependent)."""
    import engine
    from gpu_greedy import greedy_on_gpu

    def bits(values: np.ndarray) -> np.ndarray:  # float32 (16-bit values widened: the same bits iff the same 16)
        return np.ascontiguousarray(values).view(np.uint8)

    if pdl._device_capability() < 90:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    prompt = np.random.default_rng(7).integers(3, 384, 300 if dca == "on" else 100)

    def run(enabled):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        llm = engine.load(tiny_models[key], device="cuda", context=512, dca=dca, dtype=dtype,
                          cache_type_k=cache_type, cache_type_v=cache_type)
        model, backend, c = llm.model, llm.backend, llm.config
        assert all(model.decode_blocks.fused_attention) and all(model.decode_blocks.fused_mlp)
        cache = backend.new_cache(c.n_layers, 512, c.n_kv_heads, c.head_dim, llm.cache_types)
        model.forward(prompt, cache, logits_for="none")
        logits = bits(backend.to_numpy(model.compute(backend.tokens([77]), backend.positions(len(prompt), 1), cache,
                                                     "last")))
        stores = (cache.k, cache.v)
        arrays = [a for store in stores for a in ((store.q, store.d) if kv_q8.is_q8(store) else (store,))]
        rows = [bits(backend.to_numpy(a[:, len(prompt)])) for a in arrays]
        tokens, _, _ = greedy_on_gpu(llm, prompt.tolist(), 48)
        return logits, rows, tokens

    plain, dependent = run(False), run(True)
    np.testing.assert_array_equal(dependent[0], plain[0])
    for got, want in zip(dependent[1], plain[1]):
        np.testing.assert_array_equal(got, want)
    assert dependent[2] == plain[2]
