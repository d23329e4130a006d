"""Results of the evaluations as text tables, JSON files and PNG plots.

JSON (``--json FILE``), version 1. Both kinds share:
    version: 1, kind: "ppl" | "passkey" | "ruler", complete: bool (false when interrupted: cells hold what finished),
    model: {path, name, training_context}, device: "cpu" | "cuda", methods: [str], lengths: [int],
    dca: {chunk_size, local_window} | null (the DCA settings of the dca methods, defaults resolved),
    ntk_factor: float (the NTK factor of dca+ntk)
kind "ppl" adds:
    files: [{path, tokens}], windows: int (per file and length),
    cells: [{method, length, nll, ppl, n_tokens, seconds, load_seconds, rope_scaling, rope_scale, dca_on,
             self_extend: {group_size, window} | null, streaming: {sinks, window} | null}]
        nll: mean negative log-likelihood per scored token (nats), ppl = exp(nll),
        n_tokens: scored tokens (files * windows * (length - 1)), seconds: scoring time,
        load_seconds: loading the model (the run's first cell) or switching its layout (the others)
kind "passkey" adds:
    style: "landmark" | "spaced" (passkey.py), depths: [float], trials: int, seed: int, max_new_tokens: int,
    cells: [{method, length, depth, n_correct, trials, accuracy, seconds, load_seconds,
             results: [{key, output, correct, prompt_tokens, key_offset}]}]
kind "tune-dca" (engine/eval/tune.py) adds:
    files, windows, style, depths, trials, seed (the perplexity texts and the passkey prompts),
    default: {chunk_size, local_window}, chosen: {chunk_size, local_window} | null,
    candidates: [{chunk_size, local_window, ppl, retrieval, score, pareto, ppl_cells: [...], passkey_cells: [...]}]
        (the cells as in kinds "ppl" and "passkey", method "dca" with the candidate's settings)
kind "ruler" adds:
    tasks: [str], tokens_to_generate: {task: int}, samples: int (per task and length), seed: int,
    chat: bool (prompts in the model's chat template), haystack: str | null (--haystack FILE),
    cells: [{method, length, task, score, samples, seconds, load_seconds,
             results: [{prompt_tokens, expected: [str], output, score}]}],
        score: mean over the samples of the fraction of expected strings found in the output (in [0, 1]),
    averages: [{method, length, score, tasks}]: the mean score over the tasks finished at that length
kind "table" (engine/eval/table.py): the cells of all the kinds above but tune-dca, and their JSON.
Plots need matplotlib (an optional extra); ``require_matplotlib`` fails early with one clear error.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..api import resolve_dca
from ..errors import ConfigError
from .methods import method_settings, uses_dca
from .passkey import PasskeyCell, PasskeyPlan
from .ppl import PplCell, PplPlan
from .tune import CandidateResult, TunePlan, pareto_front, scores
from .ruler import RulerCell, RulerPlan
from .ruler_tasks import TASKS

JSON_VERSION = 1
MISSING = "-"


def length_label(n: int) -> str:
    """2048 -> '2k', 131072 -> '128k', 1000 -> '1000'."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def ppl_table(cells: Sequence[PplCell], lengths: Sequence[int], methods: Sequence[str]) -> str:
    """Methods as rows, lengths as columns, PPL in each cell ('-' where not measured)."""
    by_key = {(c.method, c.length): c for c in cells}
    rows = [[m] + [format_ppl(by_key[m, n].ppl) if (m, n) in by_key else MISSING for n in lengths]
            for m in methods]
    return _grid(["PPL"] + [length_label(n) for n in lengths], rows)


def passkey_table(cells: Sequence[PasskeyCell], lengths: Sequence[int], depths: Sequence[float],
                  methods: Sequence[str]) -> str:
    """One block per method: lengths as rows, depths as columns, 'correct/trials' in each cell."""
    by_key = {(c.method, c.length, c.depth): c for c in cells}
    blocks = []
    for m in methods:
        rows = []
        for n in lengths:
            row = [length_label(n)]
            done = [by_key[m, n, d] for d in depths if (m, n, d) in by_key]
            row += [f"{by_key[m, n, d].n_correct}/{len(by_key[m, n, d].trials)}" if (m, n, d) in by_key
                    else MISSING for d in depths]
            row.append(f"{sum(c.n_correct for c in done)}/{sum(len(c.trials) for c in done)}" if done else MISSING)
            rows.append(row)
        blocks.append(_grid([f"passkey {m}"] + [f"{d:g}" for d in depths] + ["all"], rows))
    return "\n\n".join(blocks)


