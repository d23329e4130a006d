"""`engine eval ppl`, `engine eval passkey`, `engine eval ruler`, `engine eval tune-dca` and `engine eval table`
(click group ``eval_group``, registered by engine/cli.py).

The commands validate everything before the first model load (methods, DCA settings, lengths against
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
from ..convert.output import check_file_destination
from ..convert.requantize import copy_with_metadata
from ..options import LoadSettings, load_options
from .methods import METHODS, parse_depths, parse_lengths, parse_methods
from .passkey import STYLES, plan_passkey, run_passkey
from .ppl import plan_ppl, run_ppl
from .progress import Progress, format_seconds
from .report import (check_output_path, length_label, passkey_json, passkey_table, plot_passkey, plot_ppl, plot_ruler,
                     plot_tune, ppl_json, ppl_table, require_matplotlib, ruler_json, ruler_table, tune_json, tune_table,
                     write_json)
from .ruler import parse_tasks, plan_ruler, run_ruler
from .ruler_tasks import TASKS
from .table import plan_table, plot_table, records, run_table, table_json, tables
from .tune import choose, plan_tune, run_tune, tuned_metadata

INTERRUPTED_EXIT = 130
# the methods set DCA, Self-Extend, StreamingLLM and the RoPE scaling, the lengths the context: those load options
# do not apply
PER_METHOD = ("context", "dca", "rope_scaling", "rope_scale", "grp_attn_n", "grp_attn_w", "streaming_sinks",
              "streaming_window")


LENGTHS_OPTION = click.option("--lengths", required=True, help="comma-separated token counts, e.g. 2048,4096 or 2k,4k")
NTK_FACTOR_OPTION = click.option("--ntk-factor", type=float, default=2.0, show_default=True,
                                 help="NTK factor of the dca+ntk method beyond the training context")
OUTPUT_OPTIONS = [
    click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
                 help="write the results as JSON (schema: engine/eval/report.py)"),
    click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
                 help="write a PNG plot (needs matplotlib)"),
]


def _apply(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


_shared_options = _apply([load_options(without=PER_METHOD), LENGTHS_OPTION, NTK_FACTOR_OPTION, *OUTPUT_OPTIONS])


@click.group("eval")
def eval_group() -> None:
    """Long-context evaluation: perplexity, passkey retrieval and RULER per context-extension method."""


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


def _announce(plan, device_name: str, what: str) -> None:
    """The run's header on stderr: model, training context, device and what the run reads."""
    click.echo(f"model {plan.model_path.name} (training context {plan.model.config.context_length}) on "
               f"{device_name}; {what}", err=True)


def _run_grid(plan, title: str, run, table, to_json, plot, n_cells: int, device_name: str, json_path: Path | None,
              plot_path: Path | None, started: float) -> None:
    """Run a methods x lengths grid with one progress bar, then print its table and write its JSON and plot
    (what finished, when Ctrl-C stopped it)."""
    cells: list = []
    progress = Progress(plan.total_flops(), title)
    interrupted = _collect(cells, run(plan, progress), progress)
    click.echo(table(cells))
    if json_path is not None:
        write_json(json_path, to_json(plan, cells, device_name, complete=not interrupted))
    if plot_path is not None and cells:
        plot(plot_path, cells, f"{plan.model.config.name or plan.model_path.name}: ")
    _finish(interrupted, len(cells), n_cells, started)


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
    _announce(plan, device_name, f"texts: {tokens}")
    _run_grid(plan, "ppl", run_ppl, lambda cells: ppl_table(cells, plan.lengths, plan.methods), ppl_json,
              lambda path, cells, title: plot_ppl(path, cells, plan.lengths, plan.methods, title + "perplexity by length"),
              len(plan.lengths) * len(plan.methods), device_name, json_path, plot_path, started)


@eval_group.command("passkey")
@_shared_options
@click.option("--style", type=click.Choice(tuple(STYLES)), default="landmark", show_default=True,
              help="prompt: landmark = intro, filler, key line, filler, question on their own lines (Landmark "
                   "Attention's prompt); spaced = the same sentences in one space-joined paragraph")
@click.option("--depths", default=None,
              help="comma-separated key positions as fractions of the prompt [default: 0,0.25,0.5,0.75,1 for "
                   "landmark, 0.125,0.375,0.625,0.875 for spaced]")
@click.option("--trials", type=int, default=1, show_default=True, help="prompts (keys) per length and depth")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random keys")
@click.option("--method", "methods", default="rope,dca", show_default=True,
              help="comma-separated: " + ",".join(METHODS))
