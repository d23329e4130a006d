"""Development driver for the one-token GEMV kernels (llm.c's dev/cuda shape): the CPU reference, each
variant, a correctness check, then a benchmark table (GB/s of weights read, fraction of 4.2 TB/s, the H200's
measured copy bandwidth) at real model shapes. Needs a GPU; run from the repository root:

    python dev/cuda/gemv.py [--baseline DIR] [--shapes 8b-down,8b-head] [--reps 5] [--bps 2]
                            [--defines="-;GEMV_MIN_BLOCKS=0;UNIT_UNROLL=4,PREFETCH_TASKS=2"]
    python dev/cuda/gemv.py --normed [--reps 5]

Variants:
  int8/bpsN   kernels/gemv.cu gemv_<type> (int8 input, dp4a) with tasks_per_block for N blocks per SM
              (production: gemv.BLOCKS_PER_SM); with --defines, built once per set of gemv.cu's measurement
              macros (PREFETCH_TASKS; "-": gemv.cu's defaults), the set in the variant's label
  add, add+staged   with --add: gemv_add (o / down products' kernel) quantizing its input, and reading it staged
              (quantized ahead, as dca_combine / gate_up write it in the decode step)
  --normed    instead, at 8B shapes: qkv, gate_up and head staging their RMSNorm'd input ("staging") against
              reading it prenormed (gemv_add's prenorm outputs: "prenormed"); gemv_add (o, down; staged input)
              plain and with the prenorm epilogue ("add+prenorm": the plain grid, 32-row groups handed off
              between blocks; "/cluster": each group's blocks one thread block cluster), each also at 32-row
              blocks (session 11's prenorm geometry)
  baseline    the previous kernel (fp32 input in shared memory, one warp per row, 4 rows a block: quant.cu
              gemv_<type> of the checkout at DIR, e.g. main's), where its fp32 staging fits 48 KB
Check: int8 variants against gemv.reference (the numpy model of their arithmetic, rel. error < 1e-5; the
error against the float product is printed: the int8 input's own), float-weight variants and the baseline
against the float product (< 1e-5). Rows checked: the first and
last 256 of each shape (the reference of a whole 128k-row head takes minutes on the CPU).
Timing: 40 launches captured in a CUDA graph, cycling over enough copies of the weights to exceed L2
several times; the median of --reps replays, per launch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.backends.cuda import gemv, kernels  # noqa: E402
from engine.backends.cuda.weights import to_activation, upload_weight  # noqa: E402
from engine.bench import synthetic_weight  # noqa: E402
from engine.loader import WeightTensor  # noqa: E402
from engine.weights.quant import GGMLType  # noqa: E402

COPY_BANDWIDTH = 4.2e12  # bytes/s, measured device-to-device copy on the H200
SHAPES = {  # name: (rows, cols, type)
    "8b-qkv": (6144, 4096, GGMLType.Q4_K),
    "8b-o": (4096, 4096, GGMLType.Q4_K),
    "8b-gate+up": (28672, 4096, GGMLType.Q4_K),
    "8b-down": (4096, 14336, GGMLType.Q4_K),
    "8b-head": (128256, 4096, GGMLType.Q6_K),
    "7b-down": (4096, 11008, GGMLType.Q4_K),
    "1b-gate+up": (16384, 2048, GGMLType.Q4_K),
    "70b-down": (8192, 28672, GGMLType.Q4_K),
    "70b-qkv": (10240, 8192, GGMLType.Q4_K),
    "70b-o": (8192, 8192, GGMLType.Q4_K),
    "70b-gate+up": (57344, 8192, GGMLType.Q4_K),
    "8b-o-q8_0": (4096, 4096, GGMLType.Q8_0),
    "8b-o-q4_0": (4096, 4096, GGMLType.Q4_0),
    "8b-o-f16": (4096, 4096, GGMLType.F16),
    "smollm2-gate+up": (3072, 576, GGMLType.Q4_1),
}
STEP_8B = ("8b-qkv", "8b-o", "8b-gate+up", "8b-down", "8b-head")  # the GEMVs of a Llama-3-8B decode step
BLOCKS_PER_SM = (1, 2, 4, 8)
BASE_OPTIONS = kernels.NVRTC_OPTIONS
CHECK_ROWS = 256
L2_BYTES = 50 << 20


def row_slice(tensor, rows: slice):
    """The WeightTensor of a row range."""
    n = tensor.shape[0]
    row_bytes = tensor.raw.size // n
    start, stop, _ = rows.indices(n)
    return WeightTensor(tensor.name, tensor.ggml_type, (stop - start, tensor.shape[1]),
                        tensor.raw[start * row_bytes:stop * row_bytes])


def baseline_module(cp, folder: Path):
    """quant.cu of another checkout (its gemv_<type>), f16 build."""
    parts = [(folder / "kernels" / f).read_text() for f in ("common.cuh", "dequant.cuh", "quant.cu")]
    return cp.RawModule(code="\n".join(parts), options=("-std=c++17",))


def time_launches(cp, launch, copies: int, reps: int, per_graph: int = 40) -> float:
    """Median seconds per launch; launch(i) runs on copy i % copies."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        launch(0)  # compile, opt in, warm
        stream.synchronize()
        stream.begin_capture()
        for i in range(per_graph):
            launch(i % copies)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        times = []
        for _ in range(reps):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / per_graph)
    return float(np.median(times))


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) if np.isfinite(got).all() else float("inf")


