"""Create the dump's HDF5 objects through h5py's low-level API.

The high-level API (``group.create_dataset``, ``obj.attrs[k] = v``) builds property lists,
looks names up and checks for existing attributes on every call; a recorded call creates a
few groups, one dataset per tensor and a handful of attributes, and at that rate the checks
cost as much as HDF5's own work. These helpers keep the property lists and types, and create
exactly what the layout in docs/format.md describes, with the same encodings h5py would use:
link names flagged UTF-8 when they are not ASCII, strings as variable-length UTF-8.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np


def _link_plists() -> dict[bool, h5py.h5p.PropLCID]:
    plists = {}
    for ascii_name, charset in ((True, h5py.h5t.CSET_ASCII), (False, h5py.h5t.CSET_UTF8)):
        plist = h5py.h5p.create(h5py.h5p.LINK_CREATE)
        plist.set_char_encoding(charset)
        plists[ascii_name] = plist
    return plists


def _ordered_group_plist() -> h5py.h5p.PropGCID:
    plist = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    plist.set_link_creation_order(h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED)
    return plist


_LINK = _link_plists()
_ORDERED = _ordered_group_plist()
_SCALAR = h5py.h5s.create(h5py.h5s.SCALAR)
_STR = (h5py.h5t.py_create(h5py.string_dtype(), logical=True), h5py.h5t.py_create(h5py.string_dtype()))
_TYPES: dict[str, Any] = {}
_SPACES: dict[tuple[int, ...], Any] = {}


def _encode(name: str) -> tuple[bytes, h5py.h5p.PropLCID]:
    return name.encode("utf-8"), _LINK[name.isascii()]


def _file_type(dtype: np.dtype) -> Any:
    """The HDF5 type h5py would store ``dtype`` as (bool as its enum), cached per dtype.

    It doubles as the memory type of a write: the types being the same object, HDF5 finds
    its no-op conversion at once (h5py would build a fresh memory type for every write)."""
    file_type = _TYPES.get(dtype.str)
    if file_type is None:
        file_type = _TYPES[dtype.str] = h5py.h5t.py_create(dtype, logical=True)
    return file_type


def _space(shape: tuple[int, ...]) -> Any:
    """A dataspace of ``shape``, shared by every dataset of that shape (a loop repeats them)."""
    space = _SPACES.get(shape)
    if space is None:
        if len(_SPACES) > 4096:
            _SPACES.clear()
        space = _SPACES[shape] = h5py.h5s.create_simple(shape) if shape else _SCALAR
    return space


def create_group(parent: Any, name: str) -> h5py.h5g.GroupID:
    """A new group that remembers the order its members were created in."""
    encoded, lcpl = _encode(name)
    return h5py.h5g.create(parent, encoded, lcpl=lcpl, gcpl=_ORDERED)


def create_dataset(parent: Any, name: str, data: np.ndarray) -> h5py.h5d.DatasetID:
    """A contiguous dataset holding ``data`` exactly."""
    if not data.flags.c_contiguous:
        data = np.array(data, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    encoded, lcpl = _encode(name)
    file_type = _file_type(data.dtype)
    dataset = h5py.h5d.create(parent, encoded, file_type, _space(data.shape), lcpl=lcpl)
    if data.size:
        dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data, mtype=file_type)
    return dataset


def set_attrs(oid: Any, attrs: dict[str, Any]) -> None:
    """Create scalar (or vector) attributes on a new object, as ``obj.attrs[k] = v`` would, at
    a quarter of its cost (h5py's high-level path checks for and deletes an existing attribute first)."""
    for key, value in attrs.items():
        if isinstance(value, str):
            data, (file_type, mem_type) = np.array(value, dtype=h5py.string_dtype()), _STR
        else:
            data = np.asarray(value)
            file_type = mem_type = _file_type(data.dtype)
        space = _SCALAR if data.ndim == 0 else h5py.h5s.create_simple(data.shape)
        attr = h5py.h5a.create(oid, key.encode("utf-8"), file_type, space)
        attr.write(data, mtype=mem_type)
        attr.close()