@click.option("-n", "--n-predict", "n_predict", type=int, default=8, show_default=True,
              help="tokens generated (greedy) for the answer")
def passkey_command(settings: LoadSettings, lengths, ntk_factor, json_path, plot_path, style, depths, trials, seed,
                    methods, n_predict) -> None:
    """Passkey retrieval accuracy by prompt length and key depth for each method."""
    started = time.perf_counter()
    _check_outputs(json_path, plot_path)
    depths = STYLES[style][1] if depths is None else parse_depths(depths)
    plan = plan_passkey(settings, parse_lengths(lengths), depths, parse_methods(methods), trials, seed,
                        n_predict, ntk_factor, style)
    device_name = resolve_device(settings.device)
    _announce(plan, device_name, f"{style} prompts")
    _run_grid(plan, "passkey", run_passkey, lambda cells: passkey_table(cells, plan.lengths, plan.depths, plan.methods),
              passkey_json, lambda path, cells, title: plot_passkey(path, cells, plan.lengths, plan.depths,
                                                                    plan.methods, title + "passkey retrieval"),
              len(plan.lengths) * len(plan.depths) * len(plan.methods), device_name, json_path, plot_path, started)


@eval_group.command("tune-dca")
@_apply([load_options(without=PER_METHOD + ("dca_chunk_size", "dca_local_window")), LENGTHS_OPTION, *OUTPUT_OPTIONS])
@click.option("--text", "texts", multiple=True, required=True, type=click.Path(path_type=Path),
              help="text file for the perplexity (repeatable; a folder means its *.txt files)")
@click.option("--windows", type=int, default=1, show_default=True, help="perplexity windows per file and length")
@click.option("--chunk-sizes", default=None,
              help="candidate chunk sizes: token counts (6144, 6k) or fractions of the training context L (3/4) "
                   "[default: L/2, 5L/8, 3L/4, 7L/8, L]")
@click.option("--local-windows", default=None,
              help="candidate local windows, as --chunk-sizes [default: L/16, L/8, L/4]")
@click.option("--style", type=click.Choice(tuple(STYLES)), default="spaced", show_default=True,
              help="passkey prompt style (as eval passkey)")
@click.option("--depths", default=None, help="passkey depths, fractions of the prompt [default: the style's]")
@click.option("--trials", type=int, default=1, show_default=True, help="passkey prompts per length and depth")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the passkeys")
@click.option("--write-gguf", "write_gguf", type=click.Path(path_type=Path), default=None,
              help="write a copy of the model's GGUF with the chosen settings in its metadata")
@click.option("--force", is_flag=True, help="overwrite an existing --write-gguf file")
def tune_dca_command(settings: LoadSettings, lengths, json_path, plot_path, texts, windows, chunk_sizes,
                     local_windows, style, depths, trials, seed, write_gguf, force) -> None:
    """Choose the DCA chunk size and local window: perplexity + passkey per candidate, the Pareto front, and the
    best score (retrieval - relative perplexity excess); optionally write them into a GGUF."""
    started = time.perf_counter()
    _check_outputs(json_path, plot_path)
    plan = plan_tune(settings, texts, parse_lengths(lengths), chunk_sizes, local_windows, windows,
                     None if depths is None else parse_depths(depths), trials, seed, style=style)
    if write_gguf is not None:
        if plan.ppl.model.file_format != "gguf":
            raise click.UsageError("--write-gguf needs a GGUF model (convert the HF folder with engine convert first)")
        check_file_destination(write_gguf, force, source=plan.ppl.model_path)
    _announce(plan.ppl, resolve_device(settings.device), f"{len(plan.candidates)} candidates")
    results: list = []
    progress = Progress(plan.total_flops(), "tune-dca")
    interrupted = _collect(results, run_tune(plan, progress), progress)
    chosen = choose(results, plan.dca_default) if results else None
    if results:
        click.echo(tune_table(results, plan, chosen))
    if json_path is not None:
        write_json(json_path, tune_json(plan, results, chosen, resolve_device(settings.device),
                                        complete=not interrupted))
    if plot_path is not None and chosen is not None:
        plot_tune(plot_path, results, chosen, f"{plan.ppl.model.config.name or plan.ppl.model_path.name}: DCA "
                                              f"settings at {', '.join(length_label(n) for n in plan.ppl.lengths)}")
    if chosen is not None and write_gguf is not None and not interrupted:
        copy_with_metadata(plan.ppl.model_path, write_gguf, tuned_metadata(chosen.dca), force=force, progress=False)
        click.echo(f"wrote {write_gguf}: DCA chunk size {chosen.dca.chunk_size}, local window "
                   f"{chosen.dca.local_window}", err=True)
    _finish(interrupted, len(results), len(plan.candidates), started)
