"""Dumps of many small tensors (a layer-by-layer recording): listing and comparing them,
each beside a plain-h5py baseline doing the same work in the same run.

Writes two dumps of ``--calls`` calls × ``--per-call`` small tensors each (100k tensors by
default), then times:

- listing every tensor (name, dtype, shape): ``Dump.tensors`` against plain h5py reading the
  same ``/tensors`` table (the fair pair); ``Dump.tensors`` from the calls' groups (what a
  killed run's reader does) against plain h5py visiting every dataset (the fair pair for that);
- comparing the two dumps: ``alignkit.compare`` (every metric, the floor, the verdict) against
  a lean h5py script that holds each call's group handles and computes L1 and cosine.

Each row is the median of ``--repeats`` interleaved runs (order alternating), with its range.

    python benchmarks/many_tensors.py [--calls 5000] [--per-call 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def make_dumps(folder: Path, calls: int, per_call: int) -> tuple[Path, Path]:
    import alignkit as ak

    rng = np.random.default_rng(0)
    feed = {f"layer{i}": rng.standard_normal((8, 16), dtype=np.float32) for i in range(per_call)}
    paths = folder / "ref.h5", folder / "tgt.h5"
    for path, noise in zip(paths, (0.0, 1e-6)):  # within the default thresholds: aligned
        shifted = {k: v + np.float32(noise) for k, v in feed.items()}
        with ak.Recorder(path) as rec:
            fn = rec.watch(lambda **tensors: None, "net")
            for _ in range(calls):
                fn(**shifted)
                ak.step()
    return paths


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ours_listing(path: Path) -> int:
    import alignkit as ak

    with ak.open_dump(path) as d:
        return len(d.tensors)


def plain_listing(path: Path) -> int:
    rows = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and name.startswith("calls/"):
            rows.append((name, obj.dtype.name, obj.shape, obj.attrs.get("dtype")))

    with h5py.File(path) as f:
        f.visititems(visit)
    return len(rows)


def ours_compare(ref: Path, tgt: Path) -> str:
    import alignkit as ak

    return ak.compare(ref, tgt).verdict


def plain_table(path: Path) -> int:
    with h5py.File(path) as f:
        return len(f["tensors"][()])


def lean_compare(ref: Path, tgt: Path) -> int:
    """What a careful engineer writes: group handles held, each pair read once, float64 sums."""
    n = 0
    with h5py.File(ref) as r, h5py.File(tgt) as t:
        ref_calls, tgt_calls = r["calls"], t["calls"]
        for name in ref_calls:
            a_side, b_side = ref_calls[name]["inputs"], tgt_calls[name]["inputs"]
            for key in a_side:
                a, b = a_side[key][()].ravel(), b_side[key][()].ravel()
                d = (b - a).astype(np.float64)
                np.abs(d).mean(), float(np.dot(a, b)) / float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--per-call", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seconds, (ref, tgt) = timed(lambda: make_dumps(folder, args.calls, args.per_call))
        n = args.calls * args.per_call
        print(f"wrote two dumps of {n} tensors each in {seconds:.1f} s")
        no_table = folder / "no_table.h5"
        shutil.copy(ref, no_table)
        with h5py.File(no_table, "a") as f:
            del f["tensors"]
        jobs = {
            "list: Dump.tensors (/tensors table)": lambda: ours_listing(ref),
            "list: plain h5py /tensors table": lambda: plain_table(ref),
            "list: Dump.tensors (calls' groups)": lambda: ours_listing(no_table),
            "list: plain h5py visititems": lambda: plain_listing(ref),
            "compare: alignkit.compare": lambda: ours_compare(ref, tgt),
            "compare: lean h5py + numpy": lambda: lean_compare(ref, tgt),
        }
        times: dict[str, list[float]] = {label: [] for label in jobs}
        results: dict[str, Any] = {}
        for i in range(args.repeats):
            for label in list(jobs)[:: 1 if i % 2 == 0 else -1]:
                seconds, results[label] = timed(jobs[label])
                times[label].append(seconds)
        print(f"{'':40}{'seconds, median (range)':>26}{'µs a tensor':>14}   result")
        for label, runs in times.items():
            med = statistics.median(runs)
            cell = f"{med:.2f} ({min(runs):.2f}–{max(runs):.2f})"
            print(f"{label:40}{cell:>26}{med / n * 1e6:>14.1f}   {results[label]}")


if __name__ == "__main__":
    main()
