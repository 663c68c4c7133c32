"""A Dask cluster to spread comparisons over: a scheduler's address, or ``local[:N]``.

Work goes to Dask's own scheduler (no scheduler of alignkit's); each task opens the dumps by
path on its worker, so workers read the files where they lie (a shared file system, or the
machine a rank's dump was written on), and only results travel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alignkit.errors import UsageError, require

LOCAL = "local"  # --dask local[:N]: a cluster of N worker processes on this machine


@contextmanager
def environ_kept() -> Iterator[None]:
    """Put back this process's environment as it was: a local Dask cluster sets OMP_NUM_THREADS,
    MKL_NUM_THREADS and OPENBLAS_NUM_THREADS to 1 (and more) in the process that starts it, for its
    workers, and leaves them there; a torch started later in the same process would then run on one
    thread."""
    before = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


@contextmanager
def client_for(address: str) -> Iterator[Any]:
    distributed = require("distributed", "dask")
    Client, LocalCluster = distributed.Client, distributed.LocalCluster
    if address == LOCAL or address.startswith(LOCAL + ":"):
        n = address.partition(":")[2]
        if n and not n.isdigit():
            raise UsageError(f"--dask {address}: expected local or local:N, N the number of workers")
        with environ_kept():
            cluster = LocalCluster(n_workers=int(n or 2), threads_per_worker=1, processes=True, dashboard_address=None)
            with cluster, Client(cluster) as client:
                yield client
        return
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise UsageError(f"--dask {address}: cannot reach the scheduler ({exc})") from None
    with client:
        yield client


PARTS_PER_WORKER = 4  # slices of the calls per worker: enough to even out slices of unequal cost


def table_on_cluster(
    client: Any,
    ref: str | os.PathLike,
    tgt: str | os.PathLike,
    calls: Any,
    names: Any,
    limits: Any,
    carried: Any,
    progress: Any = None,
) -> Any:
    """The table of one pair of dumps (:func:`~alignkit.comparison.table.table_rows`), its calls sliced
    over the cluster's workers, each slice's rows computed where the worker opens the dumps;
    the slices joined in order. The names each worker's map matched are merged back into
    ``names``, so that a map entry that matched nothing is still refused."""
    from distributed import as_completed

    from alignkit.comparison.table import as_table

    workers = max(1, len(client.scheduler_info().get("workers", {})))
    size = max(1, -(-len(calls) // (workers * PARTS_PER_WORKER)))
    slices = [calls.iloc[i : i + size] for i in range(0, len(calls), size)] or [calls]
    paths = os.path.abspath(os.fspath(ref)), os.path.abspath(os.fspath(tgt))
    futures = {
        client.submit(_table_part, *paths, part, names, limits, carried, pure=False): i for i, part in enumerate(slices)
    }
    parts: dict[int, Any] = {}
    done = 0
    for future in as_completed(futures):
        rows, used = future.result()
        parts[futures[future]] = rows
        names.used.update(used)
        done += len(slices[futures[future]])
        if progress is not None:
            progress(done - 1)
    return as_table([row for i in range(len(slices)) for row in parts[i]])


def _table_part(ref: str, tgt: str, calls: Any, names: Any, limits: Any, carried: Any) -> tuple[list, set[str]]:
    """Run on a worker: one slice's rows, and the map entries it used."""
    from alignkit.comparison.table import table_rows
    from alignkit.storage.reader import open_dump

    with open_dump(ref) as r, open_dump(tgt) as t:
        return table_rows(r, t, calls, names, limits, None, carried), set(names.used)