@eval_group.command("ruler")
@_shared_options
@click.option("--tasks", default="all", show_default=True,
              help="comma-separated RULER tasks: " + ", ".join(TASKS) + " (or all)")
@click.option("--samples", type=int, default=4, show_default=True, help="prompts per task and length")
@click.option("--seed", type=int, default=42, show_default=True, help="seed of the generated prompts")
@click.option("--method", "--methods", "methods", default="rope,dca", show_default=True,
              help="comma-separated: rope,pi,ntk,dynamic,yarn,dca,dca+ntk")
@click.option("--haystack", type=click.Path(path_type=Path), default=None,
              help="text file for the essay haystacks (niah_single_2/3, niah_multikey_1, niah_multivalue, "
                   "niah_multiquery) [default: generated essay-like text]")
@click.option("--chat/--no-chat", default=None,
              help="wrap each prompt in the model's chat template (RULER's chat templates) or not (its base "
                   "template) [default: chat when the model has a template]")
def ruler_command(settings: LoadSettings, lengths, ntk_factor, json_path, plot_path, tasks, samples, seed, methods,
                  haystack, chat) -> None:
    """RULER's synthetic tasks (needle retrieval, variable tracking, common and frequent words), generated offline.

    Each prompt is fitted to the length (prompt + the task's answer tokens <= length); answers are greedy and
    scored as RULER does (fraction of the expected strings in the output). Prints a table of scores in percent
    per method, task and length, and their average per method and length.
    """
    started = time.perf_counter()
    _check_outputs(json_path, plot_path)
    plan = plan_ruler(settings, parse_lengths(lengths), parse_tasks(tasks), parse_methods(methods), samples, seed,
                      chat, haystack, ntk_factor)
    device_name = resolve_device(settings.device)
    _announce(plan, device_name, f"{'chat' if plan.chat else 'base'} prompts")
    _run_grid(plan, "ruler", run_ruler, lambda cells: ruler_table(cells, plan.lengths, plan.tasks, plan.methods),
              ruler_json, lambda path, cells, title: plot_ruler(path, cells, plan.lengths, plan.methods,
                                                                title + "RULER average"),
              len(plan.lengths) * len(plan.tasks) * len(plan.methods), device_name, json_path, plot_path, started)


@eval_group.command("table")
@_shared_options
@click.option("--text", "texts", multiple=True, required=True, type=click.Path(path_type=Path),
              help="text file for the perplexity (repeatable; a folder means its *.txt files)")
@click.option("--method", "--methods", "methods", default="rope,pi,ntk,yarn,self-extend,streaming,dca,dca+ntk",
              show_default=True, help="comma-separated: " + ",".join(METHODS))
@click.option("--tasks", default="all", show_default=True,
              help="comma-separated RULER tasks: " + ", ".join(TASKS) + " (or all)")
@click.option("--samples", type=int, default=4, show_default=True, help="RULER prompts per task and length")
@click.option("--trials", type=int, default=1, show_default=True,
              help="passkey prompts (keys) per length and depth, in each style")
@click.option("--seed", type=int, default=None,
              help="seed of the passkeys and the RULER prompts [default: 0 for passkey, 42 for RULER, as their "
                   "commands]")
def table_command(settings: LoadSettings, lengths, ntk_factor, json_path, plot_path, texts, methods, tasks, samples,
                  trials, seed) -> None:
    """Issue 16's one table: perplexity, passkey in both prompt styles (their default depths) and RULER per method
    and length, the runs of eval ppl, eval passkey --style landmark|spaced and eval ruler with the same settings.

    Prints the summary (markdown, a row per method: per length PPL, passkey landmark and spaced in percent of the
    prompts, RULER average in percent) and RULER per task (a row per method and length)."""
    started = time.perf_counter()
    _check_outputs(json_path, plot_path)
    plan = plan_table(settings, texts, parse_lengths(lengths), parse_methods(methods), parse_tasks(tasks), samples,
                      trials, seed, ntk_factor)
    device_name = resolve_device(settings.device)
    _announce(plan, device_name, f"ppl texts {', '.join(t.path.name for t in plan.ppl.texts)}; passkey "
              f"landmark and spaced prompts; RULER {'chat' if plan.ruler.chat else 'base'} prompts")
    _run_grid(plan, "table", run_table, lambda done: tables(plan, done), table_json,
              lambda path, done, title: plot_table(path, records(done), plan.lengths, plan.methods,
                                                   title + "the methods by length"),
              plan.n_cells(), device_name, json_path, plot_path, started)
