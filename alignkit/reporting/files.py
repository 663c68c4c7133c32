"""Write a report file (HTML, CSV, JSON) without ever replacing a dump."""

from __future__ import annotations

import os
from pathlib import Path

from alignkit.errors import UsageError, os_reason


def check_output(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, an output path that cannot take ``what``: a directory, an HDF5
    file (a dump given where a report should go), a folder that cannot be made or written."""
    import h5py

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory: give the {what} a file name")
    if path.is_file() and h5py.is_hdf5(path):
        raise UsageError(f"{path} is an HDF5 file, perhaps a dump: the {what} will not replace it")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UsageError(f"{path}: cannot write the {what} here (part of its folder is a file, not a folder)")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{path}: cannot write the {what} here ({parent} is not a writable folder)")
    return path


def write_text(path: str | os.PathLike, text: str, what: str) -> Path:
    """Write ``text`` to ``path``; refuse a directory, an HDF5 file (a dump given where the
    report should go: its runs would be lost) and a place that cannot be written, in one line."""

    path = check_output(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the {what} here ({os_reason(exc)})") from exc
    return path
