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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from alignkit.errors import CallNotFoundError, DumpCorruptError, FormatVersionError, NotADumpError, os_reason
from alignkit.phrasing import count, ranges
from alignkit.storage.journal import finish_killed, journal_path
from alignkit.storage.schema import (
    CALLS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX,
    IO_GROUPS,
    PIPELINE_CALLS,
    STATS_FIGURES,
    SUBMODELS,
    TENSORS,
    call_group_name,
    decode,
    logical_dtype,
    tensor_name,
    tensor_path,
    unescape_name,
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is, without reading it."""

    io: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str


class Call:
    """One recorded call; tensors are read when asked for."""

    def __init__(self, dump: Dump, row: Any):
        self._dump = dump
        self.seq = int(row.seq)
        self.submodel = str(row.submodel)
        self.step = int(row.step)
        self.call = int(row.call)
        self.ordinal = int(row.ordinal)
        self.group_path = call_group_name(self.seq)

    def __repr__(self) -> str:
        return f"<Call {self.submodel} step {self.step} call {self.call} (seq {self.seq})>"

    @property
    def _group(self) -> h5py.Group:
        return self._dump._file[self.group_path]

    @property
    def error(self) -> str | None:
        """The exception the call raised, if it did."""
        value = self._group.attrs.get("error")
        return str(value) if value is not None else None

    def info(self, io: str) -> list[TensorInfo]:
        """The tensors of one side (inputs, outputs, layers), in recorded (creation) order."""
        return self._dump._infos(self, io)

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
        return str(self.dataset(io, name).attrs.get("source", "torch"))

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
        group = self._group.get(io)
        return {} if group is None else {k: _decoded(v) for k, v in group.attrs.items()}


class Dump:
    """An open alignkit dump. Close it, or use it as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file, self._index = _open(self.path)
        self._grown: dict[str, np.ndarray] = {}
        self._grown_lock = threading.Lock()

    def close(self) -> None:
        self._file.close()

    def prepare_for_threads(self) -> None:
        """Build the tables that reading builds on first use, so that threads reading calls at
        once find them made instead of each making its own."""
        _ = self.metadata, self.calls, self._tensor_table, self._by_seq

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
        frame = self._index
        if self.metadata.get("step_source", "none") == "none" and (frame["step"] == 0).all():
            frame["step"], frame["call"] = frame["ordinal"], 0  # no step source: each call is a step
        return frame.reset_index(drop=True)

    @cached_property
    def tensors(self) -> pd.DataFrame:
        """One row per stored tensor: seq, submodel, step, call, io, name, dtype, shape, numel,
        and the HDF5 path of its dataset."""
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
        columns = ["seq", "submodel", "step", "call", "io", "name", "dtype", "shape", "numel", "path"]
        return pd.DataFrame(rows, columns=columns)

    @cached_property
    def _tensor_table(self) -> dict[tuple[int, str], list[TensorInfo]] | None:
        """The tensors of every call from ``/tensors``, keyed by (seq, io); None when the dump
        has no table to trust (a killed run), and each call's groups are listed instead."""
        return _read_tensor_table(self._file, len(self.calls))

    def _infos(self, call: Call, io: str) -> list[TensorInfo]:
        table = self._tensor_table
        if table is None:
            return _list_tensors(self._file, call.group_path, io)
        return table.get((call.seq, io), [])

    def read(self, path: str, dtype: str) -> np.ndarray:
        """The values of the tensor stored at ``path`` whose logical dtype is ``dtype`` (both as
        in :attr:`tensors`), whole, bfloat16 widened to float32 exactly. The dataset is
        opened by path at HDF5's level: h5py's ``file[path]`` costs several times more, which
        shows when a dump holds 100k small tensors."""
        ds = h5py.h5d.open(self._file.id, path.encode("utf-8"))
        raw = np.empty(ds.shape, dtype=ds.dtype)
        if raw.size:
            ds.read(h5py.h5s.ALL, h5py.h5s.ALL, raw)
        if self.is_stats(path):
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
        if not self.metadata.get("deltas"):
            return None
        attrs = self._file[path].attrs
        return (_text(attrs["grows_from"]), int(attrs["grows_axis"])) if "grows_from" in attrs else None

    def is_whole(self, path: str) -> bool:
        """Whether the dataset at ``path`` holds the whole tensor (to stream it in blocks)."""
        return self._grows_from(path) is None and not self.is_stats(path)

    def is_stats(self, path: str) -> bool:
        """Whether the tensor at ``path`` was recorded as statistics and a sample (``record --mode stats``)."""
        if self.metadata.get("mode") != "stats":
            return False
        return bool(h5py.h5a.exists(h5py.h5o.open(self._file.id, path.encode("utf-8")), b"stats_shape"))

    def stats(self, path: str) -> dict[str, Any]:
        """A statistics recording's figures for the tensor at ``path`` (``stats_min``…)."""
        attrs = self._file[path].attrs
        figures = dict(zip(STATS_FIGURES, (float(v) for v in attrs["stats"])))
        return {**figures, "stats_checksum": int(attrs["stats_checksum"])}

    def dataset(self, path: str) -> h5py.Dataset:
        """The h5py dataset at ``path`` (as in :attr:`tensors`), to read a large tensor in
        blocks rather than whole; its values are the stored bits (see ``dtype``)."""
        return self._file[path]

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
            entry: dict[str, Any] = {"class": _text(attrs.get("class", ""))}
            config = _json(attrs, "config")
            if config is not None:
                entry["config"] = config
            entry.update((key, _text(value)) for key, value in attrs.items() if key in ENGINE_ATTRS)
            out[_text(attrs.get("name", unescape_name(link)))] = entry
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
                    "class": _text(attrs.get("class", "")),
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


def _open(path: Path) -> tuple[h5py.File, pd.DataFrame]:
    """The open file and its index of calls (read here, so a damaged dump is refused at once)."""
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
        _check_format(path, f)
        index = _read_index(f)
    except (NotADumpError, FormatVersionError):
        f.close()
        raise
    except Exception as exc:
        f.close()
        raise DumpCorruptError(f"{path}: truncated or damaged dump ({_short(exc)})") from exc
    return f, index


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


def _check_format(path: Path, f: h5py.File) -> None:
    if f.attrs.get("format") != FORMAT_NAME:
        raise NotADumpError(f"{path}: an HDF5 file, but not an alignkit dump (no format={FORMAT_NAME!r} attribute)")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: dump format version {version} is newer than this alignkit reads ({FORMAT_VERSION}); upgrade "
            "alignkit"
        )


