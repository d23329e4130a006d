"""The host side of gemv.cu's launches agrees with the kernels' parameter lists, on the CPU: each launch helper of
backends/cuda/gemv.py is called with stand-in device arrays, its argument tuple recorded, and every argument's
kind (pointer or 64-bit integer: .u64, int: .u32, float: .f32) compared with the .param list NVRTC compiles for
that kernel. A parameter added on one side only (as the Q/K/V biases were to qkv) fails here, not on a GPU."""
from __future__ import annotations

import pytest

from engine.backends.cuda import gemv, kernels, pdl
from engine.backends.cuda.weights import DeviceMatrix
from engine.errors import DeviceError
from engine.weights.quant import GGMLType, tensor_nbytes

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) is not installed")
from nvrtc_check import requires_nvrtc  # noqa: E402
from kernel_abi import Recorder, kind, params  # noqa: E402

pytestmark = requires_nvrtc


class DeviceArray:
    """Stands in for a CuPy array argument (passed to the kernel as a pointer)."""

    def __init__(self, shape=(1,)):
        self.shape = shape


def _matrix(rows: int, cols: int, ggml_type: GGMLType) -> DeviceMatrix:
    return DeviceMatrix("w", ggml_type, rows, cols, DeviceArray((rows, tensor_nbytes(ggml_type, (1, cols)))),
                        f32_out=False)


PRENORMED = gemv.Prenormed(DeviceArray(), DeviceArray(), 16)
LAUNCHES = {  # helper name -> call with stand-ins (dtype given)
    "gemv": lambda m, dt: gemv.gemv(DeviceArray(), m, DeviceArray(), dt),
    "gemv_add": lambda m, dt: gemv.gemv_add(DeviceArray(), m, DeviceArray(), dt),
    "qkv": lambda m, dt: gemv.qkv(DeviceArray(), DeviceArray(), 1e-5, m, _matrix(64, m.cols, m.ggml_type),
                                  _matrix(64, m.cols, m.ggml_type), None, DeviceArray(), DeviceArray(),
                                  DeviceArray(), DeviceArray(), DeviceArray(), DeviceArray(), 4, 1, 64, 64, 0, dt),
    "qkv+biases": lambda m, dt: gemv.qkv(DeviceArray(), DeviceArray(), 1e-5, m, _matrix(64, m.cols, m.ggml_type),
                                         _matrix(64, m.cols, m.ggml_type), (DeviceArray(), DeviceArray(),
                                                                            DeviceArray()), DeviceArray(),
                                         DeviceArray(), DeviceArray(), DeviceArray(), DeviceArray(), DeviceArray(),
                                         4, 1, 64, 64, 0, dt),
    "gateup": lambda m, dt: gemv.gate_up(DeviceArray(), DeviceArray(), 1e-5, m, m, DeviceArray(), dt),
    "head": lambda m, dt: gemv.head(DeviceArray(), DeviceArray(), 1e-5, m, DeviceArray(), dt),
    "head+ring": lambda m, dt: gemv.head(DeviceArray(), DeviceArray(), 1e-5, m, DeviceArray(), dt, ring=True),
    "head+ring+prenormed": lambda m, dt: gemv.head(DeviceArray(), DeviceArray(), 1e-5, m, DeviceArray(), dt,
                                                   prenormed=PRENORMED, ring=True),
    "gemv_add+prenorm": lambda m, dt: gemv.gemv_add(DeviceArray(), m, DeviceArray(), dt, prenorm=gemv.Prenorm(
        DeviceArray(), DeviceArray(), DeviceArray(), DeviceArray())),
    "qkv+prenormed": lambda m, dt: gemv.qkv(DeviceArray(), DeviceArray(), 1e-5, m, _matrix(64, m.cols, m.ggml_type),
                                            _matrix(64, m.cols, m.ggml_type), None, DeviceArray(), DeviceArray(),
                                            DeviceArray(), DeviceArray(), DeviceArray(), DeviceArray(), 4, 1, 64, 64,
                                            0, dt, prenormed=PRENORMED),
    "gateup+prenormed": lambda m, dt: gemv.gate_up(DeviceArray(), DeviceArray(), 1e-5, m, m, DeviceArray(), dt,
                                                   out_staged=DeviceArray(), prenormed=PRENORMED),
    "head+prenormed": lambda m, dt: gemv.head(DeviceArray(), DeviceArray(), 1e-5, m, DeviceArray(), dt,
                                              prenormed=PRENORMED),
}


def _params(kernel: str, suffix: str, dtype: str) -> list[str]:
    return params("gemv", kernel, dtype, kernels.per_type(gemv.INSTANCE_MACRO, suffix))


