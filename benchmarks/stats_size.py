"""What a statistics recording costs beside a full one, in one run each of the same pipeline.

diffusers' fast-test Stable Diffusion pipeline (64×64, UNet channels 32/64) at ``--steps``
steps with ``--layers unet``: dump size and wall time, full against ``--mode stats``, each the
median of ``--repeats`` interleaved runs, beside an unwatched run.

    python benchmarks/stats_size.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from record_overhead import diffusers_tests_pipeline  # noqa: E402


def main() -> None:
    import torch

    import alignkit as ak

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipe = diffusers_tests_pipeline()

    def run() -> None:
        with torch.no_grad():
            pipe("a fox", num_inference_steps=args.steps, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0))  # fmt: skip

    times: dict[str, list[float]] = {"unwatched": [], "full": [], "stats": []}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run()  # warm-up
        for i in range(args.repeats):
            for mode in list(times)[:: 1 if i % 2 == 0 else -1]:
                path = Path(tmp) / f"{mode}.h5"
                path.unlink(missing_ok=True)
                t0 = time.perf_counter()
                if mode == "unwatched":
                    run()
                else:
                    with ak.record(path, pipe, layers=["unet"], mode=mode):
                        run()
                times[mode].append(time.perf_counter() - t0)
                if mode != "unwatched":
                    sizes[mode] = path.stat().st_size
    base = statistics.median(times["unwatched"])
    print(f"diffusers' fast-test pipeline, 64×64, {args.steps} steps, --layers unet ({args.repeats} interleaved runs)")
    print(f"{'':12}{'seconds, median (range)':>28}{'× unwatched':>14}{'dump MB':>10}")
    for mode, runs in times.items():
        med = statistics.median(runs)
        size = f"{sizes[mode] / 1e6:10.1f}" if mode in sizes else f"{'':>10}"
        print(f"{mode:12}{f'{med:.2f} ({min(runs):.2f}–{max(runs):.2f})':>28}{med / base:>14.2f}{size}")
    print(f"stats dump / full dump: {sizes['stats'] / sizes['full']:.2%} (target ≤ 1%)")


if __name__ == "__main__":
    main()
