"""The importers' one writer: calls from any format, keyed and stored as a regular dump."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.errors import UsageError
from alignkit.recording.metadata import run_metadata
from alignkit.recording.tensors import capture
from alignkit.storage.records import CallRecord
from alignkit.storage.writer import DumpWriter

Named = list[tuple[str, Any]]


@dataclass
class Imported:
    """One call as another tool stored it."""

    submodel: str
    step: int
    call: int = 0
    inputs: Named = field(default_factory=list)
    outputs: Named = field(default_factory=list)
    layers: Named = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportSummary:
    path: Path
    calls: int
    tensors: int
    submodels: list[str]

    def __str__(self) -> str:
        return f"imported {self.calls} calls ({self.tensors} tensors) of {', '.join(self.submodels)} into {self.path}"


def write_dump(
    out: str | os.PathLike, calls: Iterable[Imported], fmt: str, source: Path, steps_given: bool
) -> ImportSummary:
    """Write ``calls`` in time order (by step, then call) with their keys; the source format
    and path go into the dump's metadata (``imported_from``)."""
    ordered = sorted(calls, key=lambda c: (c.step, c.call))
    if not ordered:
        raise UsageError(f"{source}: nothing to import")
    out = Path(out)
    origin = json.dumps({"format": fmt, "path": str(source.resolve())})
    writer = DumpWriter(out, {**run_metadata(f"{fmt}: {source.name}", command=""), "imported_from": origin})
    if steps_given:
        writer.set_attr("step_source", "imported")
    ordinals: collections.Counter = collections.Counter()
    tensors = 0
    try:
        for seq, c in enumerate(ordered):
            sides = [_tensors(named) for named in (c.inputs, c.outputs, c.layers)]
            tensors += sum(len(side) for side in sides)
            values = {key: json.dumps(value) for key, value in c.values.items()}
            record = CallRecord(seq, c.submodel, c.step, c.call, ordinals[c.submodel], *sides, values=values)
            ordinals[c.submodel] += 1
            writer.put(record)
    finally:
        writer.close({"calls_run": json.dumps(dict(ordinals))})
    return ImportSummary(out, len(ordered), tensors, list(ordinals))


def _tensors(named: Named) -> list:
    return [capture(name, np.asarray(value)) for name, value in named]


def load_npy(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """An ``.npy`` array or an ``.npz``'s arrays, never unpickling: a file that holds Python
    objects is refused in one line."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UsageError(f"{path}: holds pickled Python objects, which alignkit does not load") from exc
        raise UsageError(f"{path}: not a numpy file ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise UsageError(f"{path}: cannot be read as numpy ({exc})") from exc