def build_variant(defines: str) -> str:
    """Rebuild the kernels with -DNAME=VALUE for each of `defines` ("NAME=VALUE,...", or "-" for gemv.cu's
    defaults); the variant's label suffix."""
    pairs = [] if defines == "-" else defines.split(",")
    kernels.NVRTC_OPTIONS = BASE_OPTIONS + tuple(f"-D{pair}" for pair in pairs)
    kernels._module.cache_clear()
    kernels._function.cache_clear()
    gemv._opted_in.clear()
    return "".join(f"/{pair}" for pair in pairs)


def time_gemv_add(cp, name, m, datas, copies, x_dev, model, picked, dtype, reps, label) -> list[dict]:
    """gemv_add (the output / down products' kernel: two rows at once, residual add) quantizing its input, then
    reading it staged (gemv.quantize_input, as dca_combine / gate_up write it); checked against the numpy model."""
    staged = cp.empty(gemv.staged_bytes(m.cols), dtype=cp.uint8)
    gemv.quantize_input(x_dev, staged, dtype)
    residual = cp.zeros(m.rows, dtype=cp.float32)
    results = []
    for variant, source in (("add", None), ("add+staged", staged)):
        def launch(i, source=source):
            m.data = datas[i]
            gemv.gemv_add(x_dev, m, residual, dtype, staged=source)

        residual.fill(0)
        launch(0)
        err = rel_err(picked(residual), model)
        seconds = time_launches(cp, launch, copies, reps)
        results.append(dict(shape=name, variant=f"{variant}/{label}", per_block=0, seconds=seconds, err_model=err,
                            err_float=float("nan"), ok=err < 5e-3))  # the act_t rounding of each product
    return results