def recorded_launches(monkeypatch) -> list:
    """gemv.py's kernels replaced by Recorders (on an H100's limits), launched plainly (the dependent launch of the
    same table: tests/test_cuda_pdl.py): the list they are appended to as launched."""
    launched = []

    def fake_function(file, kernel, dtype, instance=None):
        launched.append(Recorder(kernel))
        return launched[-1]

    monkeypatch.setattr(gemv, "function", fake_function)
    monkeypatch.setattr(gemv, "_device_limits", lambda: (132, 227 * 1024))
    monkeypatch.setattr(gemv, "_compute_capability", lambda: 90)
    monkeypatch.setattr(pdl, "ENABLED", False)
    monkeypatch.setattr(gemv, "CLUSTER_HANDOFF", False)  # clusters: tests/test_cuda_pdl.py
    return launched


@pytest.mark.parametrize("ggml_type", [GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.F16])
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_gemv_launch_arguments_match_the_kernel_parameters(monkeypatch, launch, ggml_type):
    launched = recorded_launches(monkeypatch)
    m = _matrix(256, 512, ggml_type)
    if "+ring" in launch and ggml_type not in gemv.INT8_TYPES:  # refused: the prenormed input's check comes first
        with pytest.raises(DeviceError, match="head_ring cannot stream|int8 weight type"):
            LAUNCHES[launch](m, "bf16")
        return
    if launch.endswith("+prenormed") and ggml_type not in gemv.INT8_TYPES:
        with pytest.raises(DeviceError, match="int8 weight type"):
            LAUNCHES[launch](m, "bf16")
        return
    LAUNCHES[launch](m, "bf16")
    (recorder,) = launched
    assert [kind(a) for a in recorder.args] == _params(recorder.name, m.suffix, "bf16"), recorder.name


def test_prenorm_launches_the_plain_grid(monkeypatch):
    """gemv_add with prenorm outputs: the plain launch's per_block (a multiple of 8; at 8B widths on 132 SMs 16: 256
    blocks, the partials its consumers sum, the 32-row groups handed off between block pairs), the grid
    prenorm_blocks; rows off the 32-row groups, and blocks off multiples of 8 rows, are refused."""
    launched = recorded_launches(monkeypatch)
    prenorm = gemv.Prenorm(DeviceArray(), DeviceArray(), DeviceArray(), DeviceArray())
    for rows, cols in ((4096, 4096), (4096, 14336), (8192, 28672), (2080, 4096), (2048, 8192)):
        m = _matrix(rows, cols, GGMLType.Q4_K)
        gemv.gemv_add(DeviceArray(), m, DeviceArray(), "f16", prenorm=prenorm)
        per_block = int(launched[-1].args[-1])
        assert per_block % 8 == 0 and per_block == gemv.prenorm_per_block(rows) == gemv.tasks_per_block(rows)
        assert gemv.prenorm_blocks(rows) == -(-rows // per_block) <= rows // 8
    assert gemv.prenorm_blocks(4096) == 256 and gemv.prenorm_blocks(2048) == 256
    for rows, per_block in ((4104, None), (4096, 12)):  # rows off the groups; blocks off the warps (partials: d/8)
        with pytest.raises(DeviceError, match="whole groups of 32 rows and blocks of a multiple of 8"):
            gemv.gemv_add(DeviceArray(), _matrix(rows, 4096, GGMLType.Q4_K), DeviceArray(), "f16", per_block=per_block,
                          prenorm=prenorm)


def test_the_head_streams_its_rows_where_measured_faster(monkeypatch):
    """head() takes head_ring for Q6_K rows on compute capability >= 9.0 when its stages fit shared memory (one block
    an SM, 8 rows x 4 stages), head otherwise; ring=False / True overrides."""
    launched = recorded_launches(monkeypatch)
    q6k = _matrix(128256, 4096, GGMLType.Q6_K)
    for m, capability, kernel in ((q6k, 90, "head_ring_q6_k"), (q6k, 80, "head_q6_k"),
                                  (_matrix(128256, 4096, GGMLType.Q4_K), 90, "head_q4_k"),
                                  (_matrix(128256, 4096, GGMLType.Q8_0), 90, "head_q8_0")):
        monkeypatch.setattr(gemv, "_compute_capability", lambda capability=capability: capability)
        gemv.head(DeviceArray(), DeviceArray(), 1e-5, m, DeviceArray(), "f16")
        assert launched[-1].name == kernel
    monkeypatch.setattr(gemv, "_compute_capability", lambda: 90)
    gemv.head(DeviceArray(), DeviceArray(), 1e-5, q6k, DeviceArray(), "f16")
    ring = launched[-1]
    assert ring.grid == (-(-128256 // -(-128256 // 132)),) and ring.block == (gemv.RING_THREADS,)
    assert ring.shared_mem == gemv.ring_shared_bytes(q6k) == 5120 + 4 * (8 * 3360 + 16)
    gemv.head(DeviceArray(), DeviceArray(), 1e-5, q6k, DeviceArray(), "f16", ring=False)
    assert launched[-1].name == "head_q6_k"
    monkeypatch.setattr(gemv, "_device_limits", lambda: (132, 48 * 1024))  # stages beyond shared memory
    assert not gemv.head_uses_ring(q6k)
    with pytest.raises(DeviceError, match="head_ring cannot stream"):
        gemv.head(DeviceArray(), DeviceArray(), 1e-5, q6k, DeviceArray(), "f16", ring=True)
