"""How each format version lays out a dump's calls and tensors, behind one interface that the
reader asks: which calls and tensors there are, where a tensor's bits are and how it was stored
(whole, a statistics sample, or what it added to an earlier tensor), and what else was kept of
it. Version 2 lists them in ``/index`` and ``/tensors`` and stacks small tensors; version 1 gave
each call a group and each tensor a dataset with attributes (docs/format.md)."""

from __future__ import annotations

import json
import math
import threading
from functools import cached_property
from typing import Any, NamedTuple

import h5py
import numpy as np
import pandas as pd

from alignkit.storage.schema import (
    CALLS,
    INDEX,
    IO_GROUPS,
    STATS_FIGURES,
    TENSORS,
    as_text,
    call_group_name,
    logical_dtype,
    split_row,
    tensor_name,
    tensor_path,
    unescape_name,
)

TENSOR_COLUMNS = ["seq", "submodel", "step", "call", "io", "name", "dtype", "shape", "numel", "path"]


class TensorInfo(NamedTuple):
    """Where one stored tensor lives and what it is, without reading it. (A named tuple: a
    dump of 100k tensors makes 100k of them, and a frozen dataclass takes twice as long.)"""

    io: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str


class Version2:
    """Version 2: the tables list every call and tensor; small tensors are rows of stacks."""

    def __init__(self, f: h5py.File):
        self._file = f
        self.index = _read_index_v2(f)
        self._rows = _RowBlocks(f)

    @cached_property
    def _table(self) -> _TensorTable:
        return _TensorTable(self._file, self.index["seq"].to_numpy())

    @cached_property
    def _extras(self) -> dict[int, tuple[str, str, str]]:
        """Each call's error and its sides' non-tensor arguments, by seq."""
        frame = self.index
        return dict(zip(frame["seq"].tolist(), zip(frame["error"], frame["inputs_values"], frame["outputs_values"])))

    def prepare(self) -> None:
        _ = self._table.by_call, self._extras

    def infos(self, seq: int, io: str) -> list[TensorInfo]:
        return self._table.by_call.get((seq, io), [])

    def frame(self, calls: pd.DataFrame) -> pd.DataFrame | None:
        return self._table.frame(calls)

    def error(self, seq: int) -> str | None:
        return self._extras[seq][0] or None

    def values(self, seq: int, io: str) -> dict[str, Any]:
        extras = self._extras[seq]
        text = extras[1] if io == "inputs" else extras[2] if io == "outputs" else ""
        return json.loads(text) if text else {}

    def raw(self, path: str) -> np.ndarray:
        dataset, row = split_row(path)
        return self._rows.read(dataset, row) if row >= 0 else _read_whole(self._file, dataset)

    def stored(self, path: str) -> str:
        return self._table.stored(path)

    def has_samples(self) -> bool:
        return self._table.has_samples

    def grows_from(self, path: str) -> tuple[str, int]:
        facts = self._table.facts(path)
        return facts["grows_from"], facts["grows_axis"]

    def stats(self, path: str) -> dict[str, Any]:
        facts = self._table.facts(path)
        return {**dict(zip(STATS_FIGURES, facts["stats"])), "stats_checksum": facts["stats_checksum"]}

    def attrs(self, path: str) -> dict[str, Any]:
        facts = self._table.facts(path)
        out = {key: facts[key] for key in ("source", "device") if facts[key] not in ("torch", "cpu")}
        if not math.isnan(facts["spread_rel_l1"]):
            out.update(spread_rel_l1=facts["spread_rel_l1"], spread_cos_dist=facts["spread_cos_dist"])
        return out


class Version1:
    """Version 1: a group per call, a dataset per tensor, its facts in attributes."""

    def __init__(self, f: h5py.File):
        self._file = f
        self.index = _read_index(f)
        self._stats = as_text(f.attrs.get("mode", "")) == "stats"
        self._deltas = bool(f.attrs.get("deltas", False))

    @cached_property
    def _table(self) -> dict[tuple[int, str], list[TensorInfo]] | None:
        """``/tensors`` by call and side; None where it cannot be trusted (a killed run), and
        each call's groups are listed instead."""
        return _read_tensor_table(self._file, len(self.index))

    def prepare(self) -> None:
        _ = self._table

    def infos(self, seq: int, io: str) -> list[TensorInfo]:
        table = self._table
        if table is None:
            return _list_tensors(self._file, call_group_name(seq), io)
        return table.get((seq, io), [])

    def frame(self, calls: pd.DataFrame) -> pd.DataFrame | None:
        return None  # built call by call from infos()

    def error(self, seq: int) -> str | None:
        value = self._file[call_group_name(seq)].attrs.get("error")
        return str(value) if value is not None else None

    def values(self, seq: int, io: str) -> dict[str, Any]:
        group = self._file[call_group_name(seq)].get(io)
        return {} if group is None else dict(group.attrs)

    def raw(self, path: str) -> np.ndarray:
        return _read_whole(self._file, path)

    def has_samples(self) -> bool:
        return self._stats

    def stored(self, path: str) -> str:
        if self._deltas and "grows_from" in self._file[path].attrs:
            return "delta"
        if self._stats and h5py.h5a.exists(h5py.h5o.open(self._file.id, path.encode("utf-8")), b"stats_shape"):
            return "sample"
        return "whole"

    def grows_from(self, path: str) -> tuple[str, int]:
        attrs = self._file[path].attrs
        return as_text(attrs["grows_from"]), int(attrs["grows_axis"])

    def stats(self, path: str) -> dict[str, Any]:
        attrs = self._file[path].attrs
        figures = dict(zip(STATS_FIGURES, (float(v) for v in attrs["stats"])))
        return {**figures, "stats_checksum": int(attrs["stats_checksum"])}

    def attrs(self, path: str) -> dict[str, Any]:
        return {key: _plain(value) for key, value in self._file[path].attrs.items()}


def _read_whole(f: h5py.File, path: str) -> np.ndarray:
    """A dataset's bits, opened by path at HDF5's level: h5py's ``file[path]`` costs several
    times more, which shows when a dump holds 100k small tensors."""
    ds = h5py.h5d.open(f.id, path.encode("utf-8"))
    raw = np.empty(ds.shape, dtype=ds.dtype)
    if raw.size:
        ds.read(h5py.h5s.ALL, h5py.h5s.ALL, raw)
    return raw


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
        self.has_samples = "sample" in set(self._stored)
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
                "stored": as_text(row["stored"]),
                "source": as_text(row["source"]),
                "device": as_text(row["device"]),
                "grows_from": as_text(row["grows_from"]),
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


def _strings(column: np.ndarray) -> list[str]:
    """A string column as text; each distinct value decoded once (a table repeats a few names,
    sides and dtypes over and over)."""
    decoded = {s: s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in set(column.tolist())}
    return [decoded[s] for s in column.tolist()]


def _plain(value: Any) -> Any:
    """An attribute's value as Python: text for strings, a number for a numpy scalar."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value
