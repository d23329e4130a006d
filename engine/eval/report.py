"""Results of the evaluations as text tables, JSON files and PNG plots.

JSON (``--json FILE``), version 1. Both kinds share:
    version: 1, kind: "ppl" | "passkey", complete: bool (false when interrupted: cells hold what finished),
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
    depths: [float], trials: int, seed: int, max_new_tokens: int,
    cells: [{method, length, depth, n_correct, trials, accuracy, seconds, load_seconds,
             results: [{key, output, correct, prompt_tokens, key_offset}]}]
Plots need matplotlib (an optional extra); ``require_matplotlib`` fails early with one clear error.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..config import DCAConfig
from ..errors import ConfigError
from .methods import method_settings, uses_dca
from .passkey import PasskeyCell, PasskeyPlan
from .ppl import PplCell, PplPlan

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


def _dca_json(plan: PplPlan | PasskeyPlan) -> dict[str, int] | None:
    if not any(uses_dca(m) for m in plan.methods):
        return None
    cfg = DCAConfig.for_training_length(plan.model.config.context_length, plan.settings.dca_chunk_size,
                                        plan.settings.dca_local_window)
    return {"chunk_size": cfg.chunk_size, "local_window": cfg.local_window}


def _common_json(kind: str, plan: PplPlan | PasskeyPlan, device: str, complete: bool) -> dict[str, Any]:
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
    out.update(depths=list(plan.depths), trials=plan.trials, seed=plan.seed, max_new_tokens=plan.max_new_tokens)
    out["cells"] = [{
        "method": c.method, "length": c.length, "depth": c.depth, "n_correct": c.n_correct,
        "trials": len(c.trials), "accuracy": c.accuracy, "seconds": round(c.seconds, 3),
        "load_seconds": round(c.load_seconds, 3),
        "results": [{"key": t.key, "output": t.output, "correct": t.correct, "prompt_tokens": t.prompt_tokens,
                     "key_offset": t.key_offset} for t in c.trials],
    } for c in cells]
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write JSON file {path}: {e}") from None


def check_output_path(path: Path | None, what: str) -> None:
    """Refuse, before any work, an output file whose folder does not exist."""
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
