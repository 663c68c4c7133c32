"""Compare with a progress bar on stderr, for the CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def compare_with_progress(ref: Any, tgt: Any, console: Console, **options: Any) -> Any:
    from alignkit.comparison import compare

    return _with_bar("comparing", compare, ref, tgt, console, options)


def ranks_with_progress(ref: Any, tgt: Any, console: Console, **options: Any) -> Any:
    from alignkit.comparison.ranks import compare_ranks

    return _with_bar("comparing ranks", compare_ranks, ref, tgt, console, options)


def _with_bar(what: str, compare: Callable[..., Any], ref: Any, tgt: Any, console: Console, options: dict) -> Any:
    """``compare(ref, tgt, progress=…, **options)`` with a bar that its progress moves (only on a terminal)."""
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return compare(ref, tgt, progress=advance, **options)
