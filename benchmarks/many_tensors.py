"""Dumps of many small tensors (a layer-by-layer recording): listing and comparing them,
each beside a plain-h5py baseline doing the same work in the same run.

Writes two dumps of ``--calls`` calls × ``--per-call`` small tensors each (100k tensors by
default), then times:

- listing every tensor (name, dtype, shape): ``Dump.tensors`` against plain h5py reading the
  same ``/tensors`` table;
- comparing the two dumps: ``alignkit.compare`` (every metric, the floor, the verdict) against
  a lean h5py script that reads the same table, each stack once, and computes L1 and cosine
  pair by pair in float64; and, for scale, the same script computing them for a whole stack
  at once (what no tool that pairs tensors by call can do, and the floor of the layout).

Each row is the median of ``--repeats`` interleaved runs (order alternating), with its range.

    python benchmarks/many_tensors.py [--calls 5000] [--per-call 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

TARGET_S = 3.0  # 100k small pairs


def make_dumps(folder: Path, calls: int, per_call: int) -> tuple[Path, Path]:
    import alignkit as ak

    rng = np.random.default_rng(0)
    feed = {f"layer{i}": rng.standard_normal((8, 16), dtype=np.float32) for i in range(per_call)}
    paths = folder / "ref.h5", folder / "tgt.h5"
    for path, noise in zip(paths, (0.0, 1e-6)):  # within the default thresholds: aligned
        with ak.Recorder(path) as rec:
            fn = rec.watch(lambda **tensors: None, "net")
            for call in range(calls):  # other values at every call, as a layer's outputs are
                fn(**{k: v + np.float32(call + noise) for k, v in feed.items()})
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


def ours_compare(ref: Path, tgt: Path) -> str:
    import alignkit as ak

    return ak.compare(ref, tgt).verdict


def plain_table(path: Path) -> int:
    with h5py.File(path) as f:
        return len(f["tensors"][()])


def _stacks(f: h5py.File) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The tensor table, and every stack it names read whole (they are small)."""
    table = f["tensors"][()]
    paths = {p.decode() for p in table["path"]}
    return table, {p: f[p][()] for p in paths}


def lean_compare(ref: Path, tgt: Path) -> int:
    """What a careful engineer writes: the table read once, each stack read once, float64 sums
    pair by pair (the tensors are paired by their row of the table: the dumps list the same)."""
    n = 0
    with h5py.File(ref) as r, h5py.File(tgt) as t:
        (ref_table, ref_stacks), (tgt_table, tgt_stacks) = _stacks(r), _stacks(t)
        for a_row, b_row in zip(ref_table, tgt_table):
            a = ref_stacks[a_row["path"].decode()][a_row["row"]].ravel().astype(np.float64)
            b = tgt_stacks[b_row["path"].decode()][b_row["row"]].ravel().astype(np.float64)
            d = b - a
            np.abs(d).mean(), float(np.dot(a, b)) / float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
            n += 1
    return n


def stacked_compare(ref: Path, tgt: Path) -> int:
    """The same figures for every row of a stack at once."""
    n = 0
    with h5py.File(ref) as r, h5py.File(tgt) as t:
        for name in r["stacks"]:
            a = r["stacks"][name][()].reshape(len(r["stacks"][name]), -1).astype(np.float64)
            b = t["stacks"][name][()].reshape(len(a), -1).astype(np.float64)
            np.abs(b - a).mean(axis=1), (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
            n += len(a)
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
        jobs = {
            "list: Dump.tensors": lambda: ours_listing(ref),
            "list: plain h5py /tensors table": lambda: plain_table(ref),
            "compare: alignkit.compare": lambda: ours_compare(ref, tgt),
            "compare: lean h5py + numpy, by pair": lambda: lean_compare(ref, tgt),
            "compare: lean, a stack at once": lambda: stacked_compare(ref, tgt),
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
        med = statistics.median(times["compare: alignkit.compare"])
        print(f"compare of {n} pairs: {med:.2f} s; target ≤ {TARGET_S:.0f} s: {'met' if med <= TARGET_S else 'MISSED'}")


if __name__ == "__main__":
    main()