def ruler_averages(cells: Sequence[RulerCell]) -> dict[tuple[str, int], tuple[float, int]]:
    """(method, length) -> (mean score over its finished tasks, number of tasks)."""
    scores: dict[tuple[str, int], list[float]] = {}
    for c in cells:
        scores.setdefault((c.method, c.length), []).append(c.score)
    return {key: (sum(v) / len(v), len(v)) for key, v in scores.items()}


def ruler_table(cells: Sequence[RulerCell], lengths: Sequence[int], tasks: Sequence[str],
                methods: Sequence[str]) -> str:
    """One block per method: tasks and their average as rows, lengths as columns, scores in percent."""
    by_key = {(c.method, c.length, c.task): c for c in cells}
    averages = ruler_averages(cells)
    blocks = []
    for m in methods:
        rows = [[t] + [f"{100 * by_key[m, n, t].score:.1f}" if (m, n, t) in by_key else MISSING for n in lengths]
                for t in tasks]
        rows.append(["average"] + [f"{100 * averages[m, n][0]:.1f}" if (m, n) in averages else MISSING
                                   for n in lengths])
        blocks.append(_grid([f"RULER % {m}"] + [length_label(n) for n in lengths], rows))
    return "\n\n".join(blocks)


def _dca_json(plan: PplPlan | PasskeyPlan | RulerPlan) -> dict[str, int] | None:
    if not any(uses_dca(m) for m in plan.methods):
        return None
    c = plan.model.config  # the sizes given, else the model's tuned ones, else the defaults
    cfg = resolve_dca("on", c.context_length, c.context_length, plan.settings.dca_chunk_size,
                      plan.settings.dca_local_window, c.tuned_dca)
    return {"chunk_size": cfg.chunk_size, "local_window": cfg.local_window}


def _common_json(kind: str, plan: PplPlan | PasskeyPlan | RulerPlan, device: str, complete: bool) -> dict[str, Any]:
    c = plan.model.config
    return {
        "version": JSON_VERSION,
        "kind": kind,
        "complete": complete,
        "model": {"path": str(plan.model_path), "name": c.name, "training_context": c.context_length},
        "device": device,
        "methods": list(plan.methods),
        "lengths": list(plan.lengths),
        "dca": _dca_json(plan),
        "ntk_factor": plan.ntk_factor,
    }


def ppl_json(plan: PplPlan, cells: Sequence[PplCell], device: str, complete: bool) -> dict[str, Any]:
    out = _common_json("ppl", plan, device, complete)
    out["files"] = [{"path": str(t.path), "tokens": int(len(t.ids))} for t in plan.texts]
    out["windows"] = plan.n_windows
    training = plan.model.config.context_length
    out["cells"] = []
    for c in cells:
        cell = method_settings(c.method, c.length, training, plan.settings, plan.ntk_factor)
        out["cells"].append({
            "method": c.method, "length": c.length, "nll": c.nll, "ppl": c.ppl, "n_tokens": c.n_tokens,
            "seconds": round(c.seconds, 3), "load_seconds": round(c.load_seconds, 3),
            "rope_scaling": cell.rope_scaling, "rope_scale": cell.rope_scale, "dca_on": cell.dca == "on",
            "self_extend": {"group_size": cell.grp_attn_n, "window": cell.grp_attn_w} if cell.grp_attn_n > 1 else None,
            "streaming": {"sinks": cell.streaming_sinks, "window": cell.streaming_window}
            if cell.streaming_window is not None else None,
        })
    return out


