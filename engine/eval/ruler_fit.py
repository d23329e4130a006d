"""The largest haystack that fits: search n so that tokens(n) <= budget and tokens(n + 1) > budget.

tokens(n) is a prompt's token count with a haystack of n units (sentences, words, needles); it grows with n,
roughly linearly but not strictly (a seeded sample changes with n). RULER bisects over n; here Newton steps
on the measured tokens per unit find the boundary in a few tokenizations (each is a whole prompt, up to
128k tokens), then bisection closes the bracket.
"""
from __future__ import annotations

from typing import Callable

NEWTON_STEPS = 8  # then bisection


def largest_fitting(tokens: Callable[[int], int], budget: int, lo: int, guess: int | None = None) -> int | None:
    """The largest n >= lo found with tokens(n) <= budget and tokens(n + 1) > budget; None when tokens(lo) > budget.

    guess: a starting point (e.g. the previous sample's n); default: lo's count extrapolated from 2 * lo.
    """
    t_lo = tokens(lo)
    if t_lo > budget:
        return None
    fits, too_big = lo, None  # tokens(fits) <= budget < tokens(too_big)
    n = guess if guess is not None and guess > lo else 2 * lo
    step = 0
    while too_big is None or too_big - fits > 1:
        if too_big is not None:
            n = min(n, too_big - 1)
        n = max(n, fits + 1)
        t = tokens(n)
        if t <= budget:
            fits = n
        else:
            too_big = n
        step += 1
        per_unit = max((t - t_lo) / (n - lo), 1e-9)
        if step < NEWTON_STEPS:
            n += int((budget - t) // per_unit)  # up when below the budget, down (at least 1) when above
        elif too_big is None:
            n = 2 * n
        else:
            n = (fits + too_big) // 2
    return fits
