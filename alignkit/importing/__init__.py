"""Other tools' dumps in, as regular alignkit dumps: compare, inspect, replay and the report
then work on them unchanged (docs/format.md, "Imported dumps").

Each format is a module of its own that turns files into :class:`Imported` calls; one writer
(:func:`write_dump`) keys them and stores them. Nothing is unpickled from a file: ``.npy`` and
``.npz`` load with ``allow_pickle=False``, torch files with ``weights_only=True``; a file that
needs more is refused in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alignkit.importing.common import Imported, ImportSummary, write_dump

FORMATS = ("npy-dir", "npz", "polygraphy", "msprobe")

__all__ = ["FORMATS", "Imported", "ImportSummary", "import_dump"]


def import_dump(fmt: str, source: str | os.PathLike, out: str | os.PathLike, **options: Any) -> ImportSummary:
    """Read ``source`` in ``fmt`` and write the alignkit dump ``out``.

    Options by format: ``npy-dir``: ``pattern`` (required), ``submodel``, ``inputs``;
    ``npz``: ``submodel``, ``bf16`` (names stored as uint16 bits, or ``"all"``); ``polygraphy``:
    ``runner``, ``submodel``, ``inputs`` (a ``--save-inputs`` file), ``iterations`` (``steps`` or
    ``calls``); ``msprobe``: ``rank``.
    """
    from alignkit.errors import UsageError

    source = Path(source)
    if fmt not in FORMATS:
        raise UsageError(f"import format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    if fmt == "npy-dir":
        from alignkit.importing.npy_dir import read
    elif fmt == "npz":
        from alignkit.importing.npz import read
    elif fmt == "polygraphy":
        from alignkit.importing.polygraphy import read
    else:
        from alignkit.importing.msprobe import read
    calls, steps_given = read(source, **{k: v for k, v in options.items() if v is not None})
    return write_dump(out, calls, fmt, source, steps_given)
