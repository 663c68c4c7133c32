"""``alignkit record``: a recording around an unmodified script."""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from alignkit.errors import RecordingError, UsageError
from alignkit.phrasing import count
from alignkit.recording import script
from alignkit.recording.auto import AutoWatch
from alignkit.recording.metadata import path_for_rank
from alignkit.recording.recorder import Recorder
from alignkit.storage.reader import open_dump

NOTHING_WATCHED = (
    "the script called nothing that alignkit watches by itself (a diffusers pipeline, a diffusers scheduler's step, "
    "an ONNX Runtime session): name its engine with --hook module:Class.method"
)


def record_command(
    output: Path,
    command: list[str],
    *,
    label: str | None = None,
    hooks: list[str] = (),
    step_on: list[str] = (),
    console: Console | None = None,
    repeat: int = 1,
    **filters: Any,
) -> int:
    """Record ``command``; returns the script's exit code (2 if recording itself failed).

    ``filters`` are the Recorder's: include, exclude, tensors, steps, layers, layer_filter.
    ``repeat`` > 1 runs it that many times and keeps each tensor's run-to-run spread
    (recording/repeat.py): the earlier runs go to scratch dumps beside ``output``.
    """
    console = console or Console(stderr=True)
    output = Path(path_for_rank(output))  # -o dump_{rank}.h5 under torchrun: this process's own dump
    if repeat < 1:
        raise UsageError(f"--repeat {repeat}: give the number of runs, 2 or more (1 records once)")
    scratch = [output.with_name(f".{output.name}.run{i}.h5") for i in range(1, repeat)]
    try:
        for path in scratch:
            code = _record_once(path, command, label, hooks, step_on, console, filters, None)
            if code != 0:
                return code
        earlier = [open_dump(path) for path in scratch]
        try:
            return _record_once(output, command, label, hooks, step_on, console, filters, earlier)
        finally:
            for dump in earlier:
                dump.close()
    finally:
        for path in scratch:
            path.unlink(missing_ok=True)


def _record_once(
    output: Path,
    command: list[str],
    label: str | None,
    hooks: list[str],
    step_on: list[str],
    console: Console,
    filters: dict[str, Any],
    spread_against: list[Any] | None,
) -> int:
    kind, target, argv = script.split_command(command)
    recorder = Recorder(output, label=label, command=shlex.join(command), spread_against=spread_against, **filters)
    auto = AutoWatch(recorder, hooks, step_on)
    with script.importing_as_the_script(kind, target):
        auto.install()  # resolves --hook targets first: a bad one fails before the run
    try:
        recorder.start()
    except BaseException:  # a dump that cannot be written: nothing runs, nothing stays patched
        auto.remove()
        raise
    code, error = 1, None
    try:
        code, error = script.run(kind, target, argv)
    finally:
        auto.remove()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                recorder.stop(error)
            except RecordingError as exc:
                console.print(f"alignkit: error: {exc}", markup=False, highlight=False, soft_wrap=True)
                code = code or 2
        for w in caught:
            console.print(
                f"alignkit: warning: {str(w.message).removeprefix('alignkit: ')}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    n = recorder.calls_recorded
    console.print(f"alignkit: recorded {count(n, 'call')} to {output}", markup=False, highlight=False, soft_wrap=True)
    if n == 0 and code == 0:
        console.print(f"alignkit: warning: {NOTHING_WATCHED}", markup=False, highlight=False, soft_wrap=True)
    return code
