"""One progress bar on stderr for a whole evaluation run (click.progressbar), with time estimates.

Work is counted in flops (budget.prefill_flops), so the bar's ETA is the cost model calibrated on the
run so far: seconds per flop measured on the finished work times the flops left. Each cell (one
method at one length) gets the same estimate in the bar's label. When stderr is not a terminal,
click writes only the labels, one line per cell, so logs still show progress.
"""
from __future__ import annotations

import sys
import time

import click

BAR_STEPS = 10_000  # the bar's resolution; work is mapped onto these steps


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    def __init__(self, total_flops: float, title: str):
        self._flops_per_step = max(total_flops, 1.0) / BAR_STEPS
        self._bar = click.progressbar(length=BAR_STEPS, label=title, file=sys.stderr,
                                      show_eta=True, show_percent=True, width=24)
        self._done_flops = 0.0
        self._steps = 0
        self._started = time.perf_counter()

    def __enter__(self) -> "Progress":
        self._bar.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def seconds_per_flop(self) -> float | None:
        if self._done_flops <= 0:
            return None
        return (time.perf_counter() - self._started) / self._done_flops

    def start_cell(self, name: str, flops: float) -> None:
        """Announce a cell of `flops` work, with its estimated time once the rate is known."""
        rate = self.seconds_per_flop()
        label = name if rate is None else f"{name} (~{format_seconds(rate * flops)})"
        self._bar.label = label
        self._bar.render_progress()  # off a terminal, click writes each new label on its own line

    def advance(self, flops: float) -> None:
        self._done_flops += flops
        steps = min(int(self._done_flops / self._flops_per_step), BAR_STEPS)
        if steps > self._steps:
            self._bar.update(steps - self._steps)
            self._steps = steps


class NoProgress:
    """Same interface, shows nothing (library use)."""

    def start_cell(self, name: str, flops: float) -> None:
        pass

    def advance(self, flops: float) -> None:
        pass
