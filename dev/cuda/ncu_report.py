"""One line a kernel from Nsight Compute's raw CSV (`ncu -i REPORT --csv --page raw --print-units base`).

For each profiled kernel: its grid and registers, its time, the DRAM bytes it read and at what rate, DRAM
throughput against the peak, how much of the kernel's time the SMs were active (sm__cycles_active / elapsed:
what the ramp and tail leave), achieved occupancy, L2 hit rate, issue-slot use, and its largest warp stall
reasons (warps stalled per issued instruction, by reason: long_scoreboard = waiting on global memory, barrier =
__syncthreads, membar = fences, lg_throttle = the load queue full, ...).

    python dev/cuda/ncu_report.py RAW.csv [--stalls 4] [--json]
Metrics missing from the report print as "-" (sections not collected, or another Nsight Compute's names).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

# value in base units = value * scale (ncu prints base units with --print-units base; other scales are accepted)
UNIT_SCALES = {
    "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0,
    "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
    "KB": 1e3, "MB": 1e6, "GB": 1e9,
}
STALL_PER_ISSUE = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
STALL_SAMPLES = re.compile(r"^smsp__pcsamp_warps_issue_stalled_(\w+)$")

FIELDS = {  # field: candidate metric names, first present wins
    "time_s": ["gpu__time_duration.sum"],
    "dram_read_bytes": ["dram__bytes_read.sum"],
    "dram_pct": ["dram__throughput.avg.pct_of_peak_sustained_elapsed",
                 "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"],
    "sm_active_cycles": ["sm__cycles_active.avg"],
    "sm_elapsed_cycles": ["sm__cycles_elapsed.avg", "gpc__cycles_elapsed.max"],
    "occupancy_pct": ["sm__warps_active.avg.pct_of_peak_sustained_active"],
    "l2_hit_pct": ["lts__t_sector_hit_rate.pct"],
    "issue_pct": ["smsp__issue_active.avg.pct_of_peak_sustained_active"],
    "registers": ["launch__registers_per_thread"],
    "grid": ["launch__grid_size"],
    "waves": ["launch__waves_per_multiprocessor"],
}


def number(text: str, unit: str = "") -> float | None:
    text = text.strip().replace(",", "")
    if text in ("", "n/a", "N/A"):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value * UNIT_SCALES.get(unit.strip(), 1.0)


def read_raw(path: Path) -> list[dict[str, tuple[str, str]]]:
    """The rows of a raw-page CSV: {column: (value, unit)} a kernel. The row after the header holds the units
    (its ID cell empty); lines before the header (ncu's ==PROF== notes) are skipped."""
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"error: {path} has no raw-page header (\"ID\",...)")
    rows = list(csv.reader(lines[start:]))
    header, body = rows[0], rows[1:]
    units = [""] * len(header)
    if body and body[0] and body[0][0].strip() == "":
        units, body = body[0], body[1:]
    return [{name: (row[i] if i < len(row) else "", units[i] if i < len(units) else "")
             for i, name in enumerate(header)} for row in body if row and row[0].strip()]


def stall_values(row: dict[str, tuple[str, str]], pattern: re.Pattern) -> dict[str, float]:
    """{reason: value} of the row's metrics matching pattern (group 1 the reason), the not_issued variants left out."""
    out = {}
    for metric, (value, unit) in row.items():
        match = pattern.match(metric)
        if match and not match.group(1).endswith("not_issued"):
            v = number(value, unit)
            if v is not None:
                out[match.group(1)] = v
    return out


def summarize(row: dict[str, tuple[str, str]], n_stalls: int) -> dict:
    def field(name: str) -> float | None:
        for metric in FIELDS[name]:
            if metric in row:
                value = number(*row[metric])
                if value is not None:
                    return value
        return None

    out = {"kernel": row.get("Kernel Name", ("?", ""))[0]}
    for name in FIELDS:
        out[name] = field(name)
    t, read = out["time_s"], out["dram_read_bytes"]
    out["dram_read_TBps"] = read / t / 1e12 if t and read is not None else None
    active, elapsed = out["sm_active_cycles"], out["sm_elapsed_cycles"]
    out["sm_active_pct"] = 100.0 * active / elapsed if active is not None and elapsed else None
    stalls = stall_values(row, STALL_PER_ISSUE)
    out["stall_kind"] = "warps per issue"
    if not stalls:  # PC sampling counts instead: shares of the samples
        counts = stall_values(row, STALL_SAMPLES)
        total = sum(counts.values())
        stalls = {k: 100.0 * v / total for k, v in counts.items()} if total else {}
        out["stall_kind"] = "% of samples"
    out["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:n_stalls])
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summaries: list[dict]) -> str:
    lines = ["| kernel | grid | regs | us | DRAM read MB | TB/s | DRAM % peak | SM active % | occupancy % | L2 hit % "
             "| issue % | top stalls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        stalls = ", ".join(f"{k} {v:.2f}" for k, v in s["stalls"].items()) or "-"
        read = None if s["dram_read_bytes"] is None else s["dram_read_bytes"] / 1e6
        us = None if s["time_s"] is None else s["time_s"] * 1e6
        lines.append(f"| {s['kernel'][:40]} | {fmt(s['grid'], '.0f')} | {fmt(s['registers'], '.0f')} "
                     f"| {fmt(us, '.2f')} | {fmt(read, '.2f')} | {fmt(s['dram_read_TBps'], '.2f')} "
                     f"| {fmt(s['dram_pct'], '.1f')} | {fmt(s['sm_active_pct'], '.1f')} "
                     f"| {fmt(s['occupancy_pct'], '.1f')} | {fmt(s['l2_hit_pct'], '.1f')} "
                     f"| {fmt(s['issue_pct'], '.1f')} | {stalls} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw_csv", type=Path)
    ap.add_argument("--stalls", type=int, default=4, help="stall reasons a kernel (largest first)")
    ap.add_argument("--json", action="store_true", help="one JSON object a kernel instead of the table")
    args = ap.parse_args(argv)
    summaries = [summarize(row, args.stalls) for row in read_raw(args.raw_csv)]
    if args.json:
        for s in summaries:
            print(json.dumps(s))
    else:
        print(table(summaries))


if __name__ == "__main__":
    main(sys.argv[1:])
