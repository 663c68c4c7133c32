"""Write a report file (HTML, CSV, JSON) without ever replacing a dump."""

from __future__ import annotations

import os
from pathlib import Path

from alignkit.errors import UsageError, os_reason


def write_text(path: str | os.PathLike, text: str, what: str) -> Path:
    """Write ``text`` to ``path``; refuse a directory, an HDF5 file (a dump given where the
    report should go: its runs would be lost) and a place that cannot be written, in one line."""
    import h5py

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory: give the {what} a file name")
    if path.is_file() and h5py.is_hdf5(path):
        raise UsageError(f"{path} is an HDF5 file, perhaps a dump: the {what} will not replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the {what} here ({os_reason(exc)})") from exc
    return path
