"""Write recorded calls to HDF5 in a background thread, behind a bounded queue.

The pipeline thread copies small tensors out and enqueues them, and writes large ones into
``/data`` itself (:meth:`DumpWriter.stage`); this thread does the rest of the HDF5 work, in
the layout :mod:`alignkit.storage.stacks` places calls in.
Memory is bounded by ``max_pending_bytes``: a producer that would exceed it waits.

Crash safety: the metadata cache never evicts and freed file space is never reused, so HDF5
only rewrites the file's structures when it flushes, and it flushes through a
:class:`~alignkit.storage.journal.JournaledFile`, which makes each flush reach the dump whole or
not at all. We flush at step boundaries (at most every FLUSH_INTERVAL, and whenever the writer
idles), so a process killed with ``kill -9`` at any moment leaves the dump as of a recent
completed step. Before each call the writer checks that the disk (and
the process's file-size limit) has room; when it does not, recording stops with a warning and
the file is closed cleanly.

Calls are written in batches, just before the flush that makes them durable: written sooner,
they would be no safer. A batch costs the pipeline less than the same calls written one at a
time as they come (the thread then wakes, takes the GIL and competes for the cores once per
call), and a run shorter than FLUSH_INTERVAL is written when it ends, when nothing competes.
Calls wait in memory for at most FLUSH_INTERVAL, or until a quarter of ``max_pending_bytes``
is held. Until a step boundary is seen, each call counts as one.

The thread runs at a low CPU priority (nice +10, Linux): where the pipeline keeps every core
busy, it writes mostly in the pipeline's gaps and catches up at close, instead of preempting
the work the recording is meant to observe. Not the lowest (19): other programs on a loaded
machine would then starve it, and a kill would lose more of the run.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from alignkit.errors import RecordingError, UsageError, os_reason
from alignkit.storage.journal import DumpLockedError, JournaledFile
from alignkit.storage.objects import create_group, set_attrs
from alignkit.storage.records import CallRecord
from alignkit.storage.schema import FORMAT_NAME, FORMAT_VERSION, PIPELINE_CALLS, SUBMODELS, escape_name
from alignkit.storage.stacks import CallLayout

_HEADROOM = 4 * 1024 * 1024  # bytes kept free for the final metadata flush
_CALL_METADATA = 64 * 1024  # more than the headers, links and attributes of one call take
FLUSH_INTERVAL = 0.5  # seconds: at most two step-boundary flushes a second
WRITER_NICENESS = 10  # how much nicer the writer thread is than the pipeline: it yields the CPU, and is not starved


_FLUSH = object()
_STOP = object()
_IDLE = object()  # no item came in time: make a step boundary durable


class DumpWriter:
    """Owns one dump file; ``put`` and ``stage`` from any thread, ``close`` once at the end."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, Any], max_pending_bytes: int = 512 << 20):
        self.path = Path(path)
        self._file, self._disk, self._layout = _create_dump(self.path, metadata)
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._limit = max_pending_bytes
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._failed_at = ""  # which call the writer failed on, for the error message
        self._stopped_reason: str | None = None
        self._warned = False
        self.calls_written = 0
        self._calls_are_steps = True  # until a step boundary is seen, each call ends a step
        self._last_flush, self._unflushed = time.monotonic(), False  # the new file is flushed
        self._held: list[CallRecord] = []  # calls to write at the next flush
        self._held_bytes = 0
        self._room = _Room(self.path)
        self._file_lock = threading.Lock()  # held while staging from a caller thread, and to close
        self._thread = threading.Thread(target=self._run, name="alignkit-writer", daemon=True)
        self._thread.start()

    @property
    def stopped_reason(self) -> str | None:
        """Why recording stopped early (disk full, write error), or None."""
        return self._stopped_reason

    def put(self, record: CallRecord) -> None:
        """Enqueue a call; waits while too many bytes are pending."""
        if self._stopped_reason is not None:
            self._warn_once()
            return
        size = record.nbytes
        with self._cond:
            while self._pending > 0 and self._pending + size > self._limit and self._thread.is_alive():
                self._cond.wait(0.1)
            self._pending += size
        self._queue.put(record)

    def stage(self, data: np.ndarray) -> str | None:
        """Write a large array into the dump now, from the calling thread, under ``/staging``.

        This is the call-time copy of a large host tensor: one pass over its bytes (a copy
        and a later write would be two) and nothing held in memory. The writer lists it with
        its call when it writes the call; what no written call lists when recording ends
        (calls dropped after an early stop) is unlinked then. None when recording has stopped
        or the disk has no room: the caller copies the array instead, and the writer stops.
        """
        with self._file_lock:
            if self._file is None or self._stopped_reason is not None or self._room.claim(data.nbytes):
                return None
            try:
                return self._layout.stage(data)
            except Exception:  # the writer meets the same trouble with the copy, and says why
                return None

    def flush(self) -> None:
        """Ask for a flush once everything queued so far is written (a step boundary)."""
        self._queue.put(_FLUSH)

    def close(self, metadata: dict[str, Any] | None = None) -> None:
        """Drain the queue, write final metadata, close; raise if writing failed."""
        self._queue.put((_STOP, metadata or {}))
        self._thread.join()
        if self._error is not None:
            raise RecordingError(f"{self.path}: recording failed{self._failed_at}: {self._error}") from self._error
        if self._stopped_reason is not None:
            self._warn_once()

    def _warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"alignkit: {self._stopped_reason}", RuntimeWarning, stacklevel=3)

    def _run(self) -> None:
        _lower_priority()
        while True:
            try:
                item = self._queue.get(timeout=self._flush_due())
            except queue.Empty:  # idle with a step boundary not yet durable: make it so now
                item = _IDLE
            try:
                if isinstance(item, CallRecord):
                    self._hold(item)
                elif self._handle(item):
                    return
            except BaseException as exc:  # surfaced by close(); keep draining
                self._fail(exc)

    def _handle(self, item: Any) -> bool:
        """Do what a queued item other than a call asks; True once recording has ended."""
        if item is _IDLE:
            self._flush()
        elif isinstance(item, tuple) and item and item[0] is _STOP:
            self._write_held()
            self._finish(item[1])
            return True
        elif item is _FLUSH:
            self._step_ended()
        elif isinstance(item, _Group):
            if self._file is not None:
                _write_group(self._file, item.parent, item.name, item.attrs, item.replace)
        elif isinstance(item, _SetAttr):  # the step source, set at the first step boundary
            if self._file is not None:
                self._file.attrs[item.key] = item.value
            self._calls_are_steps = False
            self._step_ended()
        return False

    def _hold(self, record: CallRecord) -> None:
        """Keep a call for the flush that makes it durable; write sooner when too many bytes
        are held."""
        self._held.append(record)
        self._held_bytes += record.nbytes
        if self._calls_are_steps:
            self._step_ended()  # no step boundary seen yet: each call is durable as a step is
        elif self._held_bytes >= self._limit // 4:
            self._write_held()

    def _write_held(self) -> None:
        """Write the held calls in order (dropped after a failure or an early stop), and give
        back their memory."""
        held, self._held, self._held_bytes = self._held, [], 0
        try:
            for record in held:
                try:
                    self._write_or_stop(record)
                except BaseException as exc:  # surfaced by close(); the calls after it are dropped
                    self._fail(exc, record)
            try:
                if self._file is not None:
                    self._layout.write_rows()
            except BaseException as exc:
                self._fail(exc)
        finally:
            for record in held:
                _give_back(record)
            with self._cond:
                self._pending -= sum(record.nbytes for record in held)
                self._cond.notify_all()

    def _write_or_stop(self, record: CallRecord) -> None:
        if self._file is None:
            return
        shortage = self._room.claim(record.nbytes)
        if shortage:
            self._stopped_reason = (
                f"recording stopped at call {record.seq} ({record.submodel}): {shortage}; "
                f"{self.path} holds the {self.calls_written} calls before it"
            )
            self._finish({"stopped": shortage})
            return
        for tensor in record.tensors():
            if tensor.ready is not None:
                tensor.ready()  # an asynchronous device copy must land before it is written
        self._layout.add(record)
        self.calls_written += 1

    def _step_ended(self) -> None:
        """Flush at a step boundary, but not more often than every FLUSH_INTERVAL seconds."""
        if time.monotonic() - self._last_flush >= FLUSH_INTERVAL:
            self._flush()
        else:
            self._unflushed = True

    def _flush_due(self) -> float | None:
        """How long the queue may stay idle before an unflushed step boundary is flushed."""
        if not self._unflushed:
            return None
        return max(0.0, FLUSH_INTERVAL - (time.monotonic() - self._last_flush))

    def _flush(self) -> None:
        """Write the held calls and their rows of the tables, and make the file durable."""
        self._write_held()
        if self._file is not None:
            self._layout.write_tables()
            self._file.flush()
            self._disk.commit()
        self._last_flush, self._unflushed = time.monotonic(), False

    def _finish(self, metadata: dict[str, Any]) -> None:
        with self._file_lock:
            if self._file is None:
                return
            try:
                self._layout.finish()
                for key, value in metadata.items():
                    self._file.attrs[key] = value
                self._file.attrs["complete"] = self._stopped_reason is None and self._error is None
                self._file.attrs["num_calls"] = self.calls_written
            finally:
                self._close_file()

    def _close_file(self) -> None:
        """Close the HDF5 file and commit what closing wrote; where that fails, the dump stays
        as of the last flush."""
        file, self._file = self._file, None
        try:
            file.close()
            self._disk.commit()
        finally:
            self._disk.close()

    def _fail(self, exc: BaseException, record: CallRecord | None = None) -> None:
        if self._error is None:
            self._error = exc
            if record is not None:
                self._failed_at = f" at call {record.seq} ({record.submodel}, step {record.step}, call {record.call})"
            self._stopped_reason = f"recording stopped: {exc}"
        with self._file_lock:
            try:
                if self._file is not None:
                    self._layout.write_tables()  # the calls written before it stay listed
            except Exception:
                pass
            try:
                if self._file is not None:
                    self._file.attrs["writer_error"] = f"{type(exc).__name__}: {exc}{self._failed_at}"
            except Exception:  # the failure itself may forbid writing more: the dump then reads as killed
                pass
            try:
                if self._file is not None:
                    self._close_file()
            except Exception:
                pass

    def set_attr(self, key: str, value: Any) -> None:
        """Set a root attribute, in order with the queued calls (e.g. the step source)."""
        self._queue.put(_SetAttr(key, value))

    def describe(self, submodel: str, attrs: dict[str, str], *, replace: bool = False) -> None:
        """Say what a submodel is (its class, its config) under ``/submodels``."""
        self._queue.put(_Group(SUBMODELS, submodel, attrs, replace))

    def note_pipeline_call(self, index: int, attrs: dict[str, Any]) -> None:
        """Keep a pipeline call's arguments under ``/pipeline_calls/<index>``."""
        self._queue.put(_Group(PIPELINE_CALLS, str(index), attrs))


