"""Development driver: the one-token GEMV with its weight rows streamed by the bulk copy engine (dev/cuda/gemv_tma.cu:
gemv.cu's ring_row_dots over a plain input) against the production kernel (gemv.cu's gemv body), the latter also
with an L2 prefetch of the next GEMV's weights.
Needs a Hopper GPU (cp.async.bulk); run from the repository root:

    python dev/cuda/gemv_tma.py [--shapes 8b-qkv,8b-gate+up] [--reps 5] [--layers 4] [--configs 8x4,16x4,16x6]

Per shape (dev/cuda/gemv.py's SHAPES): "prod" (gemv.cu's gemv body at the production grid, fp32 output), then
"tma/RxS" (R rows a stage, S stages; one block per SM, or two where their shared memory fits: "/2") for each
--configs entry that fits the device's shared memory. Check: every variant's output equal bit for bit to "prod"'s
(the same unit_dot, summed in the same order), and "prod" against the numpy model (gemv.reference) on the first
and last rows (rel. error < 1e-5). Timing: dev/cuda/gemv.py's time_launches (a CUDA graph over weight copies
that exceed L2 four times).

Then a Llama-3-8B layer's four products in sequence (q+k+v, o, gate+up, down; --layers distinct layers, several
times L2) as one graph: us per layer and the fraction of the copy-bandwidth floor, for prod without and with "+next"
(each launch asks L2 for the next launch's weights; "+next12M" the first 12 MB), and tma (the best config per shape);
then (v30, NOTES.md) the dependent chains: "prod/pdl" (the production body launched dependent, as the decode step
does), "ovl/pdl" and "ovl/pdl+early" (gemv_ovl: the ring, its first stages copied before its pdl_wait, at the first
--overlap-configs entry whose shared memory fits twice an SM, so that a dependent's block fits beside it; "+early":
each launch releases its dependents right after its wait). Each ovl config is checked equal to prod bit for bit.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.backends.cuda import gemv, kernels, pdl  # noqa: E402
from engine.bench import synthetic_weight  # noqa: E402
from engine.weights.quant import GGMLType  # noqa: E402

_spec = importlib.util.spec_from_file_location("gemv_driver", Path(__file__).with_name("gemv.py"))
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)

SUFFIX = {GGMLType.Q4_K: "q4_k", GGMLType.Q6_K: "q6_k", GGMLType.Q8_0: "q8_0"}
LAYER_8B = ("8b-qkv", "8b-o", "8b-gate+up", "8b-down")
CONSUMER_THREADS, TMA_THREADS = 256, 288
COPY_BANDWIDTH_H100 = 3.35e12  # bytes/s, the H100 SXM's rated bandwidth (the floor's denominator on an H100)


def build(cp, extra: tuple[str, ...] = ()):
    """gemv.cu with its preludes, then gemv_tma.cu and the `extra` files of dev/cuda/, f16 activations."""
    parts = [(kernels.KERNEL_DIR / f).read_text() for f in kernels.PRELUDES["gemv"] + ("gemv.cu",)]
    parts += [Path(__file__).with_name(f).read_text() for f in ("gemv_tma.cu",) + extra]
    return cp.RawModule(code="\n".join(parts), options=kernels.NVRTC_OPTIONS)


class Gemv:
    """One matrix (weight copies on the device) and its launches: prod(i, next), tma(i, rows, stages, blocks)."""

    def __init__(self, cp, module, name, tensor, sms, smem_limit):
        self.cp, self.name, self.tensor = cp, name, tensor
        self.m, self.datas = driver.copies_of(cp, tensor, name)
        self.rows, self.cols = self.m.rows, self.m.cols
        self.row_bytes = int(self.m.data.shape[1])
        self.in_bytes = -(-gemv.stage_bytes(tensor.ggml_type, self.cols) // 128) * 128
        suffix = SUFFIX[GGMLType(tensor.ggml_type)]
        self.k_prod, self.k_tma = module.get_function(f"gemv_next_{suffix}"), module.get_function(f"gemv_tma_{suffix}")
        self.k_ovl = module.get_function(f"gemv_ovl_{suffix}") if suffix == "q4_k" else None
        self.sms, self.smem_limit = sms, smem_limit
        self.y = cp.zeros(self.rows, dtype=cp.float32)
        rng = np.random.default_rng(hash(name) % 2**32)
        self.x_host = (rng.standard_normal(self.cols) * rng.uniform(0.2, 3, self.cols)).astype(np.float16)
        self.x = cp.asarray(self.x_host)

    def smem(self, rows, stages):
        return self.in_bytes + stages * rows * self.row_bytes + 16 * stages

    def fits(self, rows, stages, blocks_per_sm=1):
        return blocks_per_sm * (self.smem(rows, stages) + 1024) <= self.smem_limit

    def prod(self, i, nxt=None, next_bytes=0):
        per_block = gemv.tasks_per_block(self.rows)
        self.k_prod((-(-self.rows // per_block),), (CONSUMER_THREADS,),
                    (self.datas[i % len(self.datas)], np.int64(self.row_bytes), self.x, np.int32(self.rows),
                     np.int32(self.cols), self.y, np.int32(per_block), *self._next(nxt, next_bytes)),
                    shared_mem=gemv.stage_bytes(self.tensor.ggml_type, self.cols))

    def ovl(self, i, rows, stages, early: bool):
        """gemv_ovl at one block an SM, launched dependent (pdl.launch_ex)."""
        smem = self.smem(rows, stages)
        self.k_ovl.max_dynamic_shared_size_bytes = smem
        per_block = -(-self.rows // self.sms)
        pdl.launch_ex(self.k_ovl, (-(-self.rows // per_block),), (TMA_THREADS,),
                      (self.datas[i % len(self.datas)], np.int64(self.row_bytes), self.x, np.int32(self.rows),
                       np.int32(self.cols), self.y, np.int32(per_block), np.int32(rows), np.int32(stages),
                       np.int32(early)), smem)

    def prod_dependent(self, i):
        """The production body (fp32 out) launched dependent, at the production grid."""
        per_block = gemv.tasks_per_block(self.rows)
        pdl.launch_ex(self.k_prod, (-(-self.rows // per_block),), (CONSUMER_THREADS,),
                      (self.datas[i % len(self.datas)], np.int64(self.row_bytes), self.x, np.int32(self.rows),
                       np.int32(self.cols), self.y, np.int32(per_block), *self._next(None, 0)),
                      gemv.stage_bytes(self.tensor.ggml_type, self.cols))

    def tma(self, i, rows, stages, blocks_per_sm=1):
        smem = self.smem(rows, stages)
        self.k_tma.max_dynamic_shared_size_bytes = smem
        blocks = self.sms * blocks_per_sm
        per_block = -(-self.rows // blocks)
        self.k_tma((-(-self.rows // per_block),), (TMA_THREADS,),
                   (self.datas[i % len(self.datas)], np.int64(self.row_bytes), self.x, np.int32(self.rows),
                    np.int32(self.cols), self.y, np.int32(per_block), np.int32(rows), np.int32(stages)),
                   shared_mem=smem)

    @staticmethod
    def _next(nxt, next_bytes):
        if nxt is None:
            return np.uint64(0), np.int64(0)
        return nxt, np.int64(min(next_bytes or nxt.nbytes, nxt.nbytes))

    def output(self):
        self.cp.cuda.Device().synchronize()
        return self.cp.asnumpy(self.y)


def check_prod(g: Gemv) -> float:
    """prod's output against the numpy model on the first and last CHECK_ROWS rows (copy 0)."""
    g.y.fill(0)
    g.prod(0)
    got = g.output()
    n = driver.CHECK_ROWS
    parts = [driver.row_slice(g.tensor, slice(0, n)), driver.row_slice(g.tensor, slice(g.rows - n, g.rows))]
    ref = np.concatenate([gemv.reference(g.x_host.astype(np.float32), t) for t in parts])
    return driver.rel_err(np.concatenate([got[:n], got[-n:]]), ref)


