"""Words shared by alignkit's messages."""

from __future__ import annotations

import itertools
from collections.abc import Iterable


def count(n: int, noun: str) -> str:
    """``1 step``, ``3 steps``: a count with its noun, plural where English wants it."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def ranges(values: Iterable[int]) -> str:
    """``0–3, 7``: integers (steps) with each run of consecutive ones as a range."""
    runs = [
        list(run) for _, run in itertools.groupby(sorted(set(values)), key=lambda v, n=itertools.count(): v - next(n))
    ]
    return ", ".join(f"{run[0]}–{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
