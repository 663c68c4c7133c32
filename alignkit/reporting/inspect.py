"""``alignkit inspect``: what a dump holds, and its input shapes in converters' forms."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from alignkit.comparison.configs import given_arguments
from alignkit.comparison.matching import shortfalls
from alignkit.comparison.metrics import BLOCK_ELEMENTS, as_reals, iter_blocks
from alignkit.comparison.table import shape_text
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
    out: dict[str, list] = {}
    t = dump.tensors[dump.tensors["io"] == "inputs"]
    for sub in dump.submodels:
        part = t[t["submodel"] == sub]
        entries = []
        for name, group in part.groupby("name", sort=False):
            entries.append((name, str(group["dtype"].iloc[0]), list(dict.fromkeys(group["shape"]))))
        out[sub] = entries
    return out


def shape_lines(dump: Dump) -> list[str]:
    """Each submodel's inputs as MindSpore Lite/ATC ``--inputShape``, trtexec ``--shapes``,
    dtypes, and the ``dynamic_axes`` for ``torch.onnx.export`` where shapes vary."""
    lines = []
    for sub, entries in input_shapes(dump).items():
        if not entries:
            continue
        lines.append(f"{sub}:")
        first = [(n, shapes[0]) for n, _, shapes in entries]
        lines.append('  --inputShape="' + ";".join(f"{n}:{','.join(map(str, s))}" for n, s in first) + '"')
        lines.append("  --shapes=" + ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in first))
        lines.append("  dtypes: " + ", ".join(f"{n} {d}" for n, d, _ in entries))
        scalars = [n for n, s in first if s == ()]
        if scalars:
            lines.append(f"  0-d (scalar) inputs: {', '.join(scalars)}")
        dynamic = {}
        for n, _, shapes in entries:
            if len(shapes) > 1 and len({len(s) for s in shapes}) == 1:
                axes = {i: f"{n}_dim{i}" for i in range(len(shapes[0])) if len({s[i] for s in shapes}) > 1}
                dynamic[n] = axes
                seen = ["x".join(map(str, s)) for s in shapes]
                if len(seen) > SHAPES_SHOWN:
                    seen = [seen[0], f"… ({len(seen) - 2} more)", seen[-1]]
                lines.append(f"  {n} varies: " + " | ".join(seen))
        if dynamic:
            lines.append(f"  dynamic_axes={json.dumps(dynamic)}")
    return lines


def print_shapes(dump: Dump, console: Console) -> None:
    if dump.calls.empty:
        console.print(_nothing_recorded(dump), highlight=False)
    for line in shape_lines(dump):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _nothing_recorded(dump: Dump) -> str:
    return f"{dump.path} holds no calls: nothing watched was called while it was recorded"
