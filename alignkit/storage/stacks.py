"""Version 2's layout as the writer fills it: a call's tensors become rows of stacks, and its
facts rows of ``/index`` and ``/tensors`` (docs/format.md).

HDF5's cost is per object: a group, a dataset or an attribute costs tens of microseconds to
create, whatever it holds. Version 1 made a group per call, a dataset per tensor and
attributes for their facts, which was the floor of what a recorded call cost. Here a tensor
under STACK_MAX_BYTES is a row of the stack of its (submodel, io, name, dtype, shape), written
with the other rows a batch gave that stack in one write; its facts are a table row, and the
tables grow at each flush, so a killed run keeps the index of every call it made durable.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from alignkit.storage.objects import create_dataset, create_group, set_attrs
from alignkit.storage.records import CallRecord, Tensor
from alignkit.storage.schema import (
    DATA,
    INDEX,
    INDEX_DTYPE,
    STACK_MAX_BYTES,
    STACKS,
    STATS_FIGURES,
    TENSORS,
    TENSORS_DTYPE,
    row_path,
)

CHUNK_BYTES = 4 << 10  # a stack's chunk at least (one row, when a row is larger): a stack's last chunk is
# allocated whole however few rows it holds, and a run with layers has hundreds of stacks
_NO_STATS = np.full(len(STATS_FIGURES), np.nan)


@dataclass
class _Stack:
    """One stack: its dataset, the rows it holds or will hold, and the rows not yet written."""

    dataset: h5py.h5d.DatasetID
    path: str
    row_shape: tuple[int, ...]
    capacity: int
    rows: int = 0  # rows given out
    written: int = 0  # rows written to the file
    pending: list[np.ndarray] = field(default_factory=list)


class CallLayout:
    """Places recorded calls in a version-2 dump. ``stage`` may be called from any thread;
    the rest from the writer's."""

    def __init__(self, f: h5py.File):
        self._file = f
        self._stacks: dict[tuple, _Stack] = {}
        self._stack_group = create_group(f.id, STACKS)
        self._data_group = create_group(f.id, DATA)
        self._names = itertools.count()  # /data/<n>; next() is atomic under the GIL
        self._staged: set[str] = set()  # staged at call time, not yet placed in a call
        self._previous: dict[tuple, tuple] = {}  # (submodel, io, name) → (digest, dtype, shape, path) last stored
        self._calls: list[tuple] = []  # rows for /index since the last flush
        self._tensors: list[tuple] = []  # rows for /tensors since the last flush
        self._index = _table(f, INDEX, INDEX_DTYPE)
        self._table = _table(f, TENSORS, TENSORS_DTYPE)

    def stage(self, data: np.ndarray) -> str:
        """Write a large array as a dataset of its own now; its call is placed later."""
        path = f"/{DATA}/{next(self._names)}"
        create_dataset(self._data_group, path.rsplit("/", 1)[1], data)
        self._staged.add(path)
        return path

    def add(self, record: CallRecord) -> None:
        """Place one call's tensors (small ones wait in their stacks for :meth:`write_rows`)."""
        for io, tensors, _ in record.sides():
            for tensor in tensors:
                self._tensors.append(self._place(record.submodel, record.seq, io, tensor))
        values = [json.dumps(record.values), json.dumps(record.output_values)]
        self._calls.append(
            (record.seq, record.submodel, record.step, record.call, record.ordinal, record.error or "", *values)
        )

    def write_rows(self) -> None:
        """Write the rows each stack was given since the last time, one write a stack."""
        for stack in self._stacks.values():
            if stack.pending:
                _write_rows(stack)

    def write_tables(self) -> None:
        """Append the calls and tensors placed since the last flush to ``/index`` and ``/tensors``
        (a reader lists a call's tensors once ``/index`` has the call; the flush that follows
        makes both durable at once)."""
        self.write_rows()
        _append(self._table, self._tensors, TENSORS_DTYPE)
        _append(self._index, self._calls, INDEX_DTYPE)
        self._tensors, self._calls = [], []

    def finish(self) -> None:
        """Write what is left, give each stack the rows it holds, and drop what was staged for
        calls that were never written."""
        self.write_tables()
        for stack in self._stacks.values():
            if stack.capacity != stack.rows:
                stack.dataset.set_extent((stack.rows, *stack.row_shape))
        for path in self._staged:
            self._file.id.unlink(path.encode("utf-8"))
        self._staged.clear()

    def _place(self, submodel: str, seq: int, io: str, tensor: Tensor) -> tuple:
        """The tensor's row of ``/tensors``, once its values have a place."""
        shape = tensor.full_shape if tensor.full_shape is not None else tensor.data.shape
        grows_from, axis = "", -1
        if tensor.staged is not None:
            self._staged.discard(tensor.staged)
            path, row = tensor.staged, -1
            _note_dtype(self._file, path, tensor)
        elif tensor.stats is not None or tensor.spread is not None:  # facts of their own: never shared
            path, row = self._put((submodel, io, tensor.name), tensor, tensor.data)
        else:
            path, row, grows_from, axis = self._store_once((submodel, io, tensor.name), tensor)
        stored = "sample" if tensor.stats is not None else "delta" if grows_from else "whole"
        spread = tensor.spread or {}
        stats = tensor.stats or {}
        return (
            seq,
            io,
            tensor.name,
            tensor.dtype,
            np.asarray(shape, np.int64),
            path,
            row,
            stored,
            tensor.source,
            tensor.device,
            grows_from,
            axis,
            spread.get("spread_rel_l1", math.nan),
            spread.get("spread_cos_dist", math.nan),
            np.array([stats[key] for key in STATS_FIGURES], np.float64) if stats else _NO_STATS,
            int(stats.get("stats_checksum", 0)),
        )

    def _store_once(self, key: tuple, tensor: Tensor) -> tuple[str, int, str, int]:
        """(path, row, grows_from, axis): a tensor equal, bit for bit, to the one the same
        submodel stored under the same name before (text embeddings fed at every step) takes
        that one's place; one that is it grown along an axis (a KV cache at the next step)
        is stored as its new positions."""
        data = tensor.data
        seen = (_digest(data), tensor.dtype, data.shape)
        last = self._previous.get(key)
        if last is not None and last[:3] == seen:
            return last[3], last[4], "", -1
        grown = _growth(data, tensor.dtype, last)
        if grown is None:
            path, row = self._put(key, tensor, data)
            self._previous[key] = (*seen, path, row)
            return path, row, "", -1
        axis, old = grown
        delta = np.ascontiguousarray(np.take(data, range(old, data.shape[axis]), axis=axis))
        path, row = self._put(key, tensor, delta)
        self._previous[key] = (*seen, path, row)
        return path, row, row_path(last[3], last[4]), axis

    def _put(self, key: tuple, tensor: Tensor, data: np.ndarray) -> tuple[str, int]:
        """A place for ``data``: a row of its stack, or a dataset of its own when it is large
        (or empty, which a chunked stack cannot hold)."""
        if data.nbytes >= STACK_MAX_BYTES or data.size == 0:
            path = f"/{DATA}/{next(self._names)}"
            create_dataset(self._data_group, path.rsplit("/", 1)[1], data)
            _note_dtype(self._file, path, tensor, data)
            return path, -1
        if not data.flags.c_contiguous:
            data = np.array(data, order="C")
        stack_key = (*key, data.dtype.str, data.shape)
        stack = self._stacks.get(stack_key)
        if stack is None:
            stack = self._stacks[stack_key] = _new_stack(self._stack_group, len(self._stacks), data)
            if tensor.dtype != data.dtype.name:
                set_attrs(stack.dataset, {"dtype": tensor.dtype})
        stack.pending.append(data)
        stack.rows += 1
        return stack.path, stack.rows - 1


