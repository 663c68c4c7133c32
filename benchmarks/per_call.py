"""What recording costs a call at submodel level, beside the same calls unwatched.

A torch module whose forward does almost nothing (so that the figure is alignkit's, not the
model's), fed a UNet's three inputs as a denoising loop feeds them: a new ``sample``
(2×4×32×32) and ``timestep`` at every call, the same ``encoder_hidden_states`` (2×77×32, stored
once); called ``--calls`` times with a step boundary every other call. The inputs are made
before the timing; the recorded run includes opening and closing the dump (the writer
finishes its work before close returns).
Each figure is the median of ``--repeats`` interleaved runs (order alternating), with its range.

    python benchmarks/per_call.py [--calls 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import alignkit as ak

TARGET_MS = 0.3


class Unet(torch.nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states):
        return sample * 1.0


def run(model: torch.nn.Module, calls: int, path: Path | None) -> float:
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randn(2, 4, 32, 32, generator=generator) for _ in range(calls)]
    timesteps, e = [torch.tensor(float(999 - i)) for i in range(calls)], torch.randn(2, 77, 32)
    t0 = time.perf_counter()
    with torch.no_grad():
        if path is None:
            for x, t in zip(samples, timesteps):
                model(x, t, e)
        else:
            with ak.Recorder(path) as rec:
                rec.watch(model, "unet")
                for i, (x, t) in enumerate(zip(samples, timesteps)):
                    model(x, t, e)
                    if i % 2:
                        ak.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"unwatched": [], "recorded": []}
    with tempfile.TemporaryDirectory() as tmp:
        run(Unet(), 50, None), run(Unet(), 50, Path(tmp) / "warm.h5")  # warm-up
        for i in range(args.repeats):
            for name in list(times)[:: 1 if i % 2 == 0 else -1]:
                path = Path(tmp) / f"d{i}.h5" if name == "recorded" else None
                times[name].append(run(Unet(), args.calls, path))  # a fresh module: watched anew each run
    per_call = {name: [s / args.calls * 1e3 for s in runs] for name, runs in times.items()}
    cost = [w - u for u, w in zip(per_call["unwatched"], per_call["recorded"])]
    print(f"{args.calls} calls a run, {args.repeats} interleaved runs; ms a call, median (range)")
    for name, values in per_call.items():
        print(f"  {name:10} {statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})")
    median = statistics.median(cost)
    mark = "met" if median <= TARGET_MS else "MISSED"
    print(f"  recording costs {median:.3f} ms a call ({min(cost):.3f}–{max(cost):.3f}); target ≤ {TARGET_MS}: {mark}")


if __name__ == "__main__":
    main()