def passkey_json(plan: PasskeyPlan, cells: Sequence[PasskeyCell], device: str, complete: bool) -> dict[str, Any]:
    out = _common_json("passkey", plan, device, complete)
    out.update(style=plan.style, depths=list(plan.depths), trials=plan.trials, seed=plan.seed,
               max_new_tokens=plan.max_new_tokens)
    out["cells"] = [{
        "method": c.method, "length": c.length, "depth": c.depth, "n_correct": c.n_correct,
        "trials": len(c.trials), "accuracy": c.accuracy, "seconds": round(c.seconds, 3),
        "load_seconds": round(c.load_seconds, 3),
        "results": [{"key": t.key, "output": t.output, "correct": t.correct, "prompt_tokens": t.prompt_tokens,
                     "key_offset": t.key_offset} for t in c.trials],
    } for c in cells]
    return out


def tune_table(results: Sequence[CandidateResult], plan: TunePlan, chosen: CandidateResult) -> str:
    """One row per candidate: PPL and passkey accuracy per length, the overall ppl, retrieval and score;
    '*' marks the Pareto front, '<- chosen' the choice, '(default)' DCA's untuned settings."""
    lengths = plan.ppl.lengths
    rows = []
    for r, score, front in zip(results, scores(results), pareto_front(results)):
        ppl_by_length = {c.length: c.ppl for c in r.ppl_cells}
        passkey_by_length = {n: [t.correct for c in r.passkey_cells if c.length == n for t in c.trials]
                             for n in lengths}
        note = " <- chosen" if r is chosen else ""
        note += " (default)" if r.dca == plan.dca_default else ""
        rows.append([f"{r.dca.chunk_size}/{r.dca.local_window}{'*' if front else ''}"]
                    + [format_ppl(ppl_by_length[n]) for n in lengths]
                    + [f"{sum(v)}/{len(v)}" for v in passkey_by_length.values()]
                    + [format_ppl(r.ppl), f"{r.retrieval:.2f}", f"{score:+.3f}{note}"])
    header = (["cs/w"] + [f"PPL {length_label(n)}" for n in lengths]
              + [f"passkey {length_label(n)}" for n in lengths] + ["ppl", "retrieval", "score"])
    return _grid(header, rows)


def tune_json(plan: TunePlan, results: Sequence[CandidateResult], chosen: CandidateResult | None, device: str,
              complete: bool) -> dict[str, Any]:
    c = plan.ppl.model.config
    as_dict = lambda dca: {"chunk_size": dca.chunk_size, "local_window": dca.local_window}  # noqa: E731
    out = {"version": JSON_VERSION, "kind": "tune-dca", "complete": complete,
           "model": {"path": str(plan.ppl.model_path), "name": c.name, "training_context": c.context_length},
           "device": device, "lengths": list(plan.ppl.lengths), "files": ppl_json(plan.ppl, [], device, complete)["files"],
           "windows": plan.ppl.n_windows, "style": plan.passkey.style, "depths": list(plan.passkey.depths),
           "trials": plan.passkey.trials, "seed": plan.passkey.seed, "default": as_dict(plan.dca_default),
           "chosen": None if chosen is None else as_dict(chosen.dca), "candidates": []}
    for r, score, front in zip(results, scores(results), pareto_front(results)):
        ppl_cells = ppl_json(plan.ppl, r.ppl_cells, device, complete)["cells"]
        passkey_cells = passkey_json(plan.passkey, r.passkey_cells, device, complete)["cells"]
        out["candidates"].append({**as_dict(r.dca), "ppl": r.ppl, "retrieval": r.retrieval, "score": score,
                                  "pareto": front, "ppl_cells": ppl_cells, "passkey_cells": passkey_cells})
    return out