def _new_stack(group: Any, number: int, first: np.ndarray) -> _Stack:
    """A chunked dataset for rows like ``first``, growable along its first axis, with no
    chunk cache: rows are written a batch at a time and never read back while recording."""
    row_bytes = max(first.nbytes, 1)
    rows = max(1, CHUNK_BYTES // row_bytes)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((rows, *first.shape))
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    space = h5py.h5s.create_simple((rows, *first.shape), (h5py.h5s.UNLIMITED, *first.shape))
    file_type = h5py.h5t.py_create(first.dtype, logical=True)
    dataset = h5py.h5d.create(group, str(number).encode(), file_type, space, dcpl=dcpl, dapl=dapl)
    return _Stack(dataset, f"/{STACKS}/{number}", first.shape, rows)


def _write_rows(stack: _Stack) -> None:
    """Write a stack's pending rows, growing it (twice as large) when they do not fit: small
    rows gathered into one write, large ones (WRITE_ALONE_BYTES and more) each straight from
    its array, which copying them together would cost more than the writes it saves."""
    start, stop = stack.written, stack.written + len(stack.pending)
    if stop > stack.capacity:
        stack.capacity = max(stop, 2 * stack.capacity)
        stack.dataset.set_extent((stack.capacity, *stack.row_shape))
    if len(stack.pending) > 1 and stack.pending[0].nbytes < WRITE_ALONE_BYTES:
        blocks = [(start, np.stack(stack.pending))]
    else:
        blocks = [(start + i, row[np.newaxis]) for i, row in enumerate(stack.pending)]
    space = stack.dataset.get_space()
    for first, block in blocks:
        space.select_hyperslab((first, *(0 for _ in stack.row_shape)), block.shape)
        stack.dataset.write(h5py.h5s.create_simple(block.shape), space, block)
    stack.written, stack.pending = stop, []


WRITE_ALONE_BYTES = 64 << 10


def _table(f: h5py.File, name: str, dtype: np.dtype) -> h5py.Dataset:
    """An empty table that grows by rows."""
    return f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))


