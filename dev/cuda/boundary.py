"""Development driver: what a kernel boundary costs the one-token GEMVs (dev/cuda/NOTES.md "Next", session 20).

The 8B decode step's short products run ~5-6 us a launch above their bytes at the copy rate; v25 (their first rows
asked of L2 ahead) and v26 (fewer round trips a warp) did not move it. This driver splits that cost, in three parts,
each timed as CUDA graph replays (dev/cuda/gemv.py time_launches), plain launches and dependent ones (pdl.launch_ex):

  empty   40 launches of an empty kernel of the GEMVs' grid (sm_count x gemv.BLOCKS_PER_SM blocks of 256 threads,
          griddepcontrol.wait first): a launch and its drain alone
  fixed   kernels/gemv.cu's gemv at the 8B products' shapes (qkv, o, gate+up, down: Q4_K), each against a matrix of
          the same columns and `stack` times its rows in one launch (the same work a row): a launch's time is
          fixed + bytes / rate, so fixed = t(rows) - t(stack x rows) / stack; checked first against gemv.reference
  chain   the four products one after another for 32 layers (weights of their own, 3.9 GB) in one graph, against
          the sum of their launches timed alone: what the neighbours' tails and ramps add or hide

    python dev/cuda/boundary.py [--reps 5] [--stack 8]

fp16 activations (the int8 GEMVs quantize them once a block: the dtype does not change their weight reads).

Needs a GPU (Hopper for the dependent launches).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.backends.cuda import gemv, pdl  # noqa: E402
from engine.backends.cuda.splits import sm_count  # noqa: E402
from engine.backends.cuda.weights import to_activation, upload_weight  # noqa: E402
from engine.bench import synthetic_weight  # noqa: E402

EMPTY_SOURCE = r"""
extern "C" __global__ void empty_dependent(unsigned* sink) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    if (sink != nullptr && threadIdx.x == 0 && blockIdx.x == 0) atomicAdd(sink, 1u);
}
"""
PRODUCTS = ("8b-qkv", "8b-o", "8b-gate+up", "8b-down")  # a layer's GEMVs, in the step's order
LAYERS = 32
CHECK_ROWS = 256
DTYPE = "f16"


def dev_gemv():
    """dev/cuda/gemv.py (SHAPES, L2_BYTES, time_launches, rel_err), loaded by path: dev/cuda is no package."""
    spec = importlib.util.spec_from_file_location("dev_gemv", Path(__file__).with_name("gemv.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_pdl(enabled: bool, timed):
    """timed() with pdl.ENABLED set to `enabled` (gemv's launches dependent or plain), then restored."""
    before = pdl.ENABLED
    pdl.ENABLED = enabled
    try:
        return timed()
    finally:
        pdl.ENABLED = before


def time_empty(cp, dev, reps: int) -> dict[str, float]:
    """Seconds a launch of the empty kernel, plain and dependent."""
    fn = cp.RawModule(code=EMPTY_SOURCE, options=("-std=c++17",)).get_function("empty_dependent")
    blocks = sm_count(cp) * gemv.BLOCKS_PER_SM
    sink = cp.zeros(1, dtype=cp.uint32)
    times = {}
    for kind, dependent in (("plain", False), ("dependent", True)):
        times[kind] = dev.time_launches(cp, lambda i: pdl.launch_ex(fn, (blocks,), (gemv.THREADS,), (sink,), 0,
                                                                      dependent=dependent), 1, reps)
    return times


class Product:
    """One product's weights on the device (copies enough to exceed L2), its input and output."""

    def __init__(self, cp, dev, name: str, rows: int, cols: int, ggml_type, copies: int | None = None):
        rng = np.random.default_rng(rows + cols)
        self.tensor = synthetic_weight("output", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
        self.m = upload_weight(cp, "output", self.tensor)  # fp32 out, as dev/cuda/gemv.py's run_shape
        self.copies = copies or max(1, -(-4 * dev.L2_BYTES // self.m.data.nbytes))
        self.datas = [self.m.data] + [self.m.data.copy() for _ in range(self.copies - 1)]
        self.x = to_activation(cp, cp.asarray(rng.standard_normal(cols).astype(np.float32)), DTYPE)
        self.y = cp.empty(rows, dtype=cp.float32)
        self.name, self.rows = name, rows

    def launch(self, i: int) -> None:
        self.m.data = self.datas[i % self.copies]
        gemv.gemv(self.x, self.m, self.y, DTYPE)

    def check(self, cp, dev) -> float:
        """Relative error of the first CHECK_ROWS rows against gemv.reference (the kernel's arithmetic in numpy)."""
        self.launch(0)
        head = type(self.tensor)(self.tensor.name, self.tensor.ggml_type, (CHECK_ROWS, self.tensor.shape[1]),
                                 self.tensor.raw[:CHECK_ROWS * (self.tensor.raw.size // self.rows)])
        x = cp.asnumpy(self.x).astype(np.float32)
        return dev.rel_err(cp.asnumpy(self.y)[:CHECK_ROWS], gemv.reference(x, head))


def time_fixed(cp, dev, stack: int, reps: int) -> list[dict]:
    """Per product: seconds a launch at its rows and, per `stack` rows' worth, at stack x its rows; plain and
    dependent."""
    results = []
    for name in PRODUCTS:
        rows, cols, ggml_type = dev.SHAPES[name]
        small = Product(cp, dev, name, rows, cols, ggml_type)
        big = Product(cp, dev, name, rows * stack, cols, ggml_type)
        errors = (small.check(cp, dev), big.check(cp, dev))
        if max(errors) > 1e-5:
            raise SystemExit(f"{name}: gemv against its reference: relative errors {errors}")
        for dependent in (False, True):
            t_small = with_pdl(dependent, lambda: dev.time_launches(cp, small.launch, small.copies, reps))
            t_big = with_pdl(dependent, lambda: dev.time_launches(cp, big.launch, big.copies, reps))
            results.append(dict(name=name, launch="dependent" if dependent else "plain", mb=small.m.data.nbytes / 1e6,
                                small=t_small, big=t_big / stack, fixed=t_small - t_big / stack,
                                rate=big.m.data.nbytes / t_big))
    return results


def time_chain(cp, dev, reps: int) -> dict[str, float]:
    """Seconds of a layer's four products in a graph of LAYERS layers (each layer's weights its own), plain and
    dependent."""
    products = [Product(cp, dev, name, *dev.SHAPES[name], copies=LAYERS) for name in PRODUCTS]
    launches = LAYERS * len(products)

    def launch(i: int) -> None:
        products[i % len(products)].launch(i // len(products))

    return {kind: with_pdl(dependent, lambda: dev.time_launches(cp, launch, launches, reps, launches))
            * len(products) for kind, dependent in (("plain", False), ("dependent", True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stack", type=int, default=8, help="rows of the one-launch matrix: this many times the product's")
    args = ap.parse_args()
    import cupy as cp

    dev = dev_gemv()
    empty = time_empty(cp, dev, args.reps)
    print("empty kernel (us a launch): " + ", ".join(f"{k} {t * 1e6:.2f}" for k, t in empty.items()))
    fixed = time_fixed(cp, dev, args.stack, args.reps)
    print(f"\n| product | launch | MB | us a launch | us at {args.stack}x rows, per share | fixed us | GB/s at "
          f"{args.stack}x |")
    print("|---|---|---|---|---|---|---|")
    for r in fixed:
        print(f"| {r['name']} | {r['launch']} | {r['mb']:.1f} | {r['small'] * 1e6:.2f} | {r['big'] * 1e6:.2f} | "
              f"{r['fixed'] * 1e6:.2f} | {r['rate'] / 1e9:.0f} |")
    chain = time_chain(cp, dev, args.reps)
    print("\na layer's four products (us):")
    for kind, seconds in chain.items():
        alone = sum(r["small"] for r in fixed if r["launch"] == kind)
        print(f"  {kind:9s} chained {seconds * 1e6:.1f}, alone summed {alone * 1e6:.1f}, "
              f"at the {args.stack}x rates {sum(r['big'] for r in fixed if r['launch'] == kind) * 1e6:.1f}")


if __name__ == "__main__":
    main()
