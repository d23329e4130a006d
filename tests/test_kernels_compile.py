"""Every CUDA kernel compiles to PTX for sm_90 through NVRTC alone, in every activation dtype its file is
built for (f16, and bf16 with -DACT_BF16): no GPU or driver is needed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.backends.cuda import flash_attention as fa
from engine.backends.cuda import gemv, kernels
from engine.backends.cuda.weights import KERNEL_SUFFIX, QUANT_MACRO
from engine.errors import DeviceError

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy (with NVRTC) is not installed")
from nvrtc_check import requires_nvrtc  # noqa: E402

WEIGHT_TYPES = tuple(KERNEL_SUFFIX.values())
# files instantiated per weight type: file -> (macro, the kernels of each type)
PER_TYPE = {"gemv": (gemv.INSTANCE_MACRO, ("gemv", "gemv_add", "qkv", "gateup", "head")),
            "quant": (QUANT_MACRO, ("dequant", "embed"))}
EXPECTED_ENTRIES = {
    "elementwise": {"rmsnorm", "add_residual", "add_bias", "swiglu", "store_kv", "quantize_input"},
    "attention": {"attn_partial_1", "attn_partial_2", "attn_partial_4"},
    "sampling": {"sample_scan", "sample_pool", "sample_narrow", "sample_token"},
    "kv_q8": {"store_kv_q8", "dequant_kv_q8"},
}


pytestmark = requires_nvrtc


# (file, instance, the entries it must hold): every file as it is, each templated configuration production
# launches (flash_attention.launched_builds) appended to its file, and each weight type of the per-type files
TEMPLATED = {file for file, _, _ in fa.launched_builds()} | set(PER_TYPE)
INSTANCES = [(name, None, EXPECTED_ENTRIES.get(name, set())) for name in kernels.KERNEL_FILES if name not in TEMPLATED]
INSTANCES += [(file, instance, {kernel}) for file, kernel, instance in fa.launched_builds()]
INSTANCES += [(file, kernels.per_type(macro, t), {f"{op}_{t}" for op in ops})
              for file, (macro, ops) in PER_TYPE.items() for t in WEIGHT_TYPES]
BUILDS = [(name, instance, entries, dtype) for name, instance, entries in INSTANCES for dtype in kernels.dtypes(name)]


@pytest.mark.parametrize("name,instance,entries,dtype", BUILDS,
                         ids=[f"{n}-{i or 'file'}-{d}" for n, i, _, d in BUILDS])
def test_kernel_file_compiles_for_sm90(name, instance, entries, dtype):
    ptx = kernels.compile_ptx(name, "sm_90", dtype, instance=instance)
    assert ".target sm_90" in ptx
    found = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert found and found >= entries
    assert "local" not in re.findall(r"\.(local)\s", ptx), f"{name}.cu ({dtype}) spills registers to local memory"
    if dtype == "f16":  # nothing rounds to bf16 in an fp16 build
        assert not re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx), name


@pytest.mark.parametrize("name", ["elementwise", "attention", "dca_decode", "kv_q8"])
def test_the_bf16_build_differs(name):
    """-DACT_BF16 reaches the kernels: the bf16 build reads (and writes) activations as bf16."""
    assert kernels.compile_ptx(name, "sm_90", "bf16") != kernels.compile_ptx(name, "sm_90", "f16")


def test_instances_compile_only_what_is_launched():
    """A file with a templated kernel holds no configuration of its own: each build holds the one appended."""
    for file in TEMPLATED:
        entries = set(re.findall(r"\.entry\s+(\w+)", kernels.compile_ptx(file, "sm_90", "f16")))
        assert entries <= {"dca_combine"}, (file, entries)


def test_activation_files_have_both_builds_and_the_others_one():
    assert set(kernels.DTYPE_FREE_FILES) == {"sampling"}
    for name in kernels.KERNEL_FILES:
        assert kernels.dtypes(name) == (("f16",) if name == "sampling" else ("f16", "bf16"))
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
    monkeypatch.setattr(kernels, "source", lambda name, instance=None: "extern \"C\" __global__ void broken( { }")
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


@pytest.mark.parametrize("define", ["-DPREFETCH_TASKS=3", "-DGEMV_MIN_BLOCKS=0", "-DUNIT_UNROLL=4"])
def test_gemv_measurement_variant_compiles(monkeypatch, define):
    """dev/cuda/gemv.py builds gemv.cu with its measurement macros (the prefetch distance, the launch bounds before
    v15, a lane's units at once) to time against production: each compiles and changes the int8 kernels' code."""
    def ptx(t: str) -> str:
        return kernels.compile_ptx("gemv", "sm_90", "bf16", instance=kernels.per_type(gemv.INSTANCE_MACRO, t))

    production = ptx("q4_k")
    monkeypatch.setattr(kernels, "NVRTC_OPTIONS", kernels.NVRTC_OPTIONS + (define,))
    variant = ptx("q4_k")
    assert variant != production
    assert "local" not in re.findall(r"\.(local)\s", variant)


@pytest.mark.parametrize("weight_type", ["q4_k", "q6_k", "q8_0", "f16"])
def test_gemv_kernels_are_bounded_for_the_hosts_grid(weight_type):
    """Every GEMV kernel but the ring head asks for gemv.BLOCKS_PER_SM blocks an SM (__launch_bounds__(256, 2)): the
    grid the host launches, and what lets ptxas use 128 registers a thread instead of its default 64 (8B decode step
    2,764 -> 2,586 us on an H100, dev/cuda/NOTES.md v15)."""
    ptx = kernels.compile_ptx("gemv", "sm_90", "bf16", instance=kernels.per_type(gemv.INSTANCE_MACRO, weight_type))
    bounds = dict(re.findall(r"\.entry\s+(\w+)\((?:[^{]*?)\.minnctapersm\s+(\d+)", ptx, flags=re.S))
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    plain = {e for e in entries if not e.startswith("head_ring_")}
    assert plain and {e: int(bounds.get(e, 0)) for e in plain} == {e: gemv.BLOCKS_PER_SM for e in plain}
