"""The dump file as the recorder writes it: its bytes on disk move from one flush to the next
as a whole, so a process killed at any moment leaves a dump that opens.

HDF5 rewrites its own structures in place when it flushes (the superblock, a group's heap and
B-trees), in address order, with the superblock last. A process killed in the middle of a
flush leaves structures that point at blocks not yet written, or past the end the superblock
knows, and the dump no longer opens. So the recorder hands HDF5 a :class:`JournaledFile`:

- bytes past the end of the file as of the last :meth:`~JournaledFile.commit` go straight to
  the file (small ones that follow each other gathered into one write): nothing committed
  points at them yet;
- bytes that would overwrite the committed file are held in memory (and read back from there);
- ``commit`` (after each HDF5 flush) writes the held bytes to a journal beside the dump, then
  into the dump, then empties the journal.

A kill before the journal is whole leaves the dump as of the last commit, with a journal that
fails its checksum; a kill after leaves a whole journal, which :func:`finish_killed` applies
when the dump is next opened. Either way the dump reads as of a completed flush. This guards
against the process dying, not the machine: nothing is forced to the disk.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import struct
import threading
import zlib
from pathlib import Path

_RECORD = struct.Struct("<QQ")  # offset, length; the bytes follow
_TRAILER = struct.Struct("<8sQqI")  # magic, records, size to truncate to (-1: none), crc32 of all before
_MAGIC = b"akjrnl01"
_GATHER = 1 << 20  # fresh bytes gathered into one write: each write lets the pipeline's thread take the GIL


class DumpLockedError(OSError):
    """Another recording is writing this dump."""


def journal_path(dump: Path) -> Path:
    """Where a dump's journal lives while it is recorded: beside it, named after it."""
    return dump.with_name(dump.name + ".journal")


