"""Registers, spills and shared memory of the CUDA kernels production launches, without a GPU: each build of
kernels/<file>.cu (the source NVRTC compiles, engine/backends/cuda/kernels.py) compiled by nvcc for one architecture
(-cubin -Xptxas -v), and the dynamic shared memory the decode step's launches ask for at a preset model's widths.

    python tools/kernel_resources.py [--arch sm_90a] [--dtype bf16] [--shape llama3-8b] [--types q4_k,q6_k]
                                     [-D NAME=VALUE ...]

Prints two markdown tables: per kernel (file, build) registers a thread, spill stores / loads (bytes), static shared
memory; and per decode-step launch at the shape's widths (d, ffn, heads, head_dim, vocab) the kernel and its dynamic
shared memory (gemv.py stage_bytes / ring_shared_bytes, flash_attention.py decode_smem / prefill_smem /
wgmma_smem). Registers can differ a little from what the GPU's driver builds (NVRTC there, nvcc here; the same
ptxas). Needs nvcc on PATH.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backends.cuda import flash_attention as fa  # noqa: E402
from engine.backends.cuda import gemv, kernels  # noqa: E402
from engine.backends.cuda.weights import DeviceMatrix  # noqa: E402
from engine.models.presets import PRESETS, preset  # noqa: E402
from engine.weights.quant import GGMLType, tensor_nbytes  # noqa: E402

# kernels/<file>.cu builds without an instance line (everything in them is built) and the per-type ones
PLAIN_FILES = ("elementwise", "sampling", "kv_q8", "attention")
PER_TYPE = {"gemv": gemv.INSTANCE_MACRO}
ENTRY = re.compile(r"Compiling entry function '(\w+)' for '\w+'")
USED = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(code: str, options: tuple[str, ...], arch: str) -> list[dict]:
    """[{kernel, regs, spill_stores, spill_loads, static_smem}] of every entry function nvcc builds from code."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.cu"
        src.write_text(code)
        flags = [o for o in options if o.startswith(("-D", "-std"))]
        run = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", str(Path(tmp) / "k.cubin"),
                              *flags, str(src)], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"nvcc failed:\n{run.stderr[-2000:]}")
    return parse_ptxas(run.stderr)


def parse_ptxas(text: str) -> list[dict]:
    """ptxas -v's report (nvcc's stderr) -> [{kernel, regs, spill_stores, spill_loads, static_smem}] per entry."""
    rows, current = [], None
    for line in text.splitlines():
        if (m := ENTRY.search(line)):
            current = {"kernel": m.group(1), "regs": 0, "spill_stores": 0, "spill_loads": 0, "static_smem": 0}
            rows.append(current)
        elif current is not None:
            if (m := SPILLS.search(line)):
                current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
            if (m := USED.search(line)):
                current["regs"] = int(m.group(1))
            if (m := SMEM.search(line)):
                current["static_smem"] = int(m.group(1))
    return rows


def builds(types: list[str]) -> list[tuple[str, str | None]]:
    """(file, instance line) of every build to report: the plain files, gemv per weight type, the attention
    kernels' launched configurations."""
    out = [(name, None) for name in PLAIN_FILES]
    out += [(name, kernels.per_type(macro, t)) for name, macro in PER_TYPE.items() for t in types]
    out += [(file, instance) for file, _, instance in fa.launched_builds()]
    return out


def kernel_table(arch: str, dtype: str, types: list[str]) -> list[dict]:
    rows, seen = [], set()
    for name, instance in builds(types):
        build = dtype if dtype in kernels.dtypes(name) else kernels.dtypes(name)[0]
        if name in kernels.ARCH_FILES and kernels.ARCH_FILES[name] != arch:
            continue
        for r in ptxas_report(kernels.source(name, instance), kernels.nvrtc_options(name, build), arch):
            if (name, r["kernel"]) not in seen:  # dca_combine comes with every decode build
                seen.add((name, r["kernel"]))
                rows.append({"file": name, "build": build, **r})
    return rows


def _matrix(rows: int, cols: int, ggml_type: GGMLType) -> DeviceMatrix:
    """A stand-in of a device matrix's shape and type (its data only gives the row bytes)."""
    return DeviceMatrix("w", ggml_type, rows, cols, SimpleNamespace(shape=(rows, tensor_nbytes(ggml_type, (1, cols)))),
                        f32_out=False)


def launch_table(shape: str) -> list[dict]:
    """The decode step's launches at a preset's widths and their dynamic shared memory (bytes)."""
    c = preset(shape)
    q4k, q6k = GGMLType.Q4_K, GGMLType.Q6_K
    head = _matrix(c.vocab_size, c.d_model, q6k)
    return [
        {"launch": "qkv (Q4_K)", "dyn_smem": gemv.stage_bytes(q4k, c.d_model)},
        {"launch": "gemv_add o (Q4_K)", "dyn_smem": gemv.stage_bytes(q4k, c.n_heads * c.head_dim)},
        {"launch": "gateup (Q4_K)", "dyn_smem": gemv.stage_bytes(q4k, c.d_model)},
        {"launch": "gemv_add down (Q4_K)", "dyn_smem": gemv.stage_bytes(q4k, c.ffn_dim)},
        {"launch": "head_ring (Q6_K)", "dyn_smem": gemv.ring_shared_bytes(head)},
        {"launch": f"dca_decode_{c.head_dim} (16-bit cache)", "dyn_smem": fa.decode_smem(c.head_dim)},
        {"launch": f"dca_decode_q8_{c.head_dim}_11 (q8_0 cache)", "dyn_smem": fa.decode_smem(c.head_dim, True, True)},
        {"launch": "prefill mma.sync", "dyn_smem": fa.prefill_smem(c.head_dim, fa.PREFILL_TILES[c.head_dim])},
        {"launch": "prefill wgmma (Hopper)", "dyn_smem": fa.wgmma_smem(c.head_dim, fa.WGMMA_TILES[c.head_dim])},
    ]


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--dtype", default="bf16", choices=kernels.ACTIVATION_DTYPES)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--types", default="q4_k,q6_k", help="weight types of the per-type gemv builds")
    ap.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                    help="a measurement macro for every build (e.g. GEMV_MIN_BLOCKS=0)")
    args = ap.parse_args(argv)
    kernels.NVRTC_OPTIONS += tuple(f"-D{d}" for d in args.defines)
    print(markdown(kernel_table(args.arch, args.dtype, args.types.split(",")),
                   ["file", "build", "kernel", "regs", "spill_stores", "spill_loads", "static_smem"]))
    print()
    print(f"decode-step launches at {args.shape} widths:")
    print(markdown(launch_table(args.shape), ["launch", "dyn_smem"]))


if __name__ == "__main__":
    main()
