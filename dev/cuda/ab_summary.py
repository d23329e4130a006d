"""ab_call.sh's summary: each variant's decode step (tools/profile_decode.py's "step N us") at each shape, the mean of
its rounds, against main's; and the variant to take on (the shortest step at the first shape, if at least --min-gain
percent below main's) written to --best as "TREE" or "TREE NAME=VALUE" for a define variant (dev/cuda/table_call.sh).

    python dev/cuda/ab_summary.py LOG_DIR [--min-gain 1] [--best FILE] main=TREE v29=TREE ... NAME=VALUE=TREE ...

A variant's log is LOG_DIR/profile_<name>.log: blocks opened by "### <shape>" (ab_call.sh), each with the profile's
step line. The first variant named is the baseline.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

STEP = re.compile(r"depth \d+: step (\d+) us")


def steps_by_shape(log: Path) -> dict[str, list[int]]:
    """shape -> the step times (us) of its rounds in one variant's log (a round that printed no step is skipped)."""
    steps: dict[str, list[int]] = {}
    shape = None
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("### "):
            shape = line[4:].strip()
        elif shape and (m := STEP.search(line)):
            steps.setdefault(shape, []).append(int(m.group(1)))
    return steps


def split_variant(arg: str) -> tuple[str, str, str | None]:
    """'name=TREE' -> (name, tree, None); a define variant 'NAME=VALUE=TREE' -> ('NAME=VALUE', tree, 'NAME=VALUE')."""
    head, tree = arg.rsplit("=", 1)
    return head, tree, head if "=" in head else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log_dir", type=Path)
    ap.add_argument("variants", nargs="+", help="name=TREE (the first is the baseline) or NAME=VALUE=TREE")
    ap.add_argument("--min-gain", type=float, default=1.0, help="percent below the baseline's step to take a variant")
    ap.add_argument("--best", type=Path, help="write the variant to take on here")
    args = ap.parse_args()
    variants = [split_variant(v) for v in args.variants]
    measured = {name: steps_by_shape(args.log_dir / f"profile_{name}.log") for name, _, _ in variants}
    base_name = variants[0][0]
    shapes = list(measured[base_name]) or sorted({s for m in measured.values() for s in m})
    print("| variant | " + " | ".join(f"{s} step us (vs {base_name})" for s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    mean = {name: {s: sum(v) / len(v) for s, v in m.items() if v} for name, m in measured.items()}
    for name, _, _ in variants:
        cells = []
        for s in shapes:
            if s not in mean[name]:
                cells.append("-")
                continue
            rounds = " / ".join(str(t) for t in measured[name][s])
            base = mean[base_name].get(s)
            change = f" ({100 * (mean[name][s] / base - 1):+.1f}%)" if base and name != base_name else ""
            cells.append(rounds + change)
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.best and shapes:
        first = shapes[0]
        base = mean[base_name].get(first)
        best_name, best_tree, best_define = variants[0]
        for name, tree, define in variants[1:]:
            t = mean[name].get(first)
            if base and t and t <= base * (1 - args.min_gain / 100) and t < mean[best_name].get(first, float("inf")):
                best_name, best_tree, best_define = name, tree, define
        args.best.write_text(f"{best_tree} {best_define or ''}".strip() + "\n")
        print(f"\ntaken on ({first}, at least {args.min_gain}% below {base_name}): {best_name}")


if __name__ == "__main__":
    main()