def ruler_json(plan: RulerPlan, cells: Sequence[RulerCell], device: str, complete: bool) -> dict[str, Any]:
    out = _common_json("ruler", plan, device, complete)
    out.update(tasks=list(plan.tasks), tokens_to_generate={t: TASKS[t].tokens_to_generate for t in plan.tasks},
               samples=plan.samples, seed=plan.seed, chat=plan.chat,
               haystack=None if plan.haystack is None else str(plan.haystack))
    out["cells"] = [{
        "method": c.method, "length": c.length, "task": c.task, "score": c.score, "samples": len(c.results),
        "seconds": round(c.seconds, 3), "load_seconds": round(c.load_seconds, 3),
        "results": [{"prompt_tokens": r.prompt_tokens, "expected": list(r.expected), "output": r.output,
                     "score": r.score} for r in c.results],
    } for c in cells]
    out["averages"] = [{"method": m, "length": n, "score": score, "tasks": n_tasks}
                       for (m, n), (score, n_tasks) in ruler_averages(cells).items()]
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write JSON file {path}: {e}") from None


def check_output_path(path: Path | None, what: str) -> None:
    """Refuse, before any work, an output file whose folder does not exist, or that is a folder."""
    if path is not None and Path(path).is_dir():
        raise ConfigError(f"{what} {path}: is a folder; give a file name")
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"{what} {path}: folder {Path(path).resolve().parent} does not exist")


def require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                          "(or the engine[plot] extra)") from None


def _save(fig, path: Path) -> None:
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise ConfigError(f"cannot write plot {path}: {e}") from None


def plot_ppl(path: Path, cells: Sequence[PplCell], lengths: Sequence[int], methods: Sequence[str],
             title: str) -> None:
    """PPL vs length, both axes logarithmic, one line per method."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for method in methods:
        points = sorted((c.length, c.ppl) for c in cells if c.method == method and math.isfinite(c.ppl))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    values = [c.ppl for c in cells if math.isfinite(c.ppl)]
    if values and max(values) < 10 * min(values):  # within a decade the labels come from minor ticks
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(list(lengths), [length_label(n) for n in lengths])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_passkey(path: Path, cells: Sequence[PasskeyCell], lengths: Sequence[int], depths: Sequence[float],
                 methods: Sequence[str], title: str) -> None:
    """One heat map per method: accuracy by length (rows) and depth (columns), 'correct/trials' written in."""
    import numpy as np
    from matplotlib.figure import Figure

    by_key = {(c.method, c.length, c.depth): c for c in cells}
    fig = Figure(figsize=(1.5 + 1.1 * len(depths) * len(methods), 1.4 + 0.45 * len(lengths)), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        acc = np.full((len(lengths), len(depths)), np.nan)
        for i, n in enumerate(lengths):
            for j, d in enumerate(depths):
                cell = by_key.get((method, n, d))
                if cell is not None:
                    acc[i, j] = cell.accuracy
                    ax.text(j, i, f"{cell.n_correct}/{len(cell.trials)}", ha="center", va="center", fontsize=8)
        image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_xlabel("depth")
        ax.set_title(method)
    axes[0].set_ylabel("prompt length")
    fig.colorbar(image, ax=list(axes), label="accuracy")
    fig.suptitle(title)
    _save(fig, path)


def plot_tune(path: Path, results: Sequence[CandidateResult], chosen: CandidateResult, title: str) -> None:
    """Perplexity (x) against retrieval (y) per candidate, labelled cs/w; the Pareto front joined, the choice ringed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter([r.ppl for r in results], [r.retrieval for r in results], color="tab:blue")
    for r in results:
        ax.annotate(f"{r.dca.chunk_size}/{r.dca.local_window}", (r.ppl, r.retrieval), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front = sorted((r.ppl, r.retrieval) for r, on in zip(results, pareto_front(results)) if on)
    ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:orange", label="Pareto front")
    ax.scatter([chosen.ppl], [chosen.retrieval], s=160, facecolors="none", edgecolors="tab:red", label="chosen")
    ax.set_xlabel("perplexity (mean over lengths)")
    ax.set_ylabel("passkey retrieval")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
def plot_ruler(path: Path, cells: Sequence[RulerCell], lengths: Sequence[int], methods: Sequence[str],
               title: str) -> None:
    """The average RULER score (percent) vs length, length axis logarithmic, one line per method."""
    from matplotlib.figure import Figure

    averages = ruler_averages(cells)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for method in methods:
        points = sorted((n, 100 * score) for (m, n), (score, _) in averages.items() if m == method)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [length_label(n) for n in lengths])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("RULER average score (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)