def shape_table(cp, g: Gemv, configs, reps) -> tuple[list[dict], tuple]:
    """prod and every fitting tma config: equal to prod bit for bit, us per launch; returns the rows and the fastest
    tma config."""
    err = check_prod(g)
    g.y.fill(0)
    g.prod(0)
    want = g.output()
    nbytes = g.m.data.nbytes
    out = [dict(shape=g.name, variant="prod", us=driver.time_launches(cp, g.prod, len(g.datas), reps) * 1e6,
                ok=err < 1e-5, note=f"model err {err:.1e}")]
    best = None
    for rows, stages in configs:
        for bps in (1, 2):
            if not g.fits(rows, stages, bps):
                continue
            g.y.fill(np.nan)
            g.tma(0, rows, stages, bps)
            same = bool(np.array_equal(g.output(), want))
            us = driver.time_launches(cp, lambda i: g.tma(i, rows, stages, bps), len(g.datas), reps) * 1e6
            label = f"tma/{rows}x{stages}" + ("/2" if bps == 2 else "")
            out.append(dict(shape=g.name, variant=label, us=us, ok=same, note="== prod" if same else "DIFFERS"))
            if same and (best is None or us < best[0]):
                best = (us, rows, stages, bps)
    for r in out:
        r["gbs"] = nbytes / (r["us"] * 1e-6) / 1e9
    return out, best


