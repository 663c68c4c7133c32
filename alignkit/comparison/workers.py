"""Separate tensor pairs on separate cores, each computed on one thread.

A pair's metrics are a few passes over 1 MiB blocks. numpy releases the GIL for them, so two
pairs computed on two threads overlap each other and the reads that h5py makes under the GIL.
BLAS is held to one thread the while: OpenBLAS otherwise starts a thread per core for every
dot product, and on a machine that other programs keep busy those threads wait on each other
(a compare ran 14 times slower beside two busy processes).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from threadpoolctl import threadpool_limits

T = TypeVar("T")
R = TypeVar("R")

AHEAD = 4  # items submitted per worker beyond the one it runs: enough to keep it busy, little held in memory


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def one_blas_thread() -> Iterator[None]:
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def in_order(
    work: Callable[[T], R], items: Iterable[T], heavy: Callable[[T], bool], workers: int | None = None
) -> Iterator[R]:
    """``work`` of each item, yielded in the items' order. Heavy items are computed on a pool of
    ``workers`` threads (one per core by default), light ones on the calling thread, in the
    meantime: a small tensor's compare is mostly Python, which threads only slow down by
    contending for the GIL. BLAS runs on one thread throughout. An exception is raised where
    its item's result would have been yielded. Only a few items are in flight at any time."""
    workers = workers or cores()
    with one_blas_thread(), ThreadPoolExecutor(max(workers, 1), thread_name_prefix="alignkit-compare") as pool:
        pending: deque[Future | _Done] = deque()
        for item in items:
            pending.append(pool.submit(work, item) if workers > 1 and heavy(item) else _Done(work, item))
            while pending and (isinstance(pending[0], _Done) or len(pending) > workers * AHEAD):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Done:
    """A light item's result, computed at once, held in line with the futures before it."""

    def __init__(self, work: Callable[[T], R], item: T):
        try:
            self._value, self._error = work(item), None
        except Exception as exc:  # raised in order, as a future's would be
            self._value, self._error = None, exc

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value
