"""The ``alignkit`` command: a thin shell over the library. Each command parses its options,
makes one public call and prints the result. User errors print one line and exit 2."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from alignkit.errors import AlignkitError, UsageError

app = typer.Typer(
    name="alignkit",
    help="Find where a ported pipeline first parts ways with its reference, and why.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
err = Console(stderr=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def record(
    ctx: typer.Context,
    output: Path = typer.Option(
        ...,
        "-o",
        "--output",
        help="The dump to write (.h5); {rank} in it writes one dump per rank of a torch.distributed run.",
    ),
    label: str | None = typer.Option(None, help="A name for this run, shown in reports."),
    hook: list[str] = typer.Option(
        [],
        "--hook",
        help="module:Qualified.name of an engine method or function to record; a class alone records its instances' "
        "calls (repeatable).",
    ),
    step_on: list[str] = typer.Option([], "--step-on", help="module:qualname whose calls end a step."),
    include: str | None = typer.Option(None, help="Record only submodels matching this regex."),
    exclude: str | None = typer.Option(None, help="Skip submodels matching this regex."),
    tensors: str | None = typer.Option(None, help="Record only tensors matching this regex."),
    layers: list[str] = typer.Option(
        [], "--layers", help="Also record every leaf layer (torch) or intermediate output (ONNX) of this submodel."
    ),
    layer_filter: str | None = typer.Option(
        None, "--layer-filter", help="Record only layers whose name matches this regex."
    ),
    layer_depth: int | None = typer.Option(
        None, "--layer-depth", help="Record layers down to this many levels of their path (default: every level)."
    ),
    steps: str | None = typer.Option(None, "--steps", help="Record only these steps, e.g. 0-4,10."),
    module: str | None = typer.Option(None, "-m", help="Run a module instead of a script."),
    repeat: int = typer.Option(
        1, "--repeat", help="Run it this many times and keep each tensor's run-to-run spread: compare's floor."
    ),
    mode: str = typer.Option("full", "--mode", help="full, or stats: per tensor its statistics and a sample."),
    full_at: str | None = typer.Option(
        None, "--full-at", help="With --mode stats: record these calls in full, e.g. 'unet:3-5' (';' between)."
    ),
    against: Path | None = typer.Option(
        None, "--against", help="A reference dump: calls that agree with it kept as statistics, the rest in full."
    ),
) -> None:
    """Run a script unmodified and record every submodel call: alignkit record -o ref.h5 -- script.py [args]"""
    from alignkit.recording.cli_run import record_command
    from alignkit.replaying import parse_steps

    command = ([sys.executable, "-m", module] if module else []) + list(ctx.args)
    filters = {
        "include": include,
        "exclude": exclude,
        "tensors": tensors,
        "steps": parse_steps(steps),
        "layers": layers,
        "layer_filter": layer_filter,
        "layer_depth": layer_depth,
        "mode": mode,
        "full_at": full_at,
        "against": against,
    }
    code = record_command(
        output, command, label=label, hooks=hook, step_on=step_on, console=err, repeat=repeat, **filters
    )
    raise typer.Exit(code)


@app.command()
def inspect(
    dumps: list[Path] = typer.Argument(..., help="A dump written by alignkit record (several with --shapes)."),
    shapes: bool = typer.Option(
        False, "--shapes", help="Print input shapes in the forms converters take (across all dumps given)."
    ),
    range_: str | None = typer.Option(
        None, "--range", help="fp16 or bf16: the tensors whose values that dtype cannot hold (an overflow to come)."
    ),
) -> None:
    """List submodels, steps, calls and tensors with shapes, dtypes and statistics."""
    from contextlib import ExitStack

    from alignkit.reporting.inspect import print_inspection, print_range, print_shapes
    from alignkit.storage import open_dump

    if len(dumps) > 1 and not shapes:
        raise UsageError("inspect takes one dump, or several with --shapes (to derive the axes that vary across them)")
    with ExitStack() as stack:
        opened = [stack.enter_context(open_dump(d)) for d in dumps]
        if shapes:
            print_shapes(opened, _wide(console))
        elif range_ is not None:
            print_range(opened[0], range_, _wide(console))
        else:
            print_inspection(opened[0], _wide(console))


@app.command()
def compare(
    ref: Path = typer.Argument(..., help="The reference dump."),
    tgt: Path = typer.Argument(..., help="The target dump."),
    map: list[str] = typer.Option([], "--map", help="target=reference name, e.g. unet.input.1=sample (repeatable)."),
    map_file: Path | None = typer.Option(None, "--map-file", help="A JSON or target=reference text file of names."),
    cos_min: float = typer.Option(0.999, "--cos-min", help="Aligned when cos ≥ this..."),
    rel_l1_max: float = typer.Option(1e-3, "--rel-l1-max", help="...and rel_l1 ≤ this."),
    floor_factor: float = typer.Option(
        10.0, "--floor-factor", help="Errors within this multiple of the dtype noise floor are expected precision loss."
    ),
    target_precision: list[str] = typer.Option(
        [],
        "--target-precision",
        help="What a target submodel computes in where its dump cannot say: unet=fp16, all=bf16 (repeatable).",
    ),
    replay: Path | None = typer.Option(
        None, "--replay", help="A replay dump (alignkit replay -o) to draw beside the pipeline drift."
    ),
    csv: Path | None = typer.Option(None, "--csv", help="Write the table as CSV."),
    json: Path | None = typer.Option(None, "--json", help="Write the result as JSON."),
    html: Path | None = typer.Option(
        None, "--html", help="Where to write the report (default reports/<ref>_vs_<tgt>.html)."
    ),
    no_html: bool = typer.Option(False, "--no-html", help="Do not write the HTML report."),
    model_explorer: Path | None = typer.Option(
        None, "--model-explorer", help="Write per-layer metrics as Model Explorer node data (JSON)."
    ),
    dask: str | None = typer.Option(
        None,
        "--dask",
        help="Spread the comparison over a Dask cluster (a scheduler's address, or local[:N] for N worker processes "
        "here): the ranks of dump_{rank}.h5, or one pair's calls; workers read the dumps at the same paths.",
    ),
) -> None:
    """Compare two dumps; exit 0 aligned, 1 diverged, 2 bad input, 3 incomplete (ported submodels not compared).

    With {rank} in both paths (dump_{rank}.h5), each rank's dumps are compared on their own."""
    from alignkit.comparison.ranks import has_rank
    from alignkit.reporting.files import check_output
    from alignkit.reporting.progress import compare_with_progress

    report = None if no_html else (html or Path("reports") / f"{ref.stem}_vs_{tgt.stem}.html")
    for path, what in ((csv, "table"), (json, "JSON"), (report, "report"), (model_explorer, "node data")):
        if path is not None:
            check_output(path, what)  # before the work: a bad path is no reason to compare twice
    options = dict(
        name_map=map,
        map_file=map_file,
        cos_min=cos_min,
        rel_l1_max=rel_l1_max,
        floor_factor=floor_factor,
        target_precision=target_precision,
        replay=replay,
    )
    if has_rank(ref) or has_rank(tgt):
        _compare_ranks(ref, tgt, dask, options, csv, json, report, model_explorer)
    result = compare_with_progress(ref, tgt, console=err, dask=dask, **options)
    _wide(console).print(result)
    _write_outputs(result, csv, json, report)
    if model_explorer:
        result.to_model_explorer(model_explorer)
        console.print(f"model explorer node data: {model_explorer}")
    raise typer.Exit(result.exit_code)


