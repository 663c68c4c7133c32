"""Recording cost, each figure beside its baseline from the same run.

1. Tiny diffusers Stable Diffusion pipelines, watched vs unwatched (target: at most 1.10×),
   timed in interleaved pairs (the order flips every pair) and summarised by the median of
   the pairs' ratios, since a shared machine drifts by more than the effect measured:
   - ``diffusers-tests``: the configuration diffusers' own fast tests build (UNet channels
     (32, 64), a 5-layer CLIP text encoder of width 32), 64×64 images;
   - ``demo``: alignkit's demo pipeline (UNet channels (4, 8)) at 32×32 and 128×128. Recording
     costs about the same per call whatever the call, so it shows most where calls are cheapest.
2. The writer's throughput on large tensors vs plain h5py writing the same arrays
   (target: at least 90% of it), from a watched call to the file on disk.

    python benchmarks/record_overhead.py [--pairs 41] [--tensor-mb 64] [--tensors 8]
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

STEPS = 10
CALLS = 2 * STEPS + 3  # text encoder ×2, UNet and scheduler each step, VAE decode


def diffusers_tests_pipeline() -> Any:
    """The tiny pipeline of diffusers' StableDiffusionPipeline fast tests, seeded."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from alignkit.demo.pipeline import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            layer_norm_eps=1e-5,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def paired_times(run: Callable[[], Any], watched_run: Callable[[str], Any], pairs: int) -> list[tuple[float, float]]:
    """(unwatched, watched) seconds for each pair, after one warm-up of each."""
    run()
    watched_run("warmup")
    times = []
    for i in range(pairs):
        order = ("plain", "watched") if i % 2 == 0 else ("watched", "plain")
        took = {}
        for kind in order:
            t0 = time.perf_counter()
            run() if kind == "plain" else watched_run(f"pair{i}")
            took[kind] = time.perf_counter() - t0
        times.append((took["plain"], took["watched"]))
    return times


def pipeline_overhead(name: str, pipe: Any, size: int, pairs: int, folder: Path) -> None:
    import alignkit as ak
    from alignkit.demo.pipeline import generate

    def watched_run(run_name: str) -> None:
        with ak.record(folder / f"{name}{size}-{run_name}.h5", pipe):
            generate(pipe, STEPS, size=size)

    times = paired_times(lambda: generate(pipe, STEPS, size=size), watched_run, pairs)
    plain = statistics.median(p for p, _ in times)
    ratios = sorted(w / p for p, w in times)
    ratio = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    per_call = statistics.median(w - p for p, w in times) / CALLS
    print(f"{name} pipeline, {size}×{size}, {STEPS} steps, {CALLS} calls ({pairs} interleaved pairs)")
    print(f"  unwatched  {plain * 1e3:8.1f} ms   ({plain / CALLS * 1e3:.1f} ms a call)")
    print(
        f"  watched    {plain * ratio * 1e3:8.1f} ms   {ratio:.3f}×  (middle half {q1:.2f}–{q3:.2f}×; "
        f"{per_call * 1e3:+.2f} ms a call)"
        f"  target ≤ 1.10×: {'ok' if ratio <= 1.10 else 'MISSED'}"
    )


def writer_throughput(arrays: list[np.ndarray], folder: Path, repeats: int) -> tuple[float, float]:
    """Bytes per second, median of interleaved runs after one warm-up of each. The order flips
    every run, and each file is deleted as soon as it is timed: the kernel's writing back of
    one file's pages would otherwise slow whichever write comes after it."""
    import alignkit as ak

    def plain(path: Path) -> None:
        with h5py.File(path, "w") as f:
            for j, a in enumerate(arrays):
                f.create_dataset(f"t{j}", data=a)

    def ours(path: Path) -> None:
        with ak.Recorder(path) as rec:
            fn = rec.watch(lambda x: None, "writer")
            for a in arrays:
                fn(a)

    total = sum(a.nbytes for a in arrays)
    rates: dict[Callable[[Path], None], list[float]] = {plain: [], ours: []}
    for i in range(repeats + 1):
        for write in (plain, ours) if i % 2 == 0 else (ours, plain):
            path = folder / f"{write.__name__}{i}.h5"
            t0 = time.perf_counter()
            write(path)
            rates[write].append(total / (time.perf_counter() - t0))
            path.unlink()
    return statistics.median(rates[plain][1:]), statistics.median(rates[ours][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=41, help="interleaved watched/unwatched pairs per pipeline")
    parser.add_argument(
        "--demo-sizes", type=int, nargs="*", default=[32, 128], help="image sizes for the demo pipeline"
    )
    parser.add_argument("--tensor-mb", type=int, default=64)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of the writer figure")
    args = parser.parse_args()
    from alignkit.demo.pipeline import tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipeline_overhead("diffusers-tests", diffusers_tests_pipeline(), 64, args.pairs, folder)
        demo = tiny_pipeline()
        for size in args.demo_sizes:
            pipeline_overhead("demo", demo, size, args.pairs, folder)
        for path in folder.glob("*.h5"):
            path.unlink()
        rng = np.random.default_rng(0)
        n = args.tensor_mb * (1 << 20) // 4
        arrays = [rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024) for _ in range(args.tensors)]
        plain_bps, ours_bps = writer_throughput(arrays, folder, args.repeats)
        share = ours_bps / plain_bps
        print(
            f"writing {args.tensors} × {args.tensor_mb} MiB float32 from a watched call (median of {args.repeats}, "
            "interleaved)"
        )
        print(f"  plain h5py {plain_bps / 1e9:8.2f} GB/s")
        print(
            f"  alignkit   {ours_bps / 1e9:8.2f} GB/s   {share:.0%} of plain  (target ≥ 90%: "
            f"{'ok' if share >= 0.9 else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