def _append(table: h5py.Dataset, rows: list[tuple], dtype: np.dtype) -> None:
    if not rows:
        return
    start = table.shape[0]
    table.resize((start + len(rows),))
    table[start:] = np.array(rows, dtype=dtype)


def _note_dtype(f: h5py.File, path: str, tensor: Tensor, data: np.ndarray | None = None) -> None:
    """A dataset of its own keeps a logical dtype HDF5 cannot hold (bfloat16) as an attribute,
    so that it can be read in blocks like any HDF5 dataset."""
    stored = tensor.data.dtype if data is None else data.dtype
    if tensor.dtype != stored.name:
        set_attrs(h5py.h5d.open(f.id, path.encode("utf-8")), {"dtype": tensor.dtype})


def _growth(data: np.ndarray, dtype: str, last: tuple | None) -> tuple[int, int] | None:
    """(axis, old length) when ``data`` is the previous tensor of its name grown along one
    axis, its first positions the previous tensor bit for bit (a KV cache at the next step)."""
    if last is None or last[1] != dtype or len(last[2]) != data.ndim:
        return None
    axes = [i for i, (a, b) in enumerate(zip(last[2], data.shape)) if a != b]
    if len(axes) != 1 or data.shape[axes[0]] <= last[2][axes[0]]:
        return None
    axis, old = axes[0], last[2][axes[0]]
    prefix = np.take(data, range(old), axis=axis)
    return (axis, old) if _digest(prefix) == last[0] else None


def _digest(data: np.ndarray) -> bytes:
    """A tensor's bits, hashed: equal digests, equal tensors. SHA-256, which CPUs with SHA
    extensions compute at about 2 GB/s (BLAKE2b in Python's hashlib: 1.4 GB/s)."""
    return hashlib.sha256(np.ascontiguousarray(data).view(np.uint8).data).digest()