@app.command()
def demo(
    bug: str = typer.Option("timestep", help="The planted bug: timestep, timestep-dtype, weights, fp16, none."),
    steps: int = typer.Option(12, help="Denoising steps."),
    out: Path = typer.Option(Path("reports/demo.html"), help="Where to write the report."),
    dumps: Path = typer.Option(Path("dumps"), help="Where to write the two dumps."),
) -> None:
    """Record a tiny Stable Diffusion reference and a target with a planted bug, compare, report.

    Exits 0 when the comparison reached the verdict the planted bug calls for, 1 otherwise."""
    from alignkit.demo import EXPECTED_VERDICT, run_demo

    result = run_demo(bug=bug, steps=steps, dumps=dumps, console=err)
    _wide(console).print(result)
    result.to_html(out)
    console.print(f"report: {out} (open it in a browser)")
    raise typer.Exit(0 if result.verdict == EXPECTED_VERDICT[bug] else 1)


@app.command()
def replay(
    ref: Path = typer.Argument(..., help="The reference dump."),
    submodel: str = typer.Option(..., "--submodel", help="The submodel whose recorded inputs are replayed."),
    onnx: Path | None = typer.Option(None, "--onnx", help="An ONNX model run with onnxruntime."),
    callable_: str | None = typer.Option(None, "--callable", help="module:factory returning the target callable."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the target's outputs as a dump."),
    steps: str | None = typer.Option(None, "--steps", help="Steps to replay, e.g. 0-4,10."),
    layers: bool = typer.Option(
        False, "--layers", help="Also record the target's layers, to name the first that diverges."
    ),
) -> None:
    """Feed the reference inputs of every recorded call into a target submodel and compare."""
    from alignkit.replaying import parse_steps
    from alignkit.replaying import replay as run_replay

    if (onnx is None) == (callable_ is None):
        raise UsageError("replay needs one target: --onnx model.onnx or --callable module:factory")
    with tempfile.TemporaryDirectory(prefix="alignkit-replay-", ignore_cleanup_errors=True) as scratch:
        result = run_replay(
            ref,
            submodel=submodel,
            target=str(onnx) if onnx else callable_,
            out=output or Path(scratch) / f"replay_{submodel}.h5",  # without -o, nothing reads it once printed
            steps=parse_steps(steps),
            layers=layers,
        )
        _wide(console).print(result)
    raise typer.Exit(result.exit_code)


@app.command("fix-precision")
def fix_precision(
    ref: Path = typer.Argument(..., help="The reference dump (recorded with --layers of the submodel)."),
    submodel: str = typer.Option(..., "--submodel", help="The submodel to build in the lower precision."),
    dtype: str = typer.Option(..., "--dtype", help="fp16 or bf16."),
    output: Path = typer.Option(..., "-o", "--output", help="keep.txt (--module, --builder) or the fixed .onnx."),
    onnx: Path | None = typer.Option(None, "--onnx", help="The fp32 ONNX model, converted with a node block list."),
    module: str | None = typer.Option(None, "--module", help="module:factory returning the fp32 torch module."),
    builder: str | None = typer.Option(None, "--builder", help="module:fn taking the keep list, returning a callable."),
    max_builds: int = typer.Option(16, "--max-builds", help="Builds to try at most."),
) -> None:
    """Search the smallest set of layers to keep in fp32, building and replaying each candidate."""
    from rich.progress import Progress

    from alignkit.fixing import fix_precision as search
    from alignkit.reporting.files import check_output

    check_output(output, "keep list")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("builds", total=max_builds)
        result = search(
            ref, submodel=submodel, dtype=dtype, out=output, onnx=onnx, module=module, builder=builder,
            max_builds=max_builds, progress=lambda done, total: bar.update(task, completed=done),
        )  # fmt: skip
    console.print(f"alignkit: {result}", markup=False, highlight=False)
    for path in result.files:
        console.print(f"  wrote {path}", markup=False, highlight=False)
    raise typer.Exit(0 if result.aligned else 1)


@app.command("import")
def import_(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="npy-dir, npz, polygraphy or msprobe."),
    source: Path = typer.Argument(..., help="The file or folder another tool wrote."),
    output: Path = typer.Option(..., "-o", "--output", help="The alignkit dump to write (.h5)."),
    submodel: str | None = typer.Option(None, "--submodel", help="The submodel, where the format does not name it."),
    pattern: str | None = typer.Option(
        None, "--pattern", help="npy-dir: '{submodel}/{tensor}-{step}.npy', or a regex with those named groups."
    ),
    inputs: str | None = typer.Option(
        None, "--inputs", help="npy-dir: tensor names that are inputs (a,b); polygraphy: a --save-inputs file."
    ),
    runner: str | None = typer.Option(None, "--runner", help="polygraphy: the runner (a part of its name)."),
    outputs: str | None = typer.Option(
        None, "--outputs", help="polygraphy: the model's outputs (a,b), the rest layers (--onnx-outputs '*')."
    ),
    iterations: str | None = typer.Option(None, "--iterations", help="polygraphy: iterations are steps or calls."),
    bf16: str | None = typer.Option(None, "--bf16", help="npz: uint16 arrays that hold bf16 bits (names, or all)."),
    rank: int | None = typer.Option(None, "--rank", help="msprobe: the rank to import (default 0)."),
) -> None:
    """Write another tool's dump as an alignkit dump, ready for compare, inspect and replay."""
    from alignkit.importing import import_dump

    options = {"submodel": submodel, "pattern": pattern, "inputs": inputs, "runner": runner, "outputs": outputs}
    options |= {"iterations": iterations, "bf16": bf16, "rank": rank}
    allowed = {
        "npy-dir": {"pattern", "submodel", "inputs"},
        "npz": {"submodel", "bf16"},
        "polygraphy": {"runner", "submodel", "inputs", "iterations", "outputs"},
        "msprobe": {"rank"},
    }.get(fmt, set())
    given = {key for key, value in options.items() if value is not None}
    if fmt in {"npy-dir", "npz", "polygraphy", "msprobe"} and given - allowed:
        raise UsageError(f"import {fmt} takes no {', '.join(f'--{k}' for k in sorted(given - allowed))}")
    summary = import_dump(fmt, source, output, **{k: v for k, v in options.items() if v is not None})
    console.print(f"alignkit: {summary}")


