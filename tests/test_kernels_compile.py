"""Every CUDA kernel compiles to PTX for sm_90 through NVRTC alone, in every activation dtype its file is
built for (f16, and bf16 with -DACT_BF16): no GPU or driver is needed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.backends.cuda import kernels
from engine.errors import DeviceError

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) is not installed")

EXPECTED_ENTRIES = {
    "quant": {f"{op}_{t}" for op in ("dequant", "embed")
              for t in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")},
    "gemv": {f"{op}_{t}" for op in ("gemv", "gemv_add", "qkv", "gateup", "head")
             for t in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")},
    "elementwise": {"rmsnorm", "add_residual", "swiglu", "store_kv"},
    "attention": {"attn_partial_1", "attn_partial_2", "attn_partial_4", "attn_combine"},
    "sampling": {"sample_token"},
}


def _nvrtc_usable() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _nvrtc_usable(), reason="NVRTC library not found (nvidia-cuda-nvrtc wheel)")


BUILDS = [(name, dtype) for name in kernels.KERNEL_FILES for dtype in kernels.dtypes(name)]


@pytest.mark.parametrize("name,dtype", BUILDS, ids=[f"{n}-{d}" for n, d in BUILDS])
def test_kernel_file_compiles_for_sm90(name, dtype):
    ptx = kernels.compile_ptx(name, "sm_90", dtype)
    assert ".target sm_90" in ptx
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert entries and entries >= EXPECTED_ENTRIES.get(name, set())
    assert "local" not in re.findall(r"\.(local)\s", ptx), f"{name}.cu ({dtype}) spills registers to local memory"
    if name in kernels.ACTIVATION_FILES:  # activations round to bf16 in the bf16 build only
        assert ("cvt.rn.bf16.f32" in ptx) == (dtype == "bf16"), (name, dtype)


def test_activation_files_have_both_builds_and_the_others_one():
    assert set(kernels.ACTIVATION_FILES) == {"quant", "gemv", "elementwise", "attention"}
    for name in kernels.KERNEL_FILES:
        assert kernels.dtypes(name) == (("f16", "bf16") if name in kernels.ACTIVATION_FILES else ("f16",))
    assert kernels.nvrtc_options("elementwise", "bf16") == kernels.NVRTC_OPTIONS + ("-DACT_BF16",)
    assert kernels.nvrtc_options("elementwise", "f16") == kernels.NVRTC_OPTIONS
    with pytest.raises(DeviceError, match="sampling.cu has no 'bf16' build"):
        kernels.compile_ptx("sampling", "sm_90", "bf16")
    with pytest.raises(DeviceError, match="quant.cu has no 'fp8' build"):
        kernels.function("quant", "dequant_q4_1", "fp8")


def test_every_kernel_file_is_covered():
    on_disk = {p.stem for p in kernels.KERNEL_DIR.glob("*.cu")}
    assert on_disk == set(kernels.KERNEL_FILES) >= set(EXPECTED_ENTRIES)


def test_compile_error_names_the_file(monkeypatch):
    monkeypatch.setattr(kernels, "source", lambda name: "extern \"C\" __global__ void broken( { }")
    with pytest.raises(DeviceError, match="broken.cu|does not compile"):
        kernels.compile_ptx("broken")


def test_unknown_kernel_file_is_a_device_error():
    with pytest.raises(DeviceError, match="unknown kernel file"):
        kernels.source("nope")


def test_wgmma_wrappers_are_what_the_generator_prints():
    """kernels/wgmma.cuh ends with tools/gen_wgmma.py's output, unedited."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_wgmma", root / "tools" / "gen_wgmma.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    printed = "\n".join(gen.specialization(n, bf16, t) for n in gen.SHAPES for bf16, t in gen.TYPES)
    header = (root / "kernels" / "wgmma.cuh").read_text()
    assert header.endswith(printed) and header.count("template <> struct Wgmma<") == 4
