"""``alignkit inspect``: what a dump holds, and its input shapes in converters' forms."""

from __future__ import annotations

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from alignkit.comparison.configs import given_arguments
from alignkit.comparison.matching import shortfalls
from alignkit.comparison.metrics import BLOCK_ELEMENTS, as_reals, iter_blocks
from alignkit.comparison.table import shape_text
from alignkit.errors import UsageError
from alignkit.phrasing import ranges
from alignkit.storage.reader import Dump
from alignkit.storage.schema import IO_GROUPS

SHAPES_SHOWN = 4  # distinct shapes listed in full; more (a KV cache growing each step) as first … last


def tensor_summary(dump: Dump) -> pd.DataFrame:
    """Per submodel, io and tensor: calls, dtypes, shapes, and min/max/mean/std over all calls.
    Submodels in the order they were first called, each one's inputs before its outputs."""
    rows = []
    tensors = dump.tensors.assign(_io=dump.tensors["io"].map({io: i for i, io in enumerate(IO_GROUPS)}))
    tensors = tensors.assign(_sub=tensors["submodel"].map({sub: i for i, sub in enumerate(dump.submodels)}))
    tensors = tensors.sort_values(["_sub", "_io"], kind="stable")
    for (sub, io, name), group in tensors.groupby(["submodel", "io", "name"], sort=False):
        stats = _stats(dump, group)
        rows.append(
            {
                "submodel": sub,
                "io": io,
                "tensor": name,
                "calls": len(group),
                "dtype": ",".join(dict.fromkeys(group["dtype"])),
                "shape": _shapes_text(list(dict.fromkeys(group["shape"]))),
                **stats,
            }
        )
    return pd.DataFrame(rows)


def _shapes_text(shapes: list[tuple[int, ...]]) -> str:
    texts = [shape_text(s) for s in shapes]
    if len(texts) > SHAPES_SHOWN:
        return f"{texts[0]} … {texts[-1]} ({len(texts)} shapes)"
    return ",".join(texts)


def _stats(dump: Dump, group: pd.DataFrame) -> dict[str, float]:
    n, total, sq, lo, hi, nonfinite = 0, 0.0, 0.0, np.inf, -np.inf, 0
    for info in group.itertuples(index=False):
        whole = info.numel <= BLOCK_ELEMENTS
        for block in [dump.read(info.path, info.dtype)] if whole else iter_blocks(dump.dataset(info.path)):
            b = np.asarray(as_reals(block) if np.iscomplexobj(block) else block, dtype=np.float64).ravel()
            finite = b[np.isfinite(b)]
            nonfinite += b.size - finite.size
            if finite.size:
                n += finite.size
                total += float(finite.sum())
                sq += float(np.dot(finite, finite))
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not n:
        return {
            "min": float("nan"),
            "max": float("nan"),
            "mean": float("nan"),
            "std": float("nan"),
            "nan/inf": nonfinite,
        }
    mean = total / n
    return {
        "min": lo,
        "max": hi,
        "mean": mean,
        "std": float(np.sqrt(max(sq / n - mean * mean, 0.0))),
        "nan/inf": nonfinite,
    }


def print_inspection(dump: Dump, console: Console) -> None:
    meta = dump.metadata
    console.print(
        f"[bold]{dump.path}[/] label={meta.get('label')!r} created={meta.get('created')} "
        f"complete={meta.get('complete')}",
        highlight=False,
    )
    for note in shortfalls(dump):
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    for n, call in enumerate(dump.pipeline_calls):
        pipeline = call["class"].rsplit(".", 1)[-1]
        console.print(
            f"pipeline call {n} ({pipeline}, from seq {call['seq']}): {given_arguments(call['arguments'])}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    calls = dump.calls
    if calls.empty:
        console.print(_nothing_recorded(dump), highlight=False)
        return
    overview = Table("submodel", "calls", "steps", "calls/step", "class", box=None, header_style="bold")
    described = dump.descriptions
    run = meta.get("calls_run") if isinstance(meta.get("calls_run"), dict) else {}
    for sub in dump.submodels:
        rows = calls[calls["submodel"] == sub]
        steps = sorted(set(rows["step"]))
        recorded = str(len(rows)) if run.get(sub, len(rows)) == len(rows) else f"{len(rows)} of {run[sub]}"
        overview.add_row(
            sub,
            recorded,
            f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else str(steps[0]),
            str(int(rows.groupby("step").size().max())),
            described.get(sub, {}).get("class", "").rsplit(".", 1)[-1],
        )
    console.print(overview)
    table = Table(box=None, header_style="bold")
    frame = tensor_summary(dump)
    for col in frame.columns:
        table.add_column(col, justify="left" if col in ("submodel", "io", "tensor", "dtype", "shape") else "right")
    for rec in frame.to_dict("records"):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in rec.values()])
    console.print(table)