def _wide(c: Console) -> Console:
    """Tables keep whole names when written to a file or pipe."""
    return c if c.is_terminal else Console(width=200, highlight=False)


def _compare_ranks(
    ref: Path,
    tgt: Path,
    dask: str | None,
    options: dict,
    csv: Path | None,
    json: Path | None,
    report: Path | None,
    model_explorer: Path | None,
) -> None:
    """One comparison per rank; each output file per rank (``{rank}`` in its path, or ``_rank<N>``)."""
    from alignkit.comparison.ranks import for_rank
    from alignkit.reporting.progress import ranks_with_progress

    if options.get("replay") is not None:
        raise UsageError("--replay draws one replay beside one comparison: give it without {rank}")
    results = ranks_with_progress(ref, tgt, console=err, dask=dask, **options)
    for rank, result in results.by_rank.items():
        _write_outputs(result, *(for_rank(p, rank) if p else None for p in (csv, json, report)))
        if model_explorer:
            result.to_model_explorer(for_rank(model_explorer, rank))
    for line in results.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(results.headline(), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(results.exit_code)


def _write_outputs(result, csv: Path | None, json: Path | None, html: Path | None) -> None:
    if csv:
        result.to_csv(csv)
    if json:
        result.to_json(json)
    if html:
        result.to_html(html)
        console.print(f"report: {html}")


def _click_errors() -> tuple[type, ...]:
    """The usage-error classes of the click that typer runs on (vendored in newer typer)."""
    classes: list[type] = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = __import__(name, fromlist=["ClickException"])
        except ImportError:
            continue
        classes.append(module.ClickException)
    return tuple(classes)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors get one line and exit 2; bugs keep their traceback."""
    try:
        code = app(args=argv, prog_name="alignkit", standalone_mode=False)
    except AlignkitError as exc:
        _fail(str(exc))
    except _click_errors() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            err.print(app_help(), markup=False, highlight=False)
            sys.exit(2)
        _fail(exc.format_message())
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("alignkit: interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    err.print(f"alignkit: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


def app_help() -> str:
    return "usage: alignkit [record|compare|inspect|replay|demo] ... (alignkit COMMAND --help for more)"


if __name__ == "__main__":
    main()
