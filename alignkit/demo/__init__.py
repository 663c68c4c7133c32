"""``alignkit demo``: the whole product on a tiny real Stable Diffusion pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from alignkit.comparison import Comparison, compare
from alignkit.demo.bugs import BUGS, EXPECTED_VERDICT, plant, scheduler_for
from alignkit.errors import UsageError
from alignkit.recording import record

__all__ = ["BUGS", "EXPECTED_VERDICT", "record_demo_pair", "run_demo"]


def record_demo_pair(bug: str, steps: int, dumps: Path, **options: Any) -> tuple[Path, Path]:
    """Record the reference run and the target run with ``bug`` planted; returns both paths.
    ``options`` go to the recorder (``mode="stats"``, ``layers=["unet"]``…)."""
    if bug not in BUGS:
        raise UsageError(f"unknown bug {bug!r}; choose one of: {', '.join(BUGS)}")
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    from alignkit.demo.pipeline import generate, tiny_pipeline

    dumps = Path(dumps)
    paths = dumps / "demo_ref.h5", dumps / "demo_tgt.h5"
    for path, planted, label in ((paths[0], "none", "torch-fp32"), (paths[1], bug, f"port ({bug})")):
        pipe = tiny_pipeline(seed=0, scheduler=scheduler_for(bug))
        plant(pipe, planted)
        with record(path, pipe, label=label, **options):
            generate(pipe, steps)
    return paths


def run_demo(
    bug: str = "timestep", steps: int = 12, dumps: Path = Path("dumps"), console: Console | None = None
) -> Comparison:
    """Record both runs and compare them."""
    console = console or Console(stderr=True)
    console.print(f"alignkit demo: planted bug '{bug}': {BUGS.get(bug, '?')}", highlight=False)
    ref, tgt = record_demo_pair(bug, steps, dumps)
    return compare(ref, tgt)
