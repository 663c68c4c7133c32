"""Compare two dumps: throughput and peak memory, beside a careful baseline.

Three cases, each with its own pair of dumps:

- large: ``--gb`` GB per dump in 8 tensors, and a third dump whose tensors drop the leading
  axis (``[N]`` against the reference's ``[rows, 1024]``: an export that drops a batch axis);
- small: 1,000 tensors of 128 KiB per dump;
- loaded: the large dumps, while two busy processes keep the machine's cores occupied.

Each row runs in a fresh process so that its peak RSS (VmHWM) is its own, interleaved
``--repeats`` times in alternating order:

- ``alignkit compare`` (streamed float64 metrics, the noise floor, diagnosis, the table);
- the careful baseline: the dump's ``/tensors`` table read once, then h5py ``read_direct`` into
  two reused float32 buffers of 1 MiB (a large tensor's dataset in blocks of rows, a small
  tensor's row of its stack at once), float32 blocks with float64 accumulation of L1, cos,
  max-abs and SQNR — what an engineer writes for this job;
- alignkit on the other-shape pair, which must stay near one block of memory too.

Each figure is the median of the repeats, with its range. alignkit computes more than the
baseline (ten metrics, the floor, a verdict): the ratio says what that costs.

    python benchmarks/compare_large.py [--gb 1] [--repeats 3] [--keep DIR] [--cases large small loaded]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
CAREFUL = PEAK + textwrap.dedent(
    """
    import json, sys, time
    import h5py, numpy as np
    ROWS = (1 << 20) // (4 * 1024)  # 1 MiB of float32 rows of 1024
    t0 = time.perf_counter()
    a, b, d = (np.empty((ROWS, 1024), np.float32) for _ in range(3))
    def blocks(ds, row, buf):  # (rows read, their count): a dataset in 1 MiB blocks, a stack's row at once
        if row >= 0:
            n = ds.shape[1]
            ds.read_direct(buf, np.s_[row], np.s_[0:n])
            yield n
            return
        for i in range(0, ds.shape[0], ROWS):
            n = min(ROWS, ds.shape[0] - i)
            ds.read_direct(buf, np.s_[i : i + n], np.s_[0:n])
            yield n
    with h5py.File(sys.argv[1]) as r, h5py.File(sys.argv[2]) as t:
        for x_row, y_row in zip(r["tensors"][()], t["tensors"][()]):  # the same calls, in the same order
            ds, other = r[x_row["path"].decode()], t[y_row["path"].decode()]
            l1 = dot = aa = bb = dd = mx = 0.0
            for n, m in zip(blocks(ds, x_row["row"], a), blocks(other, y_row["row"], b)):
                x, y, e = a[:n].ravel(), b[:n].ravel(), d[:n].ravel()
                np.subtract(y, x, out=e)
                dd += float(np.dot(e, e)); dot += float(np.dot(x, y))
                aa += float(np.dot(x, x)); bb += float(np.dot(y, y))
                np.abs(e, out=e)
                l1 += float(e.sum(dtype=np.float64)); mx = max(mx, float(e.max()))
            cos = dot / (aa * bb) ** 0.5
            sqnr = 10 * np.log10(aa / dd) if dd else float("inf")
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "peak_mb": peak_mb()}))
    """
)


BUSY = "while True: pass"


def make_dumps(folder: Path, prefix: str, gb: float, tensors: int) -> tuple[Path, Path, Path, float]:
    import alignkit as ak

    per = max(1, int(gb * (1 << 30) / tensors / 4) // 1024) * 1024  # whole rows of 1024
    rng = np.random.default_rng(0)
    base = rng.standard_normal(per, dtype=np.float32).reshape(-1, 1024)
    noise = rng.standard_normal(base.shape, dtype=np.float32) * 1e-4
    paths = folder / f"{prefix}_ref.h5", folder / f"{prefix}_tgt.h5", folder / f"{prefix}_flat.h5"
    for path, delta, flat in zip(paths, (0.0, 1.0, 1.0), (False, False, True)):
        with ak.Recorder(path) as rec:
            fn = rec.watch(lambda x: None, "big")
            for i in range(tensors):
                value = base + np.float32(i) + noise * delta
                fn(value.reshape(-1) if flat else value)
                ak.step()
    return *paths, tensors * base.nbytes / 1e9


def run(code: str, *args: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def time_rows(rows: dict[str, tuple[str, Path, Path]], repeats: int) -> dict[str, list[dict]]:
    figures: dict[str, list[dict]] = {name: [] for name in rows}
    for i in range(repeats):
        for name in list(rows)[:: 1 if i % 2 == 0 else -1]:
            code, ref, target = rows[name]
            figures[name].append(run(code, ref, target))
    return figures


def report(case: str, figures: dict[str, list[dict]], gb: float, note: str) -> float:
    both = 2 * gb
    print(f"\n{case}: {note}")
    print(f"{'':30}{'GB/s, median (range)':>26}{'peak RSS MB, median (range)':>32}")
    for name, runs in figures.items():
        speed = median_range([both / r["seconds"] for r in runs], ".2f")
        peak = median_range([r["peak_mb"] for r in runs], ".0f")
        verdict = f"   verdict: {runs[0]['verdict']}" if "verdict" in runs[0] else ""
        print(f"{name:30}{speed:>26}{peak:>32}{verdict}")
    ratio = statistics.median(r["seconds"] for r in figures["careful h5py + numpy"]) / statistics.median(
        r["seconds"] for r in figures["alignkit compare"]
    )
    print(f"alignkit runs at {ratio:.2f} of the careful baseline's speed")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of each large dump")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="write the dumps here instead of a temporary folder")
    parser.add_argument(
        "--cases", nargs="+", default=["large", "small", "loaded"], choices=["large", "small", "loaded"]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        big = make_dumps(folder, "big", args.gb, 8) if {"large", "loaded"} & set(args.cases) else None
        small = make_dumps(folder, "small", 1000 * (128 << 10) / (1 << 30), 1000) if "small" in args.cases else None
        print(f"wrote the dumps in {time.perf_counter() - t0:.1f} s; {args.repeats} interleaved repeats, alternating")
        targets = {"large": 0.8, "small": 0.8, "loaded": 0.6}
        ratios = {}
        for case in args.cases:
            ref, tgt, flat, gb = small if case == "small" else big
            rows = {"alignkit compare": (OURS, ref, tgt), "careful h5py + numpy": (CAREFUL, ref, tgt)}
            if case == "large":
                rows["alignkit, [N] vs [rows,1024]"] = (OURS, ref, flat)
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2 if case == "loaded" else 0)]
            try:
                figures = time_rows(rows, args.repeats)
            finally:
                for process in busy:
                    process.kill()
            tensors = 1000 if case == "small" else 8
            note = f"{tensors} tensors of {gb / tensors * 1e3:.1f} MB a dump" + (
                ", two busy processes beside it" if busy else ""
            )
            ratios[case] = report(case, figures, gb, note)
        print("\nalignkit computes ten metrics, the noise floor where it applies and a verdict; the baseline four.")
        for case, ratio in ratios.items():
            mark = "met" if ratio >= targets[case] else "MISSED"
            print(f"{case:8} {ratio:.2f} of the baseline (target ≥ {targets[case]}): {mark}")


if __name__ == "__main__":
    main()
