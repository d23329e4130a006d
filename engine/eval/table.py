"""`engine eval table`: issue 16's one table, perplexity, passkey (both prompt styles) and RULER for every
(method, length), from one command.

No measure is implemented here: the run is the runs of `engine eval ppl`, `engine eval passkey --style landmark`,
`engine eval passkey --style spaced` and `engine eval ruler` with the same settings (plan_ppl, plan_passkey,
plan_ruler validate everything before the first model load; run_ppl, run_passkey, run_ruler measure), one after the
other under one progress bar, so every cell equals what the single command gives for the same settings and seed.
Each of the four loads the model once, as the single commands do.

Tables (markdown): the summary, one row per method and for each length PPL | passkey landmark | passkey spaced |
RULER average (passkey: percent of the prompts answered over every depth and trial; RULER: percent); and RULER per
task, one row per (method, length).

JSON, version 1, kind "table": complete, model, device, methods, lengths, tasks (as report.py's other kinds), then
    cells: [{method, length, measure, task?, value}], measure one of MEASURES: "ppl" (perplexity),
        "passkey_landmark" / "passkey_spaced" (accuracy in [0, 1] over the depths and trials finished),
        "ruler" (with task: the task's score in [0, 1]), "ruler_average" (the mean over the tasks finished);
    ppl, passkey_landmark, passkey_spaced, ruler: the single commands' JSON (report.py), settings and every
        prompt's answer included.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..options import LoadSettings
from .passkey import STYLES, PasskeyPlan, plan_passkey, run_passkey
from .ppl import PplPlan, plan_ppl, run_ppl
from .progress import NoProgress
from .report import (JSON_VERSION, MISSING, format_ppl, length_label, passkey_json, ppl_json, ruler_averages,
                     ruler_json, _save)
from .ruler import RulerPlan, plan_ruler, run_ruler

MEASURES = ("ppl", "passkey_landmark", "passkey_spaced", "ruler", "ruler_average")
SUMMARY = (("ppl", "PPL"), ("passkey_landmark", "passkey landmark"), ("passkey_spaced", "passkey spaced"),
           ("ruler_average", "RULER %"))
PASSKEY_SEED, RULER_SEED = 0, 42  # the defaults of eval passkey and eval ruler


@dataclass(frozen=True)
class TablePlan:
    ppl: PplPlan
    landmark: PasskeyPlan
    spaced: PasskeyPlan
    ruler: RulerPlan

    @property
    def methods(self) -> tuple[str, ...]:
        return self.ppl.methods

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.ppl.lengths

    @property
    def model(self):
        return self.ppl.model

    @property
    def model_path(self) -> Path:
        return self.ppl.model_path

    def n_cells(self) -> int:
        per_method_length = 1 + len(self.landmark.depths) + len(self.spaced.depths) + len(self.ruler.tasks)
        return len(self.methods) * len(self.lengths) * per_method_length

    def total_flops(self) -> float:
        return sum(p.total_flops() for p in (self.ppl, self.landmark, self.spaced, self.ruler))


def plan_table(settings: LoadSettings, texts: Sequence[str | Path], lengths: Sequence[int], methods: Sequence[str],
               tasks: Sequence[str], samples: int = 4, trials: int = 1, seed: int | None = None,
               ntk_factor: float = 2.0) -> TablePlan:
    """The four single commands' plans (their defaults for what is not given); raises before any model work.
    seed None: each command's default (passkey 0, RULER 42)."""
    passkey_seed, ruler_seed = (PASSKEY_SEED, RULER_SEED) if seed is None else (seed, seed)
    ppl = plan_ppl(settings, texts, lengths, methods, ntk_factor=ntk_factor)
    landmark, spaced = (plan_passkey(settings, lengths, STYLES[style][1], methods, trials, passkey_seed,
                                     ntk_factor=ntk_factor, style=style) for style in ("landmark", "spaced"))
    ruler = plan_ruler(settings, lengths, tasks, methods, samples, ruler_seed, ntk_factor=ntk_factor)
    return TablePlan(ppl, landmark, spaced, ruler)


def run_table(plan: TablePlan, progress=NoProgress()) -> Iterator[tuple[str, Any]]:
    """(part, cell) for every cell, part "ppl", "passkey_landmark", "passkey_spaced" or "ruler", in that order."""
    parts = (("ppl", run_ppl(plan.ppl, progress)), ("passkey_landmark", run_passkey(plan.landmark, progress)),
             ("passkey_spaced", run_passkey(plan.spaced, progress)), ("ruler", run_ruler(plan.ruler, progress)))
    return itertools.chain.from_iterable(((part, cell) for cell in cells) for part, cells in parts)


