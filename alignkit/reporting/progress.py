"""Compare with a progress bar on stderr, for the CLI."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def compare_with_progress(ref: Any, tgt: Any, console: Console, **options: Any) -> Any:
    from alignkit.comparison import compare

    columns = (TextColumn("comparing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("compare", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return compare(ref, tgt, progress=advance, **options)


def ranks_with_progress(ref: Any, tgt: Any, console: Console, **options: Any) -> Any:
    from alignkit.comparison.ranks import compare_ranks

    columns = (TextColumn("comparing ranks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("ranks", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return compare_ranks(ref, tgt, progress=advance, **options)
