"""`engine eval ppl` and `engine eval passkey` (click group ``eval_group``, registered by engine/cli.py).

Both commands validate everything before the first model load (methods, DCA settings, lengths against
the texts and against memory, output folders, matplotlib for --plot), show one progress bar on stderr,
print their table on stdout, and on Ctrl-C print what finished (JSON and plot too, marked incomplete)
and exit with status 130.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..backends import resolve_device
from ..options import LoadSettings, load_options
from .methods import METHODS, parse_depths, parse_lengths, parse_methods
from .passkey import plan_passkey, run_passkey
from .ppl import plan_ppl, run_ppl
from .progress import Progress, format_seconds
from .report import (check_output_path, passkey_json, passkey_table, plot_passkey, plot_ppl, ppl_json, ppl_table,
                     require_matplotlib, write_json)

INTERRUPTED_EXIT = 130
# the methods set DCA, Self-Extend, StreamingLLM and the RoPE scaling, the lengths the context: those load options
# do not apply
PER_METHOD = ("context", "dca", "rope_scaling", "rope_scale", "grp_attn_n", "grp_attn_w", "streaming_sinks",
              "streaming_window")


def _shared_options(f):
    for option in reversed([
        load_options(without=PER_METHOD),
        click.option("--lengths", required=True, help="comma-separated token counts, e.g. 2048,4096 or 2k,4k"),
        click.option("--ntk-factor", type=float, default=2.0, show_default=True,
                     help="NTK factor of the dca+ntk method beyond the training context"),
        click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
                     help="write the results as JSON (schema: engine/eval/report.py)"),
        click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
                     help="write a PNG plot (needs matplotlib)"),
    ]):
        f = option(f)
    return f


@click.group("eval")
def eval_group() -> None:
    """Long-context evaluation: perplexity and passkey retrieval per context-extension method."""


def _check_outputs(json_path: Path | None, plot_path: Path | None) -> None:
    check_output_path(json_path, "JSON file")
    check_output_path(plot_path, "plot")
    if plot_path is not None:
        require_matplotlib()


def _collect(cells: list, results, progress: Progress) -> bool:
    """Append every finished cell; True when Ctrl-C stopped the run."""
    try:
        with progress:
            for cell in results:
                cells.append(cell)
    except KeyboardInterrupt:
        return True
    return False


def _finish(interrupted: bool, n_done: int, n_cells: int, started: float) -> None:
    if interrupted:
        click.echo(f"interrupted: {n_done} of {n_cells} cells finished", err=True)
        sys.exit(INTERRUPTED_EXIT)
    click.echo(f"done: {n_cells} cells in {format_seconds(time.perf_counter() - started)}", err=True)


@eval_group.command("ppl")
@_shared_options
@click.option("--text", "texts", multiple=True, required=True, type=click.Path(path_type=Path),
              help="text file (repeatable; a folder means its *.txt files)")
@click.option("--method", "methods", default="rope,pi,ntk,dca", show_default=True,
              help="comma-separated: " + ",".join(METHODS))
@click.option("--windows", type=int, default=1, show_default=True,
              help="windows per file and length, consecutive from the file's start")
def ppl_command(settings: LoadSettings, lengths, ntk_factor, json_path, plot_path, texts, methods, windows) -> None:
    """Perplexity by evaluation length for each method, on the same token windows."""
    started = time.perf_counter()
    _check_outputs(json_path, plot_path)
    plan = plan_ppl(settings, texts, parse_lengths(lengths), parse_methods(methods), windows, ntk_factor)
    device_name = resolve_device(settings.device)
    tokens = ", ".join(f"{t.path.name} ({len(t.ids)} tokens)" for t in plan.texts)
    click.echo(f"model {plan.model_path.name} (training context {plan.model.config.context_length}) on "
               f"{device_name}; texts: {tokens}", err=True)
    cells: list = []
    progress = Progress(plan.total_flops(), "ppl")
    interrupted = _collect(cells, run_ppl(plan, progress), progress)
    click.echo(ppl_table(cells, plan.lengths, plan.methods))
    if json_path is not None:
        write_json(json_path, ppl_json(plan, cells, device_name, complete=not interrupted))
    if plot_path is not None and cells:
        plot_ppl(plot_path, cells, plan.lengths, plan.methods,
                 f"{plan.model.config.name or plan.model_path.name}: perplexity by length")
    _finish(interrupted, len(cells), len(plan.lengths) * len(plan.methods), started)


@eval_group.command("passkey")
@_shared_options
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True,
              help="comma-separated key positions as fractions of the prompt")
@click.option("--trials", type=int, default=1, show_default=True, help="prompts (keys) per length and depth")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random keys")
@click.option("--method", "methods", default="rope,dca", show_default=True,
              help="comma-separated: " + ",".join(METHODS))
@click.option("-n", "--n-predict", "n_predict", type=int, default=8, show_default=True,
              help="tokens generated (greedy) for the answer")
def passkey_command(settings: LoadSettings, lengths, ntk_factor, json_path, plot_path, depths, trials, seed, methods,
                    n_predict) -> None:
    """Passkey retrieval accuracy by prompt length and key depth for each method."""
    started = time.perf_counter()
    _check_outputs(json_path, plot_path)
    plan = plan_passkey(settings, parse_lengths(lengths), parse_depths(depths), parse_methods(methods), trials, seed,
                        n_predict, ntk_factor)
    device_name = resolve_device(settings.device)
    click.echo(f"model {plan.model_path.name} (training context {plan.model.config.context_length}) on "
               f"{device_name}", err=True)
    cells: list = []
    progress = Progress(plan.total_flops(), "passkey")
    interrupted = _collect(cells, run_passkey(plan, progress), progress)
    click.echo(passkey_table(cells, plan.lengths, plan.depths, plan.methods))
    if json_path is not None:
        write_json(json_path, passkey_json(plan, cells, device_name, complete=not interrupted))
    if plot_path is not None and cells:
        plot_passkey(plot_path, cells, plan.lengths, plan.depths, plan.methods,
                     f"{plan.model.config.name or plan.model_path.name}: passkey retrieval")
    _finish(interrupted, len(cells), len(plan.lengths) * len(plan.depths) * len(plan.methods), started)
