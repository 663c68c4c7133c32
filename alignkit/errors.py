"""The errors alignkit raises on purpose.

::

    AlignkitError                 base: the CLI prints its message on one line and exits 2
     ├── DumpError                a file that cannot be used as a dump
     │    ├── NotADumpError       missing, a directory, empty, not HDF5, or HDF5 but not ours
     │    ├── FormatVersionError  written by a newer alignkit
     │    └── DumpCorruptError    truncated or damaged
     ├── CallNotFoundError        a (submodel, step, call) key that the dump does not hold
     ├── UsageError               arguments that cannot work (a name map naming nothing, ...)
     ├── RecordingError           the background writer failed; raised when recording ends
     ├── ReplayError              the replayed target raised on a recorded call
     └── MissingDependencyError   an optional dependency (torch, onnxruntime, ...) is absent

Anything else that escapes alignkit is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class AlignkitError(Exception):
    """Base of every error alignkit raises for a user's mistake or a bad file."""


class DumpError(AlignkitError):
    """A file that cannot be read as an alignkit dump."""


class NotADumpError(DumpError):
    """The path is missing, not a file, not HDF5, or not written by alignkit."""


class FormatVersionError(DumpError):
    """The dump was written in a newer format than this alignkit reads."""


class DumpCorruptError(DumpError):
    """The dump is truncated or damaged."""


class CallNotFoundError(AlignkitError, KeyError):
    """A key that names no recorded call; the message lists what exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UsageError(AlignkitError):
    """Arguments that cannot work together."""


class RecordingError(AlignkitError):
    """The background writer failed; the dump holds what was written before."""


class ReplayError(AlignkitError):
    """The target of a replay raised on a recorded call; the cause is chained."""


class MissingDependencyError(AlignkitError, ImportError):
    """An optional dependency is needed for this feature."""


def os_reason(exc: OSError) -> str:
    """Why the system refused a file operation, in a few words ("Permission denied")."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
        return "part of its folder is a file, not a folder"
    return os.strerror(exc.errno) if exc.errno else str(exc)


def require(module: str, extra: str):
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is needed for this; install it with: pip install 'alignkit[{extra}]'"
        ) from exc
