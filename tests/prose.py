"""English prose for tests, from the interpreter itself: CPython ships its reference documentation
(~465k characters in ``pydoc_data.topics``), so no test needs text from outside the repository."""
from __future__ import annotations

import functools
import re


@functools.cache
def prose() -> str:
    """The documentation topics joined in a fixed order, markup-heavy lines (code, tables) left out."""
    from pydoc_data.topics import topics

    lines = []
    for name in sorted(topics):
        for line in topics[name].splitlines():
            line = line.strip()
            if len(line) > 40 and re.fullmatch(r"[A-Za-z0-9 ,.;:'\"()\-]+", line):
                lines.append(line)
    return "\n".join(lines)


def prose_lines() -> list[str]:
    return prose().splitlines()