def _read_index(f: h5py.File) -> pd.DataFrame:
    calls = f.get(CALLS)
    n_groups = len(calls) if calls is not None else 0
    index = f.get(INDEX)
    if index is not None and index.shape[0] == n_groups:
        table = index[()]
        frame = pd.DataFrame({name: table[name] for name in table.dtype.names})
        frame["submodel"] = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in frame["submodel"]]
    else:  # a run that stopped between a call and its index row: rebuild from the groups
        rows = [
            {k: g.attrs[k] for k in ("seq", "submodel", "step", "call", "ordinal")}
            for g in (calls.values() if calls is not None else [])
        ]
        frame = pd.DataFrame(rows, columns=["seq", "submodel", "step", "call", "ordinal"])
        frame["submodel"] = frame["submodel"].astype(str)
    for col in ("seq", "step", "call", "ordinal"):
        frame[col] = frame[col].astype("int64")
    return frame.sort_values("seq", kind="stable").reset_index(drop=True)


def _read_tensor_table(f: h5py.File, n_calls: int) -> dict[tuple[int, str], list[TensorInfo]] | None:
    """``/tensors`` grouped by call and side, when it was written with a complete ``/index``."""
    table, index = f.get(TENSORS), f.get(INDEX)
    if table is None or index is None or index.shape[0] != n_calls:
        return None
    out: dict[tuple[int, str], list[TensorInfo]] = {}
    rows = table[()]
    for seq, io, name, dtype, shape in zip(
        rows["seq"].tolist(), _strings(rows["io"]), _strings(rows["name"]), _strings(rows["dtype"]), rows["shape"]
    ):
        out.setdefault((seq, io), []).append(
            TensorInfo(io, name, dtype, tuple(shape.tolist()), tensor_path(seq, io, name))
        )
    return out


def _strings(column: np.ndarray) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in column]


def _list_tensors(f: h5py.File, group_path: str, io: str) -> list[TensorInfo]:
    """One side's tensors read from its group, in creation order, through h5py's low-level
    API (the high-level one costs three times as much a dataset, which shows at 100k tensors)."""
    call = h5py.h5g.open(f.id, group_path.encode("utf-8"))
    if not call.links.exists(io.encode("utf-8")):
        return []
    group, path = h5py.h5g.open(call, io.encode("utf-8")), f"{group_path}/{io}"
    links: list[bytes] = []
    group.links.iterate(links.append, idx_type=h5py.h5.INDEX_CRT_ORDER)
    out = []
    for raw in links:
        link = raw.decode("utf-8")
        ds = h5py.h5d.open(group, raw)
        name, dtype = unescape_name(link), ds.dtype.name
        if h5py.h5a.get_num_attrs(ds) and (h5py.h5a.exists(ds, b"name") or h5py.h5a.exists(ds, b"dtype")):
            dataset = h5py.Dataset(ds)  # attributes that override the link name or HDF5 type
            name, dtype = tensor_name(link, dataset.attrs), logical_dtype(dataset)
        out.append(TensorInfo(io, name, dtype, tuple(ds.shape), f"/{path}/{link}"))
    return out


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


def _text(value: Any) -> str:
    """A string attribute as text (h5py gives fixed-length strings, as other writers make them, as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(value: Any) -> Any:
    """A JSON attribute's value; its text where it is not JSON."""
    try:
        return json.loads(_text(value))
    except ValueError:
        return _text(value)


def _json(attrs: h5py.AttributeManager, key: str) -> Any:
    """The JSON attribute ``key`` decoded; None where it is missing or not JSON."""
    if key not in attrs:
        return None
    try:
        return json.loads(_text(attrs[key]))
    except ValueError:
        return None


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
