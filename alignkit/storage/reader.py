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
from typing import Any, NamedTuple

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
    split_row,
    tensor_name,
    tensor_path,
    unescape_name,
)

_INDEX_COLUMNS = ("seq", "submodel", "step", "call", "ordinal")


class TensorInfo(NamedTuple):
    """Where one stored tensor lives and what it is, without reading it. (A named tuple: a
    dump of 100k tensors makes 100k of them, and a frozen dataclass took five times as long.)"""

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
    def error(self) -> str | None:
        """The exception the call raised, if it did."""
        return self._dump._call_error(self)

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
        return {k: _decoded(v) for k, v in self._dump._call_values(self, io).items()}


class Dump:
    """An open alignkit dump. Close it, or use it as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file, self._index, self._version = _open(self.path)
        self._grown: dict[str, np.ndarray] = {}
        self._grown_lock = threading.Lock()
        self._rows = _RowBlocks(self._file)

    def close(self) -> None:
        self._file.close()

    def prepare_for_threads(self) -> None:
        """Build the tables that reading builds on first use, so that threads reading calls at
        once find them made instead of each making its own."""
        _ = self.metadata, self.calls, self._tensor_table, self._by_seq, self._call_extras

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
        frame = self._index[list(_INDEX_COLUMNS)]
        if self.metadata.get("step_source", "none") == "none" and (frame["step"] == 0).all():
            frame["step"], frame["call"] = frame["ordinal"], 0  # no step source: each call is a step
        return frame.reset_index(drop=True)

    @cached_property
    def tensors(self) -> pd.DataFrame:
        """One row per stored tensor: seq, submodel, step, call, io, name, dtype, shape, numel,
        and where its values are (``path``: a dataset, and ``#row`` for a row of a stack)."""
        if self._version >= 2:
            return self._table_v2.frame(self.calls)
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

    @cached_property
    def _tensor_table(self) -> dict[tuple[int, str], list[TensorInfo]] | None:
        """The tensors of every call from ``/tensors``, keyed by (seq, io); None when the dump
        has no table to trust (a killed run of version 1), and each call's groups are listed instead."""
        if self._version >= 2:
            return self._table_v2.by_call
        return _read_tensor_table(self._file, len(self.calls))

    @cached_property
    def _table_v2(self) -> _TensorTable:
        return _TensorTable(self._file, self._index["seq"].to_numpy())

    def _facts(self, path: str) -> dict[str, Any]:
        """What version 2's ``/tensors`` says of the tensor at ``path`` beyond its name, dtype and shape."""
        return self._table_v2.facts(path)

    @cached_property
    def _call_extras(self) -> dict[int, tuple[str, str, str]]:
        """Version 2: each call's error and its sides' non-tensor arguments, by seq."""
        if self._version < 2:
            return {}
        frame = self._index
        return dict(zip(frame["seq"].tolist(), zip(frame["error"], frame["inputs_values"], frame["outputs_values"])))

    def _call_error(self, call: Call) -> str | None:
        if self._version >= 2:
            return self._call_extras[call.seq][0] or None
        value = self._file[call.group_path].attrs.get("error")
        return str(value) if value is not None else None

    def _call_values(self, call: Call, io: str) -> dict[str, Any]:
        """A side's non-tensor arguments as stored: JSON text by name."""
        if self._version >= 2:
            extras = self._call_extras[call.seq]
            text = extras[1] if io == "inputs" else extras[2] if io == "outputs" else ""
            return json.loads(text) if text else {}
        group = self._file[call.group_path].get(io)
        return {} if group is None else dict(group.attrs)

    def _infos(self, call: Call, io: str) -> list[TensorInfo]:
        table = self._tensor_table
        if table is None:
            return _list_tensors(self._file, call.group_path, io)
        return table.get((call.seq, io), [])

    def read(self, path: str, dtype: str) -> np.ndarray:
        """The values of the tensor stored at ``path`` whose logical dtype is ``dtype`` (both as
        in :attr:`tensors`), whole, bfloat16 widened to float32 exactly. The dataset is
        opened by path at HDF5's level: h5py's ``file[path]`` costs several times more, which
        shows when a dump holds 100k small tensors. A row of a stack (version 2) is read with
        the rows after it, which the next calls ask for."""
        dataset, row = split_row(path)
        if row >= 0:
            raw = self._rows.read(dataset, row)
        else:
            ds = h5py.h5d.open(self._file.id, dataset.encode("utf-8"))
            raw = np.empty(ds.shape, dtype=ds.dtype)
            if raw.size:
                ds.read(h5py.h5s.ALL, h5py.h5s.ALL, raw)
        if self._version >= 2 and self._table_v2.stored(path) == "whole":  # most are
            return decode(raw, dtype)
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
        if self._version >= 2:
            if self._table_v2.stored(path) != "delta":
                return None
            facts = self._facts(path)
            return facts["grows_from"], facts["grows_axis"]
        if not self.metadata.get("deltas"):
            return None
        attrs = self._file[path].attrs
        return (_text(attrs["grows_from"]), int(attrs["grows_axis"])) if "grows_from" in attrs else None

    def is_whole(self, path: str) -> bool:
        """Whether the dataset at ``path`` holds the whole tensor, alone (to stream it in blocks)."""
        if self._version >= 2:
            return split_row(path)[1] < 0 and self._table_v2.stored(path) == "whole"
        return self._grows_from(path) is None and not self.is_stats(path)

    def is_stats(self, path: str) -> bool:
        """Whether the tensor at ``path`` was recorded as statistics and a sample (``record --mode stats``)."""
        if self._version >= 2:
            return self._table_v2.stored(path) == "sample"
        if self.metadata.get("mode") != "stats":
            return False
        return bool(h5py.h5a.exists(h5py.h5o.open(self._file.id, path.encode("utf-8")), b"stats_shape"))

    def stats(self, path: str) -> dict[str, Any]:
        """A statistics recording's figures for the tensor at ``path`` (``stats_min``…)."""
        if self._version >= 2:
            facts = self._facts(path)
            return {**dict(zip(STATS_FIGURES, facts["stats"])), "stats_checksum": facts["stats_checksum"]}
        attrs = self._file[path].attrs
        figures = dict(zip(STATS_FIGURES, (float(v) for v in attrs["stats"])))
        return {**figures, "stats_checksum": int(attrs["stats_checksum"])}

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
        if self._version < 2:
            return {key: _plain(value) for key, value in self._file[path].attrs.items()}
        facts = self._facts(path)
        out = {key: facts[key] for key in ("source", "device") if facts[key] not in ("torch", "cpu")}
        if not math.isnan(facts["spread_rel_l1"]):
            out.update(spread_rel_l1=facts["spread_rel_l1"], spread_cos_dist=facts["spread_cos_dist"])
        return out

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


def _open(path: Path) -> tuple[h5py.File, pd.DataFrame, int]:
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
        version = _check_format(path, f)
        index = _read_index_v2(f) if version >= 2 else _read_index(f)
    except (NotADumpError, FormatVersionError):
        f.close()
        raise
    except Exception as exc:
        f.close()
        raise DumpCorruptError(f"{path}: truncated or damaged dump ({_short(exc)})") from exc
    return f, index, version


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


def _read_index_v2(f: h5py.File) -> pd.DataFrame:
    """Version 2's ``/index``: every call as of the last flush, with its error and arguments."""
    table = f[INDEX][()]
    frame = pd.DataFrame({name: table[name] for name in table.dtype.names})
    for column in ("submodel", "error", "inputs_values", "outputs_values"):
        frame[column] = _strings(frame[column])
    for column in ("seq", "step", "call", "ordinal"):
        frame[column] = frame[column].astype("int64")
    return frame.sort_values("seq", kind="stable").reset_index(drop=True)


class _TensorTable:
    """Version 2's ``/tensors``, read once: each listed call's tensors by (seq, io), the table
    as a frame, and what it says of each stored tensor by its path. Rows of calls that
    ``/index`` does not list (a run killed before it flushed them) are left out."""

    def __init__(self, f: h5py.File, calls: np.ndarray):
        rows = f[TENSORS][()]
        if len(rows) and not np.isin(rows["seq"], calls).all():
            rows = rows[np.isin(rows["seq"], calls)]
        self._rows = rows
        self.seqs = rows["seq"].tolist()
        self.ios, self.names, self.dtypes = _strings(rows["io"]), _strings(rows["name"]), _strings(rows["dtype"])
        self.shapes = _shapes(rows["shape"])
        self.paths = [p if r < 0 else f"{p}#{r}" for p, r in zip(_strings(rows["path"]), rows["row"].tolist())]
        self._first = dict(zip(reversed(self.paths), range(len(self.paths) - 1, -1, -1)))  # path → its first row
        self._stored = _strings(rows["stored"])
        self._facts: dict[str, dict[str, Any]] = {}

    @cached_property
    def by_call(self) -> dict[tuple[int, str], list[TensorInfo]]:
        out: dict[tuple[int, str], list[TensorInfo]] = {}
        for seq, io, name, dtype, shape, path in zip(
            self.seqs, self.ios, self.names, self.dtypes, self.shapes, self.paths
        ):
            out.setdefault((seq, io), []).append(TensorInfo(io, name, dtype, shape, path))
        return out

    def frame(self, calls: pd.DataFrame) -> pd.DataFrame:
        """The rows in call order (by seq, then inputs, outputs, layers), with each call's keys."""
        frame = pd.DataFrame(
            {
                "seq": np.asarray(self.seqs, dtype=np.int64),
                "io": self.ios,
                "name": self.names,
                "dtype": self.dtypes,
                "shape": self.shapes,
                "numel": [math.prod(s) for s in self.shapes],
                "path": self.paths,
            }
        )
        side = frame["io"].map({io: i for i, io in enumerate(IO_GROUPS)})
        frame = frame.iloc[np.lexsort((np.arange(len(frame)), side.to_numpy(), frame["seq"].to_numpy()))]
        keys = calls.set_index("seq")
        for column in ("submodel", "step", "call"):
            frame[column] = frame["seq"].map(keys[column]).to_numpy()
        return frame[TENSOR_COLUMNS].reset_index(drop=True)

    def stored(self, path: str) -> str:
        """``whole``, ``sample`` or ``delta`` (asked several times a tensor: kept short)."""
        row = self._first.get(path)
        return self._stored[row] if row is not None else self._stored[self._row(path)]

    def facts(self, path: str) -> dict[str, Any]:
        facts = self._facts.get(path)
        if facts is None:
            row = self._rows[self._row(path)]
            facts = self._facts[path] = {
                "stored": _text(row["stored"]),
                "source": _text(row["source"]),
                "device": _text(row["device"]),
                "grows_from": _text(row["grows_from"]),
                "grows_axis": int(row["grows_axis"]),
                "spread_rel_l1": float(row["spread_rel_l1"]),
                "spread_cos_dist": float(row["spread_cos_dist"]),
                "stats": [float(v) for v in row["stats"]],
                "stats_checksum": int(row["stats_checksum"]),
            }
        return facts

    def _row(self, path: str) -> int:
        row = self._first.get(path)
        if row is None:
            raise KeyError(f"{path}: no tensor of the dump is stored there")
        return row


def _shapes(column: np.ndarray) -> list[tuple[int, ...]]:
    """Each row's shape as a tuple; the few distinct shapes of a run are made once."""
    made: dict[bytes, tuple[int, ...]] = {}
    out = []
    for shape in column:
        key = shape.tobytes()
        tup = made.get(key)
        if tup is None:
            tup = made[key] = tuple(shape.tolist())
        out.append(tup)
    return out


TENSOR_COLUMNS = ["seq", "submodel", "step", "call", "io", "name", "dtype", "shape", "numel", "path"]


class _RowBlocks:
    """Rows of stacks read a block at a time, kept while they may be asked for: compare reads
    the calls in order, so the rows after the one asked for are next. The blocks kept take at
    most ROW_CACHE_BYTES together, each at most ROW_BLOCK_BYTES (less when many stacks are
    read); the block read longest ago goes first."""

    def __init__(self, f: h5py.File):
        self._file = f
        self._blocks: dict[str, tuple[int, np.ndarray]] = {}  # stack → (first row, rows), oldest first
        self._held = 0
        self._lock = threading.Lock()

    def read(self, stack: str, row: int) -> np.ndarray:
        with self._lock:
            hit = self._blocks.get(stack)
            if hit is not None and hit[0] <= row < hit[0] + len(hit[1]):
                return hit[1][row - hit[0], ...].copy()  # (``...``: a 0-d row stays an array)
            block = self._read_block(stack, row)
            if hit is not None:
                self._held -= hit[1].nbytes
                del self._blocks[stack]
            self._blocks[stack] = (row, block)
            self._held += block.nbytes
            while self._held > ROW_CACHE_BYTES and len(self._blocks) > 1:
                oldest = next(iter(self._blocks))
                self._held -= self._blocks.pop(oldest)[1].nbytes
            return block[0, ...].copy()

    def _read_block(self, stack: str, row: int) -> np.ndarray:
        ds = h5py.h5d.open(self._file.id, stack.encode("utf-8"))
        shape = ds.shape
        row_bytes = max(1, math.prod(shape[1:]) * ds.dtype.itemsize)
        budget = min(ROW_BLOCK_BYTES, max(row_bytes, ROW_CACHE_BYTES // max(1, len(self._blocks) + 1)))
        if row >= shape[0]:
            raise KeyError(f"{stack}: row {row} is past its {shape[0]} rows")
        rows = min(shape[0] - row, max(1, budget // row_bytes))
        block = np.empty((rows, *shape[1:]), dtype=ds.dtype)
        space = ds.get_space()
        space.select_hyperslab((row, *(0 for _ in shape[1:])), block.shape)
        ds.read(h5py.h5s.create_simple(block.shape), space, block)
        return block


ROW_BLOCK_BYTES = 1 << 20  # rows of one stack read at once
ROW_CACHE_BYTES = 64 << 20  # rows of all stacks kept at once


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
    """A string column as text; each distinct value decoded once (a table repeats a few names,
    sides and dtypes over and over)."""
    decoded = {s: s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in set(column.tolist())}
    return [decoded[s] for s in column.tolist()]


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


def _plain(value: Any) -> Any:
    """An attribute's value as Python: text for strings, a number for a numpy scalar."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


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