def overlap_config(g: Gemv, configs) -> tuple[int, int] | None:
    """The first (rows, stages) of `configs` whose ring fits twice an SM (a dependent's block beside this one's) and
    whose gemv_ovl output equals prod's bit for bit (None: none does)."""
    g.y.fill(0)
    g.prod(0)
    want = g.output()
    for rows, stages in configs:
        if g.k_ovl is None or not g.fits(rows, stages, 2):
            continue
        g.y.fill(np.nan)
        g.ovl(0, rows, stages, early=False)
        if np.array_equal(g.output(), want):
            return rows, stages
        print(f"{g.name}: gemv_ovl {rows}x{stages} DIFFERS from prod")
    return None


def layer_table(cp, gemvs, best, layers, reps, overlap=None) -> list[dict]:
    """The 8B layer's four products in sequence over `layers` distinct layers (copies), per variant: us per layer.
    overlap: name -> gemv_ovl's (rows, stages), for the dependent chains."""
    order = [gemvs[n] for n in LAYER_8B]
    copies = min(len(g.datas) for g in order)
    layers = min(layers, copies)
    layer_bytes = sum(g.m.data.nbytes for g in order)
    rows = []
    variants = [("prod", None), ("prod+next", 0), ("prod+next12M", 12 << 20)]
    if all(best.get(g.name) for g in order):
        variants += [("tma", None)]
    variants += [("prod/pdl", None)]
    if overlap and all(overlap.get(g.name) for g in order):
        variants += [("ovl/pdl", None), ("ovl/pdl+early", None)]
    for label, cap in variants:
        def run_layers(_, label=label, cap=cap):
            for layer in range(layers):
                for j, g in enumerate(order):
                    nxt_g, nxt_layer = (order[j + 1], layer) if j + 1 < len(order) else (order[0], (layer + 1) % layers)
                    nxt = None if cap is None else nxt_g.datas[nxt_layer]
                    if label.startswith("tma"):
                        _, r, s, bps = best[g.name]
                        g.tma(layer, r, s, bps)
                    elif label.startswith("ovl"):
                        g.ovl(layer, *overlap[g.name], early=label.endswith("+early"))
                    elif label == "prod/pdl":
                        g.prod_dependent(layer)
                    else:
                        g.prod(layer, nxt, cap)
        us = driver.time_launches(cp, run_layers, 1, reps, per_graph=4) * 1e6 / layers
        rows.append(dict(variant=label, us=us, gbs=layer_bytes / (us * 1e-6) / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8b-qkv,8b-o,8b-gate+up,8b-down,8b-head,1b-gate+up")
    ap.add_argument("--configs", default="8x4,8x8,16x4,16x6,32x3,32x4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--overlap-configs", default="8x4,16x3,8x3,4x3,2x3",
                    help="gemv_ovl's rows x stages to try per product, the first fitting twice an SM taken")
    args = ap.parse_args()
    import cupy as cp

    attributes = cp.cuda.Device().attributes
    sms = attributes["MultiProcessorCount"]
    smem_limit = attributes["MaxSharedMemoryPerBlockOptin"]
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device {name}: {sms} SMs, {smem_limit} bytes of shared memory a block")
    module = build(cp)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    rng = np.random.default_rng(11)
    shapes = args.shapes.split(",")
    gemvs, best = {}, {}
    print(f"{'shape':14} {'variant':14} {'MB':>7} {'us':>8} {'GB/s':>7} check")
    for shape in dict.fromkeys(shapes + list(LAYER_8B)):
        rows, cols, ggml_type = driver.SHAPES[shape]
        tensor = synthetic_weight(f"blk.0.{shape}", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
        g = gemvs[shape] = Gemv(cp, module, shape, tensor, sms, smem_limit)
        if shape not in shapes:
            continue
        table, best[shape] = shape_table(cp, g, configs, args.reps)
        for r in table:
            print(f"{shape:14} {r['variant']:14} {g.m.data.nbytes / 1e6:7.1f} {r['us']:8.2f} {r['gbs']:7.0f} "
                  f"{'ok' if r['ok'] else 'FAIL'} {r['note']}")
    layer_bytes = sum(gemvs[n].m.data.nbytes for n in LAYER_8B)
    print(f"\n8B layer (q+k+v, o, gate+up, down: {layer_bytes / 1e6:.1f} MB; floor at 3.35 TB/s "
          f"{layer_bytes / COPY_BANDWIDTH_H100 * 1e6:.1f} us)")
    overlap = {n: overlap_config(gemvs[n], [tuple(int(v) for v in c.split("x"))
                                            for c in args.overlap_configs.split(",")]) for n in LAYER_8B}
    print("gemv_ovl configs (rows x stages): " + ", ".join(f"{n} {c[0]}x{c[1]}" if c else f"{n} none"
                                                           for n, c in overlap.items()))
    for r in layer_table(cp, gemvs, best, args.layers, args.reps, overlap):
        print(f"  {r['variant']:14} {r['us']:8.2f} us a layer  {r['gbs']:7.0f} GB/s  "
              f"{layer_bytes / COPY_BANDWIDTH_H100 / (r['us'] * 1e-6):.2f} of the floor")


if __name__ == "__main__":
    main()