@dataclass
class _SetAttr:
    key: str
    value: Any


@dataclass
class _Group:
    """A group of attributes outside the calls, written once (the first of a name wins, unless
    ``replace``: a submodel name given to another object)."""

    parent: str
    name: str
    attrs: dict[str, Any]
    replace: bool = False


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority, where that touches this thread alone
    (on Linux a thread id names one thread to setpriority; elsewhere it could name a process)."""
    if sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICENESS))
        except OSError:  # a sandbox may refuse: the writer then runs at normal priority
            pass


def _give_back(record: CallRecord) -> None:
    """Return the record's recycled pinned buffers once they are written (or dropped)."""
    for tensor in record.tensors():
        if tensor.release is not None:
            if tensor.ready is not None:
                tensor.ready()  # a dropped record's device copy may still be landing
            release, tensor.release = tensor.release, None
            release()


def _create_dump(path: Path, metadata: dict[str, Any]) -> tuple[h5py.File, JournaledFile, CallLayout]:
    """Create the dump file (and its folder), or say in one line why it cannot be."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory: give the dump a file name, e.g. {path / 'ref.h5'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        disk = JournaledFile(path)
        try:
            f, layout = _create(disk, metadata)
            return f, disk, layout
        except BaseException:
            disk.close()
            raise
    except DumpLockedError as exc:
        raise UsageError(f"{path} is being written by another recording: give this one another file name") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot write a dump here ({os_reason(exc)})") from exc


def _create(disk: JournaledFile, metadata: dict[str, Any]) -> tuple[h5py.File, CallLayout]:
    f = h5py.File(disk, "w", fs_strategy="none", track_order=True, libver=("v110", "latest"))
    config = f.id.get_mdc_config()
    config.evictions_enabled = False
    config.incr_mode = 0
    config.flash_incr_mode = 0
    config.decr_mode = 0
    f.id.set_mdc_config(config)
    plain = {
        key: value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
        for key, value in metadata.items()
    }
    set_attrs(f.id, {**plain, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step_source": "none"})
    f.attrs["complete"] = False
    layout = CallLayout(f)
    f.flush()
    disk.commit()
    return f, layout


def _write_group(f: h5py.File, parent_name: str, name: str, attrs: dict[str, Any], replace: bool = False) -> None:
    parent = f[parent_name].id if parent_name in f else create_group(f.id, parent_name)
    link = escape_name(name)
    if parent.links.exists(link.encode("utf-8")):
        if not replace:
            return
        del f[parent_name][link]
    group = create_group(parent, link)
    set_attrs(group, attrs if link == name else {**attrs, "name": name})


class _Room:
    """How much more the dump may take before the disk or the file-size limit runs out.

    Asking costs a few system calls, more than writing a small call, so the answer is kept and
    counted down, and asked again once it runs low or is FLUSH_INTERVAL old (another process
    may be filling the same disk)."""

    def __init__(self, path: Path):
        self._path = path
        self._left: int | None = None
        self._why = ""
        self._asked = float("-inf")
        self._lock = threading.Lock()

    def claim(self, nbytes: int) -> str | None:
        """Count ``nbytes`` (plus a call's metadata) as written; why not, when there is no room."""
        need = nbytes + _CALL_METADATA + _HEADROOM
        with self._lock:
            if self._left is None or need > self._left or time.monotonic() - self._asked >= FLUSH_INTERVAL:
                self._left, self._why = _room(self._path)
                self._asked = time.monotonic()
            if self._left is None:
                return None
            if need > self._left:
                return self._why.format(need=need)
            self._left -= nbytes + _CALL_METADATA
            return None


def _room(path: Path) -> tuple[int | None, str]:
    """Bytes the file may still grow by (None when the system cannot say), and what limits it."""
    left, why = None, ""
    try:
        free = shutil.disk_usage(path.parent).free
        left, why = free, f"the disk is full ({free} bytes free, {{need}} needed)"
    except OSError:
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            allowed = soft - path.stat().st_size
            if left is None or allowed < left:
                left, why = allowed, f"the file-size limit of {soft} bytes is reached"
    except (ImportError, OSError, ValueError):
        pass
    return left, why
