"""Registers, spills and shared memory of the decode step's kernels, without a GPU: each production build compiled to
PTX by NVRTC (engine/backends/cuda/kernels.compile_ptx), then to sm_90 code by ptxas -v (nvcc's toolkit on PATH).
The GEMVs' dynamic shared memory is their staged input (gemv.py: cols + cols/4 bytes for the int8 types), printed for
a shape's widths; the decode attention's is flash_attention.decode_smem.

    python dev/cuda/resources.py [--dtype bf16] [--types q4_k,q6_k] [--shape llama3-8b] [-D NAME=VALUE ...]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.backends.cuda import flash_attention as fa  # noqa: E402
from engine.backends.cuda import gemv, kernels  # noqa: E402

WIDTHS = {  # shape: (d_model, ffn) -- the GEMVs' input widths (q+k+v, o, gate+up, head: d; down: ffn)
    "llama3.2-1b": (2048, 8192), "llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336),
    "llama3-70b": (8192, 28672),
}


def ptxas_usage(ptx: str, arch: str = "sm_90") -> dict[str, dict]:
    """Per entry: registers, spill bytes (stores + loads), static shared memory bytes, from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "k.ptx"
        source.write_text(ptx)
        done = subprocess.run(["ptxas", f"-arch={arch}", "-v", str(source), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ptxas failed:\n{done.stderr}")
    usage, name = {}, None
    for line in done.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
            usage[name] = {"regs": 0, "spill": 0, "smem": 0}
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            usage[name]["spill"] = int(m.group(1)) + int(m.group(2))
        elif name and (m := re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)):
            usage[name]["regs"] = int(m.group(1))
            usage[name]["smem"] = int(m.group(2) or 0)
    return usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["f16", "bf16"])
    ap.add_argument("--types", default="q4_k,q6_k,q8_0")
    ap.add_argument("--shape", default="llama3-8b", choices=list(WIDTHS))
    ap.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                    help="a measurement macro for every build (e.g. GEMV_MIN_BLOCKS=0)")
    args = ap.parse_args()
    kernels.NVRTC_OPTIONS += tuple(f"-D{d}" for d in args.defines)
    d, ffn = WIDTHS[args.shape]
    staged = {width: width + width // 4 for width in (d, ffn)}  # int8 values + block scales and sums
    print(f"{'kernel':28} {'regs':>5} {'spill B':>8} {'static smem':>12} {'dynamic smem':>13}")
    for t in args.types.split(","):
        ptx = kernels.compile_ptx("gemv", "sm_90", args.dtype, instance=kernels.per_type(gemv.INSTANCE_MACRO, t))
        for name, u in sorted(ptxas_usage(ptx).items()):
            width = ffn if name.startswith("gemv_add") else d  # gemv_add: o (d) and down (ffn): the larger
            dynamic = "+ ring" if name.startswith("head_ring") else ""  # and its weight stages (gemv.head)
            print(f"{name:28} {u['regs']:>5} {u['spill']:>8} {u['smem']:>12} {staged[width]:>13} {dynamic}")
    for head_dim in fa.DECODE_TILE_KEYS:
        for kinds in fa.DECODE_CACHE_KINDS:
            file, kernel, instance = fa.decode_build(head_dim, *kinds)
            u = ptxas_usage(kernels.compile_ptx(file, "sm_90", args.dtype, instance=instance))[kernel]
            print(f"{kernel:28} {u['regs']:>5} {u['spill']:>8} {u['smem']:>12} "
                  f"{fa.decode_smem(head_dim, *kinds):>13}")
    u = ptxas_usage(kernels.compile_ptx("dca_decode", "sm_90", args.dtype))["dca_combine"]
    print(f"{'dca_combine':28} {u['regs']:>5} {u['spill']:>8} {u['smem']:>12} {0:>13}")


if __name__ == "__main__":
    main()