def input_shapes(dump: Dump) -> dict[str, list[tuple[str, str, list[tuple[int, ...]]]]]:
    """Per submodel, its inputs in recorded order: (name, dtype, distinct shapes seen)."""
    return {
        sub: [(n, d, list(dict.fromkeys(seq))) for n, d, seq in entries]
        for sub, entries in graph_inputs([dump]).items()
    }


def graph_inputs(dumps: list[Dump]) -> dict[str, list[tuple[str, str, list[tuple[int, ...]]]]]:
    """Per submodel, the inputs a converted graph takes, in recorded order: (name, dtype, the
    shape at each call, the dumps one after another). Python numbers (a ``conditioning_scale``
    keyword) are no graph input, and a diffusers scheduler is glue, not a graph: both are left
    out."""
    out: dict[str, dict[str, tuple[str, list]]] = {}
    for dump in dumps:
        t = dump.tensors[dump.tensors["io"] == "inputs"]
        descriptions = dump.descriptions
        for sub in dump.submodels:
            if "Scheduler" in descriptions.get(sub, {}).get("class", ""):
                continue
            part = t[t["submodel"] == sub]
            entries = out.setdefault(sub, {})
            for name, group in part.groupby("name", sort=False):
                if dump.tensor_attrs(group["path"].iloc[0]).get("source") == "python":
                    continue
                dtype, shapes = entries.setdefault(name, (str(group["dtype"].iloc[0]), []))
                shapes.extend(tuple(s) for s in group["shape"])
    return {sub: [(n, d, shapes) for n, (d, shapes) in entries.items()] for sub, entries in out.items() if entries}


def shape_lines(dump: Dump | list[Dump]) -> list[str]:
    """Each submodel's graph inputs in the forms converters take: MindSpore Lite/ATC
    ``--inputShape`` (with ATC's ``--dynamic_dims`` gears where shapes vary), trtexec
    ``--shapes``, dtypes, and ``dynamic_axes`` that paste into ``torch.onnx.export``: integer
    axes, one symbol per axis that varies together across inputs (the batch of every input
    that shares it). Several dumps (one per resolution or guidance setting) give the axes that
    vary across them."""
    dumps = dump if isinstance(dump, list) else [dump]
    lines = []
    for sub, entries in graph_inputs(dumps).items():
        lines.append(f"{sub}:")
        first = [(n, shapes[0]) for n, _, shapes in entries]
        scalars = [n for n, s in first if s == ()]
        lines.append('  --inputShape="' + ";".join(f"{n}:{','.join(map(str, s or (1,)))}" for n, s in first) + '"')
        lines.append("  --shapes=" + ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in first if s))
        lines.append("  dtypes: " + ", ".join(f"{n} {d}" for n, d, _ in entries))
        if scalars:
            lines.append(
                f"  0-d inputs: {', '.join(scalars)}: given as 1 in --inputShape (ATC and MindSpore Lite take no empty "
                "shape: export them as [1] or fix them in the graph); trtexec needs no --shapes for them"
            )
        symbols = _dynamic_symbols(entries)
        if symbols:
            for n, _, shapes in entries:
                distinct = ["x".join(map(str, s)) for s in dict.fromkeys(shapes)]
                if len(distinct) > 1:
                    shown = (
                        distinct
                        if len(distinct) <= SHAPES_SHOWN
                        else [distinct[0], f"… ({len(distinct) - 2} more)", distinct[-1]]
                    )
                    lines.append(f"  {n} varies: " + " | ".join(shown))
            lines.append(f"  dynamic_axes={_axes_literal(symbols)}")
            lines.append("  " + _gears(entries, symbols))
    return lines


def _dynamic_symbols(entries: list[tuple[str, str, list[tuple[int, ...]]]]) -> dict[str, dict[int, str]]:
    """Each varying axis's symbol: axes whose sizes move together over the calls share one
    (``batch`` for axis 0, else ``dim_<input>_<axis>``)."""
    by_sizes: dict[tuple, str] = {}
    out: dict[str, dict[int, str]] = {}
    for n, _, shapes in entries:
        if len({len(s) for s in shapes}) != 1:
            continue  # a rank that changes is no axis to name
        for axis in range(len(shapes[0])):
            sizes = tuple(s[axis] for s in shapes)
            if len(set(sizes)) < 2:
                continue
            symbol = by_sizes.get(sizes) or by_sizes.setdefault(
                sizes, "batch" if axis == 0 and "batch" not in by_sizes.values() else f"dim_{n}_{axis}"
            )
            out.setdefault(n, {})[axis] = symbol
    return out