def copies_of(cp, tensor, name: str, copies: int | None = None):
    """tensor on the device, as a DeviceMatrix and the list of its weight copies (enough to exceed L2 4x)."""
    m = upload_weight(cp, name, tensor)
    copies = copies or max(1, -(-4 * L2_BYTES // m.data.nbytes))
    return m, [m.data] + [m.data.copy() for _ in range(copies - 1)]


def normed_result(shape, variant, seconds, ok, err, nbytes, rows, cols, ggml_type, per_block=0) -> dict:
    return dict(shape=shape, variant=variant, per_block=per_block, seconds=seconds, err_model=err,
                err_float=float("nan"), ok=ok, mb=nbytes / 1e6, rows=rows, cols=cols, type=ggml_type.name,
                gbs=nbytes / seconds / 1e9, frac=nbytes / seconds / COPY_BANDWIDTH)


def time_normed(cp, reps: int, dtype: str = "f16") -> list[dict]:
    """The prenormed inputs at Llama-3-8B shapes (Q4_K, Q6_K head): qkv, gate_up and head staging their input
    (rms_scale + stage, as before) against reading it prenormed (copy_staged scaled by the summed partials), and
    gemv_add (o, down; reading a staged input as in the decode step) with and without the prenorm epilogue, each at
    the plain grid and at 32-row blocks (session 11's geometry, before the hand-off). Checks: the prenormed head against the numpy
    model (gemv.prenormed_q8, rel. error < 1e-5 on CHECK_ROWS rows at each end), qkv / gate_up against their staging
    launches within the two roundings' distance (< 1e-2), gemv_add's residual equal with and without the epilogue."""
    rng = np.random.default_rng(8)
    d, ffn, vocab, heads, kv, hd = 4096, 14336, 128256, 32, 8, 128
    x = (rng.standard_normal(d) * rng.uniform(0.1, 4, d)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    staged_host, partials_host = gemv.prenorm_outputs(x, w, gemv.prenorm_per_block(d))
    partials_host = partials_host.astype(np.float32)
    q8 = gemv.prenormed_q8(staged_host, partials_host, 1e-5)
    prenormed = gemv.Prenormed(cp.asarray(staged_host), cp.asarray(partials_host), len(partials_host))
    x_dev, w_dev = cp.asarray(x), cp.asarray(w)
    results = []

    def as_float(a):
        """A device output (fp32, or act_t) as host float32 values."""
        if a.dtype == cp.float32 or dtype == "f16":
            return cp.asnumpy(a).astype(np.float32)
        return (cp.asnumpy(a.view(cp.uint16)).astype(np.uint32) << 16).view(np.float32)

    def pair(shape, launch, output, copies, nbytes, rows, cols, ggml_type, check):
        """Time launch(i, prenormed or None) both ways; check(output() after the staging launch, after the
        prenormed one), host float32 arrays."""
        outs = []
        for variant, source in (("staging", None), ("prenormed", prenormed)):
            launch(0, source)
            outs.append(output())
            seconds = time_launches(cp, lambda i, source=source: launch(i, source), copies, reps)
            results.append(normed_result(shape, f"{variant}/{dtype}", seconds, True, float("nan"), nbytes, rows, cols,
                                         ggml_type))
        err, ok = check(*outs)
        results[-1].update(err_model=err, ok=ok)

    # head: logits of the Q6_K output matrix
    head_tensor = synthetic_weight("output", GGMLType.Q6_K, (vocab, d), rng, 1 / np.sqrt(d))
    head, head_datas = copies_of(cp, head_tensor, "output")
    logits = cp.empty(vocab, dtype=cp.float32)

    def launch_head(i, source):
        head.data = head_datas[i]
        gemv.head(x_dev, w_dev, 1e-5, head, logits, dtype, prenormed=source)

    checked = [row_slice(head_tensor, slice(0, CHECK_ROWS)), row_slice(head_tensor, slice(vocab - CHECK_ROWS, vocab))]
    head_model = np.concatenate([gemv.reference(None, t, q8) for t in checked])

    def check_head(staging, normed):
        err = rel_err(np.concatenate([normed[:CHECK_ROWS], normed[-CHECK_ROWS:]]), head_model)
        return err, err < 1e-5

    def check_close(staging, normed):
        err = rel_err(normed, staging)
        return err, err < 1e-2

    pair("8b-head", launch_head, lambda: as_float(logits), len(head_datas), head.data.nbytes, vocab, d,
         GGMLType.Q6_K, check_head)
    head_datas.clear()  # the weights' memory back before the next shape

    # gate_up: Q4_K gate and up rows, its output staged for the down product (as in the decode step)
    gate, gate_datas = copies_of(cp, synthetic_weight("blk.0.ffn_gate", GGMLType.Q4_K, (ffn, d), rng,
                                                      1 / np.sqrt(d)), "blk.0.ffn_gate")
    up, up_datas = copies_of(cp, synthetic_weight("blk.0.ffn_up", GGMLType.Q4_K, (ffn, d), rng, 1 / np.sqrt(d)),
                             "blk.0.ffn_up", len(gate_datas))
    act_type = to_activation(cp, cp.zeros(1, dtype=cp.float32), dtype).dtype
    gate_out, down_staged = cp.empty(ffn, dtype=act_type), cp.empty(gemv.staged_bytes(ffn), dtype=cp.uint8)

    def launch_gate_up(i, source):
        gate.data, up.data = gate_datas[i], up_datas[i]
        gemv.gate_up(x_dev, w_dev, 1e-5, gate, up, gate_out, dtype, out_staged=down_staged, prenormed=source)

    pair("8b-gate+up", launch_gate_up, lambda: as_float(gate_out), len(gate_datas), 2 * gate.data.nbytes, 2 * ffn,
         d, GGMLType.Q4_K, check_close)
    gate_datas.clear(), up_datas.clear()

    # qkv: Q4_K query, key and value rows, the key rotated and both stored in a cache row
    wq, q_datas = copies_of(cp, synthetic_weight("blk.0.attn_q", GGMLType.Q4_K, (heads * hd, d), rng,
                                                 1 / np.sqrt(d)), "blk.0.attn_q")
    (wk, k_datas), (wv, v_datas) = (copies_of(cp, synthetic_weight(f"blk.0.attn_{n}", GGMLType.Q4_K, (kv * hd, d),
                                                                   rng, 1 / np.sqrt(d)), f"blk.0.attn_{n}",
                                              len(q_datas)) for n in ("k", "v"))
    q_out = cp.empty(heads * hd, dtype=act_type)
    cache_k, cache_v = (cp.zeros((16, kv, hd), dtype=act_type) for _ in range(2))
    position = cp.asarray(np.array([3], np.int32))
    cos_t, sin_t = cp.ones((16, hd // 2), dtype=cp.float32), cp.zeros((16, hd // 2), dtype=cp.float32)

    def launch_qkv(i, source):
        wq.data, wk.data, wv.data = q_datas[i], k_datas[i], v_datas[i]
        gemv.qkv(x_dev, w_dev, 1e-5, wq, wk, wv, None, q_out, cache_k, cache_v, position, cos_t, sin_t, heads, kv,
                 hd, hd, 0, dtype, prenormed=source)

    def qkv_output():
        return np.concatenate([as_float(q_out), as_float(cache_k[3]).reshape(-1), as_float(cache_v[3]).reshape(-1)])

    pair("8b-qkv", launch_qkv, qkv_output, len(q_datas), 3 * wq.data.nbytes // 2, (heads + 2 * kv) * hd, d,
         GGMLType.Q4_K, check_close)
    q_datas.clear(), k_datas.clear(), v_datas.clear()

    # gemv_add: the o and down products, reading a staged input, with and without the prenorm epilogue
    normed_staged = cp.empty(gemv.staged_bytes(d), dtype=cp.uint8)
    partials = cp.empty(gemv.prenorm_blocks(d), dtype=cp.float32)
    arrivals = cp.zeros(d // 32, dtype=cp.uint32)
    for shape, cols in (("8b-o", heads * hd), ("8b-down", ffn)):
        m, datas = copies_of(cp, synthetic_weight("blk.0.ffn_down", GGMLType.Q4_K, (d, cols), rng, 1 / np.sqrt(cols)),
                             "blk.0.ffn_down")
        a = to_activation(cp, cp.asarray(rng.standard_normal(cols).astype(np.float32)), dtype)
        a_staged = cp.empty(gemv.staged_bytes(cols), dtype=cp.uint8)
        gemv.quantize_input(a, a_staged, dtype)
        residual = cp.empty(d, dtype=cp.float32)
        outs = {}
        prenorm = gemv.Prenorm(w_dev, normed_staged, partials, arrivals)
        for variant, per_block, prenorm, cluster in (
                ("add", None, None, False), ("add/32-row blocks", 32, None, False),
                ("add+prenorm", None, prenorm, False), ("add+prenorm/cluster", None, prenorm, True),
                ("add+prenorm/32-row blocks", 32, prenorm, False)):
            def launch(i, per_block=per_block, prenorm=prenorm, cluster=cluster):
                m.data = datas[i]
                gemv.CLUSTER_HANDOFF = cluster
                gemv.gemv_add(a, m, residual, dtype, per_block=per_block, staged=a_staged, prenorm=prenorm)

            residual[...] = x_dev
            normed_staged[...] = 0
            launch(0)
            outs[variant] = cp.asnumpy(residual)
            normed_outs = cp.asnumpy(normed_staged), cp.asnumpy(partials)
            if variant == "add+prenorm":
                handed_off = normed_outs
            seconds = time_launches(cp, launch, len(datas), reps)
            same = bool((outs[variant] == outs["add"]).all())
            if variant == "add+prenorm/cluster":  # the same staged bytes and partial sums as the atomic hand-off
                same &= all((mine == theirs).all() for mine, theirs in zip(normed_outs, handed_off))
            results.append(normed_result(shape, f"{variant}/{dtype}", seconds, same, 0.0 if same else float("inf"),
                                         m.data.nbytes, d, cols, GGMLType.Q4_K, per_block or gemv.tasks_per_block(d)))
        datas.clear()
    return results


def run_shape(cp, name, rows, cols, ggml_type, baseline, reps, dtype="f16", blocks_per_sm=BLOCKS_PER_SM,
              define_sets=("-",), add=False) -> list[dict]:
    rng = np.random.default_rng(rows + cols)
    tensor = synthetic_weight("output", ggml_type, (rows, cols), rng, 1 / np.sqrt(cols))
    m = upload_weight(cp, "output", tensor)  # fp32 out
    nbytes = m.data.nbytes
    copies = max(1, -(-4 * L2_BYTES // nbytes))
    datas = [m.data] + [m.data.copy() for _ in range(copies - 1)]
    x = rng.standard_normal(cols).astype(np.float32)
    x_dev = to_activation(cp, cp.asarray(x), dtype)
    x = cp.asnumpy(x_dev).astype(np.float32)  # the fp16 values the kernels read
    checked = [row_slice(tensor, slice(0, CHECK_ROWS)), row_slice(tensor, slice(rows - CHECK_ROWS, rows))]
    model = np.concatenate([gemv.reference(x, t) for t in checked])
    exact = np.concatenate([t.dequantize().astype(np.float64) @ x.astype(np.float64) for t in checked])
    y = cp.empty(rows, dtype=cp.float32)

    def picked(out):
        host = cp.asnumpy(out)
        return np.concatenate([host[:CHECK_ROWS], host[rows - CHECK_ROWS:]])

    results = []
    for bps, defines in [(b, d) for d in define_sets for b in blocks_per_sm]:
        label = build_variant(defines)
        per_block = gemv.tasks_per_block(rows, bps)

        def launch(i, per_block=per_block):
            m.data = datas[i]
            gemv.gemv(x_dev, m, y, dtype, per_block=per_block)

        y.fill(np.nan)
        launch(0)
        errs = (rel_err(picked(y), model), rel_err(picked(y), exact))
        ok = errs[0] < 1e-5 and (ggml_type in gemv.INT8_TYPES or errs[1] < 1e-5)
        seconds = time_launches(cp, launch, copies, reps)
        kind = "int8" if ggml_type in gemv.INT8_TYPES else "fp32"
        results.append(dict(shape=name, variant=f"{kind}/bps{bps}{label}",
                            per_block=per_block, seconds=seconds, err_model=errs[0], err_float=errs[1], ok=ok))
        if add and ggml_type in gemv.INT8_TYPES:
            results += time_gemv_add(cp, name, m, datas, copies, x_dev, model, picked, dtype, reps, f"bps{bps}{label}")
    if baseline is not None and 4 * cols <= 48 * 1024:
        fn = baseline.get_function(f"gemv_{m.suffix}")

        def launch(i):
            fn(((rows + 3) // 4,), (128,), (datas[i], x_dev, y, np.int32(rows), np.int32(cols),
                                            np.int64(m.data.shape[1]), np.int32(1)), shared_mem=4 * cols)

        y.fill(np.nan)
        launch(0)
        err = rel_err(picked(y), exact)
        seconds = time_launches(cp, launch, copies, reps)
        results.append(dict(shape=name, variant="baseline", per_block=4, seconds=seconds, err_model=float("nan"),
                            err_float=err, ok=err < 1e-5))
    m.data = datas[0]
    for r in results:
        r.update(mb=nbytes / 1e6, rows=rows, cols=cols, type=ggml_type.name, gbs=nbytes / r["seconds"] / 1e9,
                 frac=nbytes / r["seconds"] / COPY_BANDWIDTH)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="a checkout whose kernels/quant.cu holds the previous gemv_<type>")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bps", default=",".join(map(str, BLOCKS_PER_SM)), help="blocks per SM to try")
    ap.add_argument("--add", action="store_true", help="also time gemv_add, quantizing and reading a staged input")
    ap.add_argument("--normed", action="store_true", help="time the prenormed inputs at 8B shapes instead (qkv, "
                    "gate_up, head staging vs reading them; gemv_add with and without the prenorm epilogue)")
    ap.add_argument("--defines", default="-", help="';'-separated sets of gemv.cu macros to build and try, each "
                    "NAME=VALUE,... or - (gemv.cu's defaults)")
    args = ap.parse_args()
    import cupy as cp

    blocks_per_sm = tuple(int(b) for b in args.bps.split(","))

    baseline = baseline_module(cp, args.baseline) if args.baseline else None
    rows = time_normed(cp, args.reps) if args.normed else []
    for name in [] if args.normed else args.shapes.split(","):
        rows += run_shape(cp, name, *SHAPES[name], baseline, args.reps, blocks_per_sm=blocks_per_sm,
                          define_sets=tuple(args.defines.split(";")), add=args.add)
    print(f"| {'shape':<16} | {'rows x cols':>13} | {'type':<5} | {'MB':>6} | {'variant':<40} | {'tasks/blk':>9} | "
          f"{'us':>7} | {'GB/s':>6} | {'of 4.2':>6} | {'err model':>9} | {'err float':>9} | ok |")
    print("|" + "|".join("-" * (w + 2) for w in (16, 13, 5, 6, 40, 9, 7, 6, 6, 9, 9, 2)) + "|")
    for r in rows:
        print(f"| {r['shape']:<16} | {r['rows']:>6}x{r['cols']:<6} | {r['type']:<5} | {r['mb']:>6.1f} | "
              f"{r['variant']:<40} | {r['per_block']:>9} | {r['seconds'] * 1e6:>7.1f} | {r['gbs']:>6.0f} | "
              f"{r['frac']:>6.2f} | {r['err_model']:>9.1e} | {r['err_float']:>9.1e} | {'ok' if r['ok'] else 'NO'} |")
    gemvs = [r for r in rows if r["variant"].startswith(("int8/", "fp32/"))]
    variants = sorted({r["variant"].split("/", 1)[1] for r in gemvs})  # bpsN[/NAME=VALUE...]
    step = {v: sum(r["seconds"] for r in gemvs if r["shape"] in STEP_8B and r["variant"].endswith("/" + v))
            for v in variants}
    if step and all(step.values()) and all(any(r["shape"] == s for r in rows) for s in STEP_8B):
        print("8B step GEMVs (us) by variant: " + ", ".join(f"{v}: {t * 1e6:.0f}" for v, t in step.items()))
        best = min(step, key=step.get)
        print(f"best variant: {best}")
        if best.startswith("bps") and "/" not in best:
            print(f"best blocks_per_sm: {best[3:]}")
    if not all(r["ok"] for r in rows):
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()
