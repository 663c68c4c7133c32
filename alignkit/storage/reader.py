"""Read a dump: an index of calls and tensors as DataFrames, and keyed access to values.

::

    dump = alignkit.open_dump("dumps/ref.h5")
    dump.calls                      # one row per call: seq, submodel, step, call
    dump["unet", 3].inputs["timestep"]
    dump["unet@step3"], dump["unet:12"]   # by step, or by the submodel's 12th call
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from alignkit.errors import CallNotFoundError, DumpCorruptError, FormatVersionError, NotADumpError, os_reason
from alignkit.phrasing import count, ranges
from alignkit.storage.journal import finish_killed, journal_path
from alignkit.storage.layouts import TENSOR_COLUMNS, TensorInfo, Version1, Version2
from alignkit.storage.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IO_GROUPS,
    PIPELINE_CALLS,
    SUBMODELS,
    as_text,
    decode,
    split_row,
    unescape_name,
)

_INDEX_COLUMNS = ("seq", "submodel", "step", "call", "ordinal")


class Call:
    """One recorded call; tensors are read when asked for."""

    def __init__(self, dump: Dump, row: Any):
        self._dump = dump
        self.seq = int(row.seq)
        self.submodel = str(row.submodel)
        self.step = int(row.step)
        self.call = int(row.call)
        self.ordinal = int(row.ordinal)

    def __repr__(self) -> str:
        return f"<Call {self.submodel} step {self.step} call {self.call} (seq {self.seq})>"

    @property
    def error(self) -> str | None:
        """The exception the call raised, if it did."""
        return self._dump._layout.error(self.seq)

    def info(self, io: str) -> list[TensorInfo]:
        """The tensors of one side (inputs, outputs, layers), in recorded (creation) order."""
        return self._dump._layout.infos(self.seq, io)

    def _find(self, io: str, name: str) -> TensorInfo:
        infos = self.info(io)
        for info in infos:
            if info.name == name:
                return info
        names = ", ".join(t.name for t in infos) or "none"
        raise CallNotFoundError(f"{self!r} has no {io[:-1]} {name!r}; it has: {names}")

    def dataset(self, io: str, name: str) -> h5py.Dataset:
        """One tensor's h5py dataset, to read a large one in slices."""
        return self._dump.dataset(self._find(io, name).path)

    def source(self, io: str, name: str) -> str:
        """Where a tensor came from: ``torch``, ``numpy``, or ``python`` (a Python number)."""
        return str(self._dump.tensor_attrs(self._find(io, name).path).get("source", "torch"))

    def tensor(self, io: str, name: str) -> np.ndarray:
        """One tensor as numpy (bfloat16 widened to float32 exactly)."""
        info = self._find(io, name)
        return self._dump.read(info.path, info.dtype)

    def _all(self, io: str) -> dict[str, np.ndarray]:
        return {t.name: self._dump.read(t.path, t.dtype) for t in self.info(io)}

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return self._all("inputs")

    @property
    def outputs(self) -> dict[str, np.ndarray]:
        return self._all("outputs")

    @property
    def layers(self) -> dict[str, np.ndarray]:
        return self._all("layers")

    def values(self, io: str = "inputs") -> dict[str, Any]:
        """Non-tensor arguments (numbers, strings, flags), decoded from JSON; an attribute that
        is not JSON (another writer's) as its text."""
        return {k: _decoded(v) for k, v in self._dump._layout.values(self.seq, io).items()}