def _axes_literal(symbols: dict[str, dict[int, str]]) -> str:
    """A Python literal with integer axes, as ``torch.onnx.export`` takes it (JSON would make them strings)."""
    inner = ", ".join(f"{n!r}: {{{', '.join(f'{a}: {s!r}' for a, s in axes.items())}}}" for n, axes in symbols.items())
    return "{" + inner + "}"


def _gears(entries: list[tuple[str, str, list[tuple[int, ...]]]], symbols: dict[str, dict[int, str]]) -> str:
    """ATC's static gears: ``--input_shape`` with -1 where an axis varies, and one
    ``--dynamic_dims`` gear per combination of sizes seen, the -1 axes in order."""
    shape = ";".join(
        f"{n}:{','.join('-1' if a in symbols.get(n, {}) else str(d) for a, d in enumerate(shapes[0] or (1,)))}"
        for n, _, shapes in entries
    )
    gears = []
    for i in range(len(entries[0][2])):
        gear = ",".join(str(shapes[i][a]) for n, _, shapes in entries if i < len(shapes) for a in symbols.get(n, {}))
        if gear and gear not in gears:
            gears.append(gear)
    return f'ATC: --input_shape="{shape}" --dynamic_dims="{";".join(gears)}" --input_format=ND'


def print_shapes(dumps: Dump | list[Dump], console: Console) -> None:
    dumps = dumps if isinstance(dumps, list) else [dumps]
    for dump in dumps:
        if dump.calls.empty:
            console.print(_nothing_recorded(dump), highlight=False)
    for line in shape_lines(dumps):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


RANGES = {  # largest finite value, smallest normal value
    "fp16": (65504.0, 2.0**-14),
    "bf16": (3.3895313892515355e38, 2.0**-126),
}
UNDERFLOW_SHARE = 0.5  # a tensor with more than this share of its nonzero values below the normal range


def out_of_range(dump: Dump, dtype: str) -> pd.DataFrame:
    """The tensors of a reference dump that ``dtype`` cannot hold: values past its largest
    (an overflow to Inf, as DragGAN's demodulation meets in fp16) or mostly below its smallest
    normal value (flushed or imprecise), per submodel, io and tensor, with the steps."""
    if dtype not in RANGES:
        raise UsageError(f"--range {dtype!r}: expected one of {', '.join(RANGES)}")
    largest, normal = RANGES[dtype]
    rows = []
    floats = dump.tensors[dump.tensors["dtype"].str.startswith(("float", "bfloat"))]
    for (sub, io, name), group in floats.groupby(["submodel", "io", "name"], sort=False):
        peak, under, nonzero, steps = 0.0, 0, 0, []
        for path, step in zip(group["path"], group["step"]):
            x = np.abs(np.asarray(dump.read(path, group["dtype"].iloc[0]), dtype=np.float64))
            x = x[np.isfinite(x)]
            top = float(x.max()) if x.size else 0.0
            small = int(((x > 0) & (x < normal)).sum())
            if top > largest or small > UNDERFLOW_SHARE * max(int((x > 0).sum()), 1):
                steps.append(int(step))
            peak, under, nonzero = max(peak, top), under + small, nonzero + int((x > 0).sum())
        if steps:
            problem = "overflow" if peak > largest else "underflow"
            rows.append((sub, io, name, problem, peak, under / max(nonzero, 1), ranges(steps)))
    return pd.DataFrame(rows, columns=["submodel", "io", "tensor", "problem", "max_abs", "below_normal", "steps"])


def print_range(dump: Dump, dtype: str, console: Console) -> None:
    frame = out_of_range(dump, dtype)
    largest, normal = RANGES[dtype]
    if frame.empty:
        console.print(f"{dump.path}: every recorded value fits {dtype} (|x| ≤ {largest:g}, mostly ≥ {normal:g})")
        return
    console.print(
        f"{dump.path}: {len(frame)} tensors {dtype} cannot hold (largest {largest:g}; normal from {normal:g}); "
        "layers that overflow are the ones to keep in fp32:",
        markup=False,
        highlight=False,
    )
    table = Table(box=None)
    for col in frame.columns:
        table.add_column(col)
    for rec in frame.to_dict("records"):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in rec.values()])
    console.print(table)


def _nothing_recorded(dump: Dump) -> str:
    return f"{dump.path} holds no calls: nothing watched was called while it was recorded"