def split(done: Sequence[tuple[str, Any]]) -> dict[str, list]:
    """The finished cells by part."""
    out: dict[str, list] = {"ppl": [], "passkey_landmark": [], "passkey_spaced": [], "ruler": []}
    for part, cell in done:
        out[part].append(cell)
    return out


def records(done: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The JSON's cells: {method, length, measure, task?, value} (module docstring)."""
    parts = split(done)
    out = [{"method": c.method, "length": c.length, "measure": "ppl", "value": c.ppl} for c in parts["ppl"]]
    for style in ("passkey_landmark", "passkey_spaced"):
        trials: dict[tuple[str, int], list[bool]] = {}
        for c in parts[style]:
            trials.setdefault((c.method, c.length), []).extend(t.correct for t in c.trials)
        out += [{"method": m, "length": n, "measure": style, "value": sum(v) / len(v)}
                for (m, n), v in trials.items()]
    out += [{"method": c.method, "length": c.length, "measure": "ruler", "task": c.task, "value": c.score}
            for c in parts["ruler"]]
    out += [{"method": m, "length": n, "measure": "ruler_average", "value": score}
            for (m, n), (score, _) in ruler_averages(parts["ruler"]).items()]
    return out


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def _format(measure: str, value: float | None) -> str:
    if value is None:
        return MISSING
    return format_ppl(value) if measure == "ppl" else f"{100 * value:.1f}"


def summary_table(cells: Sequence[dict[str, Any]], lengths: Sequence[int], methods: Sequence[str]) -> str:
    """One row per method; per length PPL, passkey landmark and spaced, RULER average (percent); '-' where missing."""
    value = {(c["method"], c["length"], c["measure"]): c["value"] for c in cells if "task" not in c}
    header = ["method"] + [f"{length_label(n)} {name}" for n in lengths for _, name in SUMMARY]
    rows = [[m] + [_format(measure, value.get((m, n, measure))) for n in lengths for measure, _ in SUMMARY]
            for m in methods]
    return _markdown(header, rows)


def ruler_task_table(cells: Sequence[dict[str, Any]], lengths: Sequence[int], methods: Sequence[str],
                     tasks: Sequence[str]) -> str:
    """One row per (method, length), a column per RULER task and the average, scores in percent."""
    value = {(c["method"], c["length"], c.get("task", c["measure"])): c["value"] for c in cells
             if c["measure"].startswith("ruler")}
    header = ["method", "length", *tasks, "average"]
    rows = [[m, length_label(n)] + [_format("ruler", value.get((m, n, t))) for t in (*tasks, "ruler_average")]
            for m in methods for n in lengths]
    return _markdown(header, rows)


def tables(plan: TablePlan, done: Sequence[tuple[str, Any]]) -> str:
    """The summary and the RULER per-task table of the finished cells."""
    cells = records(done)
    return (summary_table(cells, plan.lengths, plan.methods) + "\n\n"
            + ruler_task_table(cells, plan.lengths, plan.methods, plan.ruler.tasks))


def table_json(plan: TablePlan, done: Sequence[tuple[str, Any]], device: str, complete: bool) -> dict[str, Any]:
    parts = split(done)
    c = plan.model.config
    return {"version": JSON_VERSION, "kind": "table", "complete": complete,
            "model": {"path": str(plan.model_path), "name": c.name, "training_context": c.context_length},
            "device": device, "methods": list(plan.methods), "lengths": list(plan.lengths),
            "tasks": list(plan.ruler.tasks), "cells": records(done),
            "ppl": ppl_json(plan.ppl, parts["ppl"], device, complete),
            "passkey_landmark": passkey_json(plan.landmark, parts["passkey_landmark"], device, complete),
            "passkey_spaced": passkey_json(plan.spaced, parts["passkey_spaced"], device, complete),
            "ruler": ruler_json(plan.ruler, parts["ruler"], device, complete)}


def plot_table(path: Path, cells: Sequence[dict[str, Any]], lengths: Sequence[int], methods: Sequence[str],
               title: str) -> None:
    """One panel per summary measure against length (logarithmic), one line per method."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(16, 4), layout="constrained")
    axes = fig.subplots(1, len(SUMMARY))
    for ax, (measure, name) in zip(axes, SUMMARY):
        for method in methods:
            points = sorted((c["length"], c["value"] if measure == "ppl" else 100 * c["value"]) for c in cells
                            if c["method"] == method and c["measure"] == measure and "task" not in c
                            and math.isfinite(c["value"]))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(lengths), [length_label(n) for n in lengths])
        if measure == "ppl":
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda value, _pos: f"{value:g}"))
        else:
            ax.set_ylim(-2, 102)
        ax.set_xlabel("length (tokens)")
        ax.set_title(name if measure == "ppl" else f"{name}{'' if name.endswith('%') else ' %'}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    _save(fig, path)