class Dump:
    """An open alignkit dump. Close it, or use it as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file, self._layout = _open(self.path)
        self._grown: dict[str, np.ndarray] = {}
        self._grown_lock = threading.Lock()

    def close(self) -> None:
        self._file.close()

    def prepare_for_threads(self) -> None:
        """Build the tables that reading builds on first use, so that threads reading calls at
        once find them made instead of each making its own."""
        _ = self.metadata, self.calls, self._by_seq
        self._layout.prepare()

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Dump {str(self.path)!r} label={self.label!r} calls={len(self.calls)}>"

    @cached_property
    def metadata(self) -> dict[str, Any]:
        out = {}
        for key, value in self._file.attrs.items():
            value = value.item() if isinstance(value, np.generic) else value
            if key in JSON_ATTRS and isinstance(value, str):
                value = _decoded(value)
            out[key] = value
        return out

    @property
    def label(self) -> str:
        return str(self.metadata.get("label") or self.path.stem)

    @cached_property
    def calls(self) -> pd.DataFrame:
        """One row per call in time order: seq, submodel, step, call, ordinal."""
        frame = self._layout.index[list(_INDEX_COLUMNS)]
        if self.metadata.get("step_source", "none") == "none" and (frame["step"] == 0).all():
            frame["step"], frame["call"] = frame["ordinal"], 0  # no step source: each call is a step
        return frame.reset_index(drop=True)

    @cached_property
    def tensors(self) -> pd.DataFrame:
        """One row per stored tensor: seq, submodel, step, call, io, name, dtype, shape, numel,
        and where its values are (``path``: a dataset, and ``#row`` for a row of a stack)."""
        frame = self._layout.frame(self.calls)
        if frame is not None:
            return frame
        rows = []
        for call in self:
            for io in IO_GROUPS:
                for t in call.info(io):
                    rows.append(
                        (
                            call.seq,
                            call.submodel,
                            call.step,
                            call.call,
                            io,
                            t.name,
                            t.dtype,
                            t.shape,
                            math.prod(t.shape),
                            t.path,
                        )
                    )
        return pd.DataFrame(rows, columns=TENSOR_COLUMNS)

    def read(self, path: str, dtype: str) -> np.ndarray:
        """The values of the tensor stored at ``path`` whose logical dtype is ``dtype`` (both as
        in :attr:`tensors`), whole, bfloat16 widened to float32 exactly. A row of a stack
        (version 2) is read with the rows after it, which the next calls ask for."""
        raw = self._layout.raw(path)
        stored = self._layout.stored(path)
        if stored == "whole":  # most are
            return decode(raw, dtype)
        if stored == "sample":
            return raw  # a statistics recording's sample, kept in float32 whatever the dtype
        grown = self._grows_from(path)
        if grown is not None:  # a KV cache stored as its new positions: the earlier ones first
            earlier, axis = grown
            cache = self._grown  # the last steps read: a loop reads them in order
            before = cache.get(earlier)
            if before is None:
                before = self.read(earlier, dtype)
            whole = np.concatenate([before, decode(raw, dtype)], axis=axis)
            with self._grown_lock:
                cache[path] = whole
                while len(cache) > GROWN_KEPT:
                    cache.pop(next(iter(cache)))
            return whole.copy()  # the caller's to change; the kept one stays as stored
        return decode(raw, dtype)

    def _grows_from(self, path: str) -> tuple[str, int] | None:
        """(the earlier tensor, the axis) of a tensor stored as what it added to it."""
        return self._layout.grows_from(path) if self._layout.stored(path) == "delta" else None

    def is_whole(self, path: str) -> bool:
        """Whether the dataset at ``path`` holds the whole tensor, alone (to stream it in blocks)."""
        return split_row(path)[1] < 0 and self._layout.stored(path) == "whole"

    def is_stats(self, path: str) -> bool:
        """Whether the tensor at ``path`` was recorded as statistics and a sample (``record --mode stats``)."""
        return self._samples and self._layout.stored(path) == "sample"

    @cached_property
    def _samples(self) -> bool:
        """Whether any tensor is a statistics sample (a statistics recording, or one made with
        ``--against``): most dumps are asked of every tensor, and hold none."""
        return self._layout.has_samples()

    def stats(self, path: str) -> dict[str, Any]:
        """A statistics recording's figures for the tensor at ``path`` (``stats_min``…)."""
        return self._layout.stats(path)

    def dataset(self, path: str) -> h5py.Dataset:
        """The h5py dataset at ``path`` (as in :attr:`tensors`), to read a large tensor in
        blocks rather than whole; its values are the stored bits (see ``dtype``). A tensor
        under 1 MiB is a row of a stack (``path#row``): read it with :meth:`read`."""
        dataset, row = split_row(path)
        if row >= 0:
            raise ValueError(f"{path} is row {row} of a stack of small tensors, not a dataset: read it with Dump.read")
        return self._file[dataset]

    def tensor_attrs(self, path: str) -> dict[str, Any]:
        """What is kept of the tensor at ``path`` beyond its values: ``source`` and ``device``
        where not torch and cpu, and a repeated recording's ``spread_rel_l1`` and ``spread_cos_dist``."""
        return self._layout.attrs(path)

    @property
    def submodels(self) -> list[str]:
        """Submodel names in order of first call."""
        return list(dict.fromkeys(self.calls["submodel"]))

    @cached_property
    def descriptions(self) -> dict[str, dict[str, Any]]:
        """What each watched submodel is: ``{"class": "diffusers...EulerDiscreteScheduler",
        "config": {...}}`` (a config only for diffusers and transformers objects), and for an
        engine what it computes in (``engine``, ``device``, ``inference_precision``,
        ``precision``: docs/format.md); empty for dumps written before this was recorded."""
        group = self._file.get(SUBMODELS)
        if not isinstance(group, h5py.Group):
            return {}
        out = {}
        for link, sub in group.items():
            attrs = sub.attrs
            entry: dict[str, Any] = {"class": as_text(attrs.get("class", ""))}
            config = _json(attrs, "config")
            if config is not None:
                entry["config"] = config
            entry.update((key, as_text(value)) for key, value in attrs.items() if key in ENGINE_ATTRS)
            out[as_text(attrs.get("name", unescape_name(link)))] = entry
        return out

    @cached_property
    def pipeline_calls(self) -> list[dict[str, Any]]:
        """Each call of a watched pipeline, in order: ``{"class": ..., "seq": where it began,
        "arguments": {"prompt": ..., "guidance_scale": ...}}``; empty where no pipeline was
        watched, and for dumps written before this was recorded."""
        group = self._file.get(PIPELINE_CALLS)
        if not isinstance(group, h5py.Group):
            return []
        out = []
        for link in sorted(group, key=lambda name: int(name) if name.isdigit() else -1):
            attrs = group[link].attrs
            out.append(
                {
                    "class": as_text(attrs.get("class", "")),
                    "seq": int(attrs.get("seq", -1)),
                    "arguments": _json(attrs, "arguments") or {},
                }
            )
        return out

    def steps(self, submodel: str) -> list[int]:
        return sorted(set(self.calls.loc[self.calls["submodel"] == submodel, "step"]))

    def call_at(self, seq: int) -> Call:
        """The call with sequence number ``seq`` (a row of :attr:`calls`)."""
        return self._by_seq[seq]

    @cached_property
    def _by_seq(self) -> dict[int, Call]:
        return {call.seq: call for call in self}

    def __iter__(self) -> Iterator[Call]:
        for row in self.calls.itertuples(index=False):
            yield Call(self, row)

    def __len__(self) -> int:
        return len(self.calls)

    def __getitem__(self, key: Any) -> Call:
        submodel, step, call, by_ordinal = _parse_key(key)
        frame = self.calls
        if submodel not in set(frame["submodel"]):
            raise CallNotFoundError(
                f"{self.path}: no submodel {submodel!r}; the dump has: {', '.join(self.submodels) or 'no calls'}"
            )
        rows = frame[frame["submodel"] == submodel]
        if by_ordinal:
            hit = rows[rows["ordinal"] == step]
            if hit.empty:
                raise CallNotFoundError(f"{submodel} has {count(len(rows), 'call')}: 0–{len(rows) - 1}")
        else:
            hit = rows[(rows["step"] == step) & (rows["call"] == call)]
            if hit.empty:
                steps = self.steps(submodel)
                if step not in steps:
                    raise CallNotFoundError(f"{submodel} has {count(len(steps), 'step')}: {ranges(steps) or 'none'}")
                n = int((rows["step"] == step).sum())
                raise CallNotFoundError(f"{submodel} has {count(n, 'call')} at step {step}: 0–{n - 1}")
        return Call(self, next(hit.itertuples(index=False)))


def open_dump(path: str | os.PathLike) -> Dump:
    """Open an alignkit dump for reading; refuses anything else with a one-line reason."""
    return Dump(path)


def _finish_killed(path: Path) -> None:
    """Complete the last flush of a recording killed while it made it (storage/journal.py)."""
    try:
        finish_killed(path)
    except OSError as exc:
        raise DumpCorruptError(
            f"{path}: its recording was killed while it flushed, and finishing that flush needs to write "
            f"the dump and remove {journal_path(path).name} ({os_reason(exc)})"
        ) from exc


def _open(path: Path) -> tuple[h5py.File, Version1 | Version2]:
    """The open file and its layout, with its index of calls read (here, so that a damaged dump
    is refused at once)."""
    if not path.exists():
        raise NotADumpError(f"{path}: no such file")
    if path.is_dir():
        raise NotADumpError(f"{path}: is a directory, not a dump")
    if path.stat().st_size == 0:
        raise NotADumpError(f"{path}: empty file, not an alignkit dump")
    _finish_killed(path)
    with open(path, "rb") as fh:
        signature = fh.read(8)
    if signature != b"\x89HDF\r\n\x1a\n":
        raise NotADumpError(f"{path}: not an HDF5 file, so not an alignkit dump")
    f = _open_h5(path)
    try:
        layout = (Version2 if _check_format(path, f) >= 2 else Version1)(f)
    except (NotADumpError, FormatVersionError):
        f.close()
        raise
    except Exception as exc:
        f.close()
        raise DumpCorruptError(f"{path}: truncated or damaged dump ({_short(exc)})") from exc
    return f, layout


GROWN_KEPT = 64  # grown tensors (KV caches) kept, whole, to read the next step's from
LOCK_WAIT = 2.0  # seconds a dump's lock is waited for: a child the recorded process forked may hold it a moment


def _open_h5(path: Path) -> h5py.File:
    """Open a dump for reading. Its lock may outlive its recording for a moment (a process the
    run forked holds a copy of the file until it exits): that is waited for, briefly."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            if "unable to lock" not in str(exc).lower():
                raise DumpCorruptError(f"{path}: truncated or damaged HDF5 file ({_short(exc)})") from exc
            if time.monotonic() > deadline:
                raise NotADumpError(f"{path}: is open for writing by another process") from exc
            time.sleep(0.05)


def _check_format(path: Path, f: h5py.File) -> int:
    """The dump's format version, once it is one this alignkit reads."""
    if f.attrs.get("format") != FORMAT_NAME:
        raise NotADumpError(f"{path}: an HDF5 file, but not an alignkit dump (no format={FORMAT_NAME!r} attribute)")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: dump format version {version} is newer than this alignkit reads ({FORMAT_VERSION}); upgrade "
            "alignkit"
        )
    return version


