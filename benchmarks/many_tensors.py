"""Dumps of many small tensors (a layer-by-layer recording): listing and comparing them,
each beside a plain-h5py baseline doing the same work in the same run.

Writes two dumps of ``--calls`` calls × ``--per-call`` small tensors each (100k tensors by
default), then times:

- listing every tensor (name, dtype, shape): ``Dump.tensors`` from the ``/tensors`` table, the
  same from the calls' groups (what a killed run's reader does), and plain h5py visiting every
  dataset;
- comparing the two dumps: ``alignkit.compare`` (every metric, with the verdict) and plain
  h5py reading each pair with numpy computing L1 and cosine.

    python benchmarks/many_tensors.py [--calls 5000] [--per-call 20]
"""

from __future__ import annotations

import argparse
import shutil
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


def plain_compare(ref: Path, tgt: Path) -> int:
    n = 0
    with h5py.File(ref) as r, h5py.File(tgt) as t:
        for name in r["calls"]:
            for key, ds in r["calls"][name]["inputs"].items():
                a = ds[()].astype(np.float64).ravel()
                b = t["calls"][name]["inputs"][key][()].astype(np.float64).ravel()
                np.abs(a - b).mean(), a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--per-call", type=int, default=20)
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
        rows = [
            ("list: Dump.tensors (/tensors table)", *timed(lambda: ours_listing(ref))),
            ("list: Dump.tensors (calls' groups)", *timed(lambda: ours_listing(no_table))),
            ("list: plain h5py visititems", *timed(lambda: plain_listing(ref))),
            ("compare: alignkit.compare", *timed(lambda: ours_compare(ref, tgt))),
            ("compare: h5py read + numpy", *timed(lambda: plain_compare(ref, tgt))),
        ]
        print(f"{'':40}{'seconds':>10}{'µs a tensor':>14}   result")
        for label, seconds, result in rows:
            print(f"{label:40}{seconds:>10.2f}{seconds / n * 1e6:>14.1f}   {result}")


if __name__ == "__main__":
    main()
