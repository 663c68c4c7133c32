"""Compare two large dumps: peak memory stays near one block, throughput beside a baseline.

Writes two dumps of ``--gb`` GB each (16 tensors per dump by default), then, each in a fresh
process so peak memory is its own:

- alignkit.compare (streamed, float64 blocks);
- a plain baseline: h5py reads each pair whole and numpy computes L1 and cosine.

    python benchmarks/compare_large.py [--gb 2] [--tensors 8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

# VmHWM is the peak RSS of this program alone (ru_maxrss would carry the parent's over exec).
PEAK = (
    "def peak_mb():\n    return int(next(l for l in open('/proc/self/status') if "
    "l.startswith('VmHWM')).split()[1]) / 1024\n"
)
OURS = PEAK + textwrap.dedent(
    """
    import json, sys, time
    import alignkit as ak
    t0 = time.perf_counter()
    result = ak.compare(sys.argv[1], sys.argv[2])
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "peak_mb": peak_mb(), "verdict": result.verdict}))
    """
)
BASELINE = PEAK + textwrap.dedent(
    """
    import json, sys, time
    import h5py, numpy as np
    t0 = time.perf_counter()
    with h5py.File(sys.argv[1]) as r, h5py.File(sys.argv[2]) as t:
        for name in r["calls"]:
            for key, ds in r["calls"][name]["inputs"].items():
                a = ds[()].astype(np.float64).ravel()
                b = t["calls"][name]["inputs"][key][()].astype(np.float64).ravel()
                l1 = np.abs(a - b).mean(); cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "peak_mb": peak_mb()}))
    """
)


def make_dumps(folder: Path, gb: float, tensors: int) -> tuple[Path, Path, float]:
    import alignkit as ak

    per = max(1, int(gb * (1 << 30) / tensors / 4) // 1024) * 1024  # whole rows of 1024
    rng = np.random.default_rng(0)
    base = rng.standard_normal(per, dtype=np.float32).reshape(-1, 1024)
    noise = rng.standard_normal(base.shape, dtype=np.float32) * 1e-4
    paths = folder / "big_ref.h5", folder / "big_tgt.h5"
    for path, delta in zip(paths, (0.0, 1.0)):
        with ak.Recorder(path) as rec:
            fn = rec.watch(lambda x: None, "big")
            for i in range(tensors):
                fn(base + np.float32(i) + noise * delta)
                ak.step()
    return *paths, tensors * base.nbytes / 1e9


def run(code: str, *args: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="size of each dump")
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--keep", type=Path, default=None, help="write the dumps here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ref, tgt, gb = make_dumps(folder, args.gb, args.tensors)
        print(
            f"wrote two dumps of {gb:.2f} GB each ({args.tensors} tensors of {gb / args.tensors * 1e3:.0f} MB) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        ours, base = run(OURS, ref, tgt), run(BASELINE, ref, tgt)
        both = 2 * gb
        print(f"{'':24}{'seconds':>10}{'GB/s':>10}{'peak RSS MB':>14}")
        print(
            f"{'alignkit compare':24}{ours['seconds']:>10.2f}{both / ours['seconds']:>10.2f}{ours['peak_mb']:>14.0f}  "
            f" verdict: {ours['verdict']}"
        )
        print(
            f"{'h5py read + numpy':24}{base['seconds']:>10.2f}{both / base['seconds']:>10.2f}{base['peak_mb']:>14.0f}"
        )
        print(
            f"peak RSS of importing alignkit alone is about 80 MB; one tensor is {gb / args.tensors * 1e3:.0f} MB; "
            "alignkit's blocks are 2 MiB of float64 per side"
        )


if __name__ == "__main__":
    main()