ENGINE_ATTRS = (  # a submodel's facts
    "engine",
    "device",
    "inference_precision",
    "precision",
    "quantized_layers",
    "input_types",
    "stateless_layers",
)
JSON_ATTRS = frozenset(
    {"versions", "calls_run", "filters", "filter_notes", "repeat", "imported_from", "against"}
)  # root attributes that hold JSON (docs/format.md)
_KEY = re.compile(r"^(?P<sub>.+?)(?:(?P<at>@step)(?P<step>\d+)(?::(?P<call>\d+))?|:(?P<ord>\d+))$")


def _parse_key(key: Any) -> tuple[str, int, int, bool]:
    """(submodel, step, call, by_ordinal) from ``("unet", 3[, 0])``, ``"unet@step3"`` or ``"unet:12"``."""
    if (
        isinstance(key, tuple)
        and len(key) in (2, 3)
        and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in key[1:])
    ):
        return str(key[0]), int(key[1]), int(key[2]) if len(key) == 3 else 0, False
    if isinstance(key, str):
        m = _KEY.match(key)
        if m and m.group("at"):
            return m.group("sub"), int(m.group("step")), int(m.group("call") or 0), False
        if m and m.group("ord") is not None:
            return m.group("sub"), int(m.group("ord")), 0, True
    raise CallNotFoundError(f"cannot read {key!r} as a call: use (submodel, step[, call]), 'unet@step3' or 'unet:12'")


def _decoded(value: Any) -> Any:
    """A JSON attribute's value; its text where it is not JSON."""
    try:
        return json.loads(as_text(value))
    except ValueError:
        return as_text(value)


def _json(attrs: h5py.AttributeManager, key: str) -> Any:
    """The JSON attribute ``key`` decoded; None where it is missing or not JSON."""
    if key not in attrs:
        return None
    try:
        return json.loads(as_text(attrs[key]))
    except ValueError:
        return None


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
