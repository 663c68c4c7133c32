"""Recording cost, each figure beside its baseline from the same run.

1. The tiny diffusers pipeline, watched vs unwatched (target: at most 1.10×).
2. The writer's throughput on large tensors vs plain h5py writing the same arrays
   (target: at least 90% of it).

    python benchmarks/record_overhead.py [--repeats 5] [--tensor-mb 64] [--tensors 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def pipeline_overhead(repeats: int, steps: int, folder: Path, size: int) -> tuple[float, float]:
    import alignkit as ak
    from alignkit.demo.pipeline import generate, tiny_pipeline

    pipe = tiny_pipeline()
    generate(pipe, steps, size=size)  # warm up
    plain, watched = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, steps, size=size)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ak.record(folder / f"bench{i}.h5", pipe):
            generate(pipe, steps, size=size)
        watched.append(time.perf_counter() - t0)
    return statistics.median(plain), statistics.median(watched)


def writer_throughput(arrays: list[np.ndarray], folder: Path, repeats: int) -> tuple[float, float]:
    """Bytes per second, median of interleaved runs after one warm-up of each (the page cache
    and alignkit's recycled copy buffers are then in their steady state)."""
    import alignkit as ak

    total = sum(a.nbytes for a in arrays)
    plain, ours = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with h5py.File(folder / f"plain{i}.h5", "w") as f:
            for j, a in enumerate(arrays):
                f.create_dataset(f"t{j}", data=a)
        plain.append(total / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with ak.Recorder(folder / f"alignkit{i}.h5") as rec:
            fn = rec.watch(lambda x: None, "writer")
            for a in arrays:
                fn(a)
        ours.append(total / (time.perf_counter() - t0))
        for path in folder.glob("*.h5"):
            path.unlink()
    return statistics.median(plain[1:]), statistics.median(ours[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128], help="image sizes: the per-call cost grows with them")
    parser.add_argument("--tensor-mb", type=int, default=64)
    parser.add_argument("--tensors", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in args.sizes:
            plain, watched = pipeline_overhead(args.repeats, args.steps, folder, size)
            ratio = watched / plain
            calls = 2 * args.steps + 3
            print(f"tiny SD pipeline, {size}×{size}, {args.steps} steps, {calls} calls (median of {args.repeats})")
            print(f"  unwatched  {plain * 1e3:8.1f} ms   ({plain / calls * 1e3:.1f} ms per call)")
            print(f"  watched    {watched * 1e3:8.1f} ms   {ratio:.3f}×  (target ≤ 1.10×: {'ok' if ratio <= 1.10 else 'MISSED'})")
        rng = np.random.default_rng(0)
        n = args.tensor_mb * (1 << 20) // 4
        arrays = [rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024) for _ in range(args.tensors)]
        plain_bps, ours_bps = writer_throughput(arrays, folder, args.repeats)
        share = ours_bps / plain_bps
        print(f"writing {args.tensors} × {args.tensor_mb} MiB float32 (median of {args.repeats}, interleaved)")
        print(f"  plain h5py {plain_bps / 1e9:8.2f} GB/s")
        print(f"  alignkit   {ours_bps / 1e9:8.2f} GB/s   {share:.0%} of plain  (target ≥ 90%: {'ok' if share >= 0.9 else 'MISSED'})")


if __name__ == "__main__":
    main()