class JournaledFile(io.RawIOBase):
    """A file object for ``h5py.File`` whose committed bytes only change in :meth:`commit`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock(fd, self.path)
            if os.fstat(fd).st_size:  # an older dump, emptied once the lock says no recording writes it
                os.ftruncate(fd, 0)  # (not a new file: ext4 would then write it back at close, as for O_TRUNC)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._journal = journal_path(self.path)
        self._journal.unlink(missing_ok=True)  # left by an earlier, killed recording to this path
        self._journal_fd: int | None = None
        self._pos = 0
        self._committed = 0  # the file's size at the last commit; bytes before it are held
        self._held: list[tuple[int, bytes]] = []
        self._truncate_to: int | None = None
        self._gathered = bytearray()  # fresh bytes that follow each other, not yet written
        self._gathered_at = 0
        self._lock = threading.Lock()  # HDF5 writes from the pipeline's thread and the writer's

    # -- the file object h5py's "fileobj" driver calls --------------------------------------

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            with self._lock:
                self._write_gathered()
                offset += os.fstat(self._fd).st_size
        elif whence == io.SEEK_CUR:
            offset += self._pos
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        with self._lock:
            self._write_gathered()
            n = os.preadv(self._fd, [view], self._pos)
            view[n:] = bytes(len(view) - n)  # past the end reads as zeros, as HDF5's own driver does
            for offset, data in self._held:  # in the order written: the latest wins
                _overlay(view, self._pos, offset, data)
        self._pos += len(view)
        return len(view)

    def write(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        start, end = self._pos, self._pos + len(view)
        with self._lock:
            if start < self._committed:
                self._held.append((start, bytes(view[: min(end, self._committed) - start])))
            if end > self._committed:
                fresh = max(start, self._committed)
                self._write_fresh(view[fresh - start :], fresh)
        self._pos = end
        return len(view)

    def _write_fresh(self, view: memoryview, offset: int) -> None:
        """Write bytes past the committed file, gathering small ones that follow each other
        (HDF5 writes a call's objects one after another, in pieces of a few hundred bytes)."""
        if self._gathered and offset != self._gathered_at + len(self._gathered):
            self._write_gathered()
        if len(self._gathered) + len(view) > _GATHER:
            self._write_gathered()
            self._pwrite(self._fd, view, offset)
            return
        if not self._gathered:
            self._gathered_at = offset
        self._gathered += view

    def _write_gathered(self) -> None:
        if self._gathered:
            self._pwrite(self._fd, self._gathered, self._gathered_at)
            self._gathered = bytearray()

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        with self._lock:
            self._write_gathered()
            if size >= self._committed:
                os.ftruncate(self._fd, size)
                self._truncate_to = None
            else:
                self._truncate_to = size
        return size

    def flush(self) -> None:
        """Nothing to do: bytes are written when HDF5 hands them over, or at :meth:`commit`."""

    # -- what the recorder calls ---------------------------------------------------------------

    def commit(self) -> None:
        """Make everything written so far part of the dump, all of it or none of it."""
        with self._lock:
            self._write_gathered()
            if self._held or self._truncate_to is not None:
                self._write_journal()
                _apply(self._fd, self._held, self._truncate_to, self._pwrite)
                os.ftruncate(self._journal_fd, 0)
                self._held, self._truncate_to = [], None
            self._committed = os.fstat(self._fd).st_size

    def close(self) -> None:
        """Close the dump; bytes not committed are dropped (a whole dump was committed last)."""
        if self.closed:
            return
        try:
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal.unlink(missing_ok=True)
            os.close(self._fd)
        finally:
            super().close()

    def _write_journal(self) -> None:
        if self._journal_fd is None:
            self._journal_fd = os.open(self._journal, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        body = b"".join(_RECORD.pack(offset, len(data)) + data for offset, data in self._held)
        truncate_to = -1 if self._truncate_to is None else self._truncate_to
        trailer = _TRAILER.pack(_MAGIC, len(self._held), truncate_to, zlib.crc32(body))
        self._pwrite(self._journal_fd, body + trailer, 0)

    def _pwrite(self, fd: int, data, offset: int) -> None:
        """Every byte this class puts on disk passes here (the crash tests stop it midway)."""
        _write_all(fd, data, offset)


def finish_killed(dump: Path) -> bool:
    """Complete the commit a killed recording was making, if its journal is whole, and remove
    the journal. Returns whether the dump was changed. A dump still being recorded is left
    alone. Raises ``OSError`` where the dump cannot be written."""
    journal = journal_path(dump)
    if not journal.exists():
        return False
    fd = os.open(dump, os.O_RDWR)
    try:
        try:
            _lock(fd, dump)
        except DumpLockedError:
            return False  # its recorder is alive and owns the journal
        records = _read_journal(journal.read_bytes())
        if records is not None:
            _apply(fd, *records, _write_all)
        journal.unlink(missing_ok=True)
        return records is not None
    finally:
        os.close(fd)


def _read_journal(raw: bytes) -> tuple[list[tuple[int, bytes]], int | None] | None:
    """The journal's writes and truncation, or None where it is not whole (the kill came
    before the commit had begun to change the dump)."""
    if len(raw) < _TRAILER.size:
        return None
    body = raw[: -_TRAILER.size]
    magic, count, truncate_to, crc = _TRAILER.unpack(raw[-_TRAILER.size :])
    if magic != _MAGIC or zlib.crc32(body) != crc:
        return None
    records, at = [], 0
    for _ in range(count):
        offset, length = _RECORD.unpack_from(body, at)
        at += _RECORD.size
        records.append((offset, body[at : at + length]))
        at += length
    return records, None if truncate_to < 0 else truncate_to


def _apply(fd: int, held: list[tuple[int, bytes]], truncate_to: int | None, pwrite) -> None:
    for offset, data in held:
        pwrite(fd, data, offset)
    if truncate_to is not None:
        os.ftruncate(fd, truncate_to)


def _write_all(fd: int, data, offset: int) -> None:
    """``pwrite`` until every byte is written (a write may take fewer than it was given)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _overlay(view: memoryview, start: int, offset: int, data: bytes) -> None:
    """Copy the part of ``data`` (written at ``offset``) that falls in ``view`` (read at ``start``)."""
    lo, hi = max(start, offset), min(start + len(view), offset + len(data))
    if lo < hi:
        view[lo - start : hi - start] = data[lo - offset : hi - offset]


def _lock(fd: int, path: Path) -> None:
    """Hold the dump for this process, as HDF5's own lock would (HDF5 readers are refused too)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DumpLockedError(exc.errno, f"{path} is being written by another recording") from exc
        raise
