"""Where each kernel of a decode step spends its blocks' time: the ramp, the wait, the body, the tail.

On a tree with dev/cuda/trace_blocks.patch applied (a measurement variant: every decode kernel's blocks record their
grid, SM, start and end on the global nanosecond timer and their SM's cycle counter at the start, after pdl_wait and
at the end), runs one graph decode step of a preset shape and prints a line a kernel of the first layer, then each
kernel's medians over the layers:
  span   its last block's end minus the previous kernel's last end (what it adds to the step)
  ramp   its first block's start minus the previous kernel's last end (negative: resident before it ended)
  go     its first block past pdl_wait minus the previous kernel's last end (the dependency's resolution)
  wait   a block's median time in pdl_wait
  body   a block's time after pdl_wait, median and largest
  tail   its last block's end minus its median block's end (blocks of unequal work, or SMs given two blocks)
  last   its last block's start minus the previous kernel's last end (blocks that found no room until then)
  late%  its blocks that started after the previous kernel's last end, in percent (the rest were resident early)
  SMs    SMs that ran a block of it, and the most blocks one SM ran
The cycle counts become us at the rate the blocks' own timer and cycle counter agree on (the SM clock).

    python dev/cuda/block_trace.py --shape llama3-8b --depth 512 [--dtype bf16]    (on the patched tree)
Needs a GPU and CuPy.
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "dev" / "cuda"))

TRACE_RECORDS = 1 << 16  # common.cuh (patched): each module's buffer, in records (CuPy's get_global gives no size)
TRACE_WORDS = 8  # common.cuh (patched): grid, kind << 48 | sm << 32 | block, start ns, end ns, cycles x3, grid size
KINDS = {1: "gemv", 2: "gemv_add", 3: "qkv", 4: "gateup", 5: "head", 6: "head_ring", 7: "dca_decode",
         8: "dca_combine", 9: "dca_decode_q8"}


@dataclass
class Launch:
    kind: str
    grid_size: int
    sm: np.ndarray  # per traced block
    start_ns: np.ndarray
    end_ns: np.ndarray
    wait_ns: np.ndarray  # time in pdl_wait (0 where the block never waited)
    body_ns: np.ndarray  # after pdl_wait to the end (the whole block where it never waited)

    @property
    def go_ns(self) -> np.ndarray:
        return self.start_ns + self.wait_ns


def records(words: np.ndarray, count: int) -> np.ndarray:
    """The first `count` records of the trace buffer as a (count, TRACE_WORDS) uint64 array."""
    return np.asarray(words, np.uint64)[:count * TRACE_WORDS].reshape(count, TRACE_WORDS)


def cycles_per_ns(recs: np.ndarray) -> float:
    """The SM clock: the median of cycles / ns over blocks that ran at least 2 us (the timer may tick coarsely)."""
    ns = recs[:, 3].astype(np.float64) - recs[:, 2].astype(np.float64)
    cycles = recs[:, 6].astype(np.float64) - recs[:, 4].astype(np.float64)
    long_enough = ns >= 2000
    if not long_enough.any():
        raise SystemExit("error: no traced block ran 2 us: cannot tell the SM clock")
    return float(np.median(cycles[long_enough] / ns[long_enough]))


def launches(recs: np.ndarray) -> list[Launch]:
    """The traced launches in the order they started, one per (grid id, kind)."""
    rate = cycles_per_ns(recs)
    kind = (recs[:, 1] >> np.uint64(48)).astype(np.int64)
    sm = ((recs[:, 1] >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.int64)
    start_c, waited_c, end_c = (recs[:, i].astype(np.float64) for i in (4, 5, 6))
    waited = recs[:, 5] != 0
    wait_ns = np.where(waited, (waited_c - start_c) / rate, 0.0)
    body_ns = np.where(waited, end_c - waited_c, end_c - start_c) / rate
    out = []
    keys = np.stack([recs[:, 0], kind.astype(np.uint64)], axis=1)
    for key in np.unique(keys, axis=0):
        rows = (keys[:, 0] == key[0]) & (keys[:, 1] == key[1])
        out.append(Launch(KINDS.get(int(key[1]), f"kind{int(key[1])}"), int(recs[rows, 7][0]), sm[rows],
                          recs[rows, 2].astype(np.float64), recs[rows, 3].astype(np.float64), wait_ns[rows],
                          body_ns[rows]))
    out.sort(key=lambda launch: launch.start_ns.min())
    return out


def labels(seq: list[Launch]) -> list[str]:
    """Kind names with gemv_add told apart by its place in the layer: o (after the attention) or down."""
    names, after_attention = [], False
    for launch in seq:
        name = launch.kind
        if name in ("dca_combine", "dca_decode", "dca_decode_q8"):
            after_attention = True
        elif name == "gemv_add":
            name, after_attention = ("o" if after_attention else "down"), False
        names.append(name)
    return names


def rows(seq: list[Launch]) -> list[dict]:
    """A dict of us figures a launch (module docstring), each against the launch before it."""
    out = []
    for i, launch in enumerate(seq):
        prev_end = seq[i - 1].end_ns.max() if i else launch.start_ns.min()
        ends = launch.end_ns
        _, per_sm = np.unique(launch.sm, return_counts=True)
        out.append({
            "span": (ends.max() - prev_end) / 1e3,
            "ramp": (launch.start_ns.min() - prev_end) / 1e3,
            "go": (launch.go_ns.min() - prev_end) / 1e3,
            "wait": float(np.median(launch.wait_ns)) / 1e3,
            "body": float(np.median(launch.body_ns)) / 1e3,
            "body_max": float(launch.body_ns.max()) / 1e3,
            "tail": (ends.max() - np.median(ends)) / 1e3,
            "last": (launch.start_ns.max() - prev_end) / 1e3,
            "late%": 100.0 * float(np.mean(launch.start_ns > prev_end)) if i else 0.0,
            "blocks": f"{len(ends)}/{launch.grid_size}",
            "sms": f"{len(per_sm)}x{per_sm.max()}",
        })
    return out


COLUMNS = ("span", "ramp", "go", "wait", "body", "body_max", "tail", "last", "late%")


def table(names: list[str], figures: list[dict]) -> str:
    lines = ["| kernel | blocks | SMs x most | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for name, f in zip(names, figures):
        lines.append(f"| {name} | {f['blocks']} | {f['sms']} | " +
                     " | ".join(f"{f[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def per_kind_medians(names: list[str], figures: list[dict]) -> tuple[list[str], list[dict]]:
    """Each kernel's medians over the step's launches of it (the layers), in the order kernels first appear."""
    order = list(dict.fromkeys(names))
    medians = []
    for name in order:
        mine = [f for n, f in zip(names, figures) if n == name]
        entry = {c: float(np.median([f[c] for f in mine])) for c in COLUMNS}
        entry["blocks"], entry["sms"] = mine[0]["blocks"], f"({len(mine)} launches) " + mine[0]["sms"]
        medians.append(entry)
    return order, medians


def step_trace(shape: str, depth: int, dtype: str) -> tuple[np.ndarray, str]:
    """Run one graph decode step (ncu_step.ready_step's) with every module's trace buffer zeroed first -> (records,
    label)."""
    import cupy

    from engine.backends.cuda import kernels
    from ncu_step import ready_step

    modules = []
    build = kernels._module

    @functools.cache
    def recording(name, dtype_, instance, device):
        module = build(name, dtype_, instance, device)
        modules.append(module)
        return module

    kernels._module = recording  # before the model's kernels are built
    dec, tok, label = ready_step(shape, depth, dtype)
    traced = []
    for module in modules:
        try:
            count = module.get_global("g_trace_count")
            words = module.get_global("g_trace")
        except cupy.cuda.driver.CUDADriverError:  # no such symbol: a kernel file the patch does not touch
            continue
        traced.append((cupy.ndarray((1,), cupy.uint32, count), cupy.ndarray((TRACE_RECORDS * TRACE_WORDS,),
                                                                              cupy.uint64, words)))
    if not traced:
        raise SystemExit("error: no module holds g_trace: apply dev/cuda/trace_blocks.patch to this tree first")
    cupy.cuda.Device().synchronize()
    for count, _ in traced:
        count.fill(0)
    dec.step(tok)
    cupy.cuda.Device().synchronize()
    parts = []
    for count, words in traced:
        n = int(count.get()[0])
        if n > TRACE_RECORDS:
            raise SystemExit(f"error: {n} blocks traced, the buffer holds {TRACE_RECORDS}")
        parts.append(records(words.get(), n))
    return np.concatenate(parts), f"{label} {dtype}, depth {depth}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", help="a preset of engine bench --shape")
    ap.add_argument("--depth", type=int, default=512)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    recs, label = step_trace(args.shape, args.depth, args.dtype)
    seq = launches(recs)
    names, figures = labels(seq), rows(seq)
    total = (max(s.end_ns.max() for s in seq) - min(s.start_ns.min() for s in seq)) / 1e3
    print(f"\n{label}: {len(seq)} traced launches, {total:.1f} us first start to last end "
          f"(SM clock {cycles_per_ns(recs):.3f} GHz)")
    first_layer = names.index("qkv", names.index("qkv") + 1) if names.count("qkv") > 1 else len(names)
    print("\nThe first layer (us):\n" + table(names[:first_layer], figures[:first_layer]))
    order, medians = per_kind_medians(names, figures)
    print("\nMedians over the step's launches (us):\n" + table(order, medians))


if __name__ == "__main__":
    main()
