"""Drill-down into a divergent call's recorded layers: from "the UNet drifts" to "this code".

Layers are recorded at every depth, in the order they complete (a block's children before the
block). The drill-down names:

- the first layer whose output diverges, and where the error arises: in a layer, or in a
  block's own forward between two of its children (code written inline, as DragGAN's
  demodulation is) — told by a first divergent child that holds no parameters of its own (an
  activation only passes on what the inline code before it made), or by a block whose
  children all match;
- the layer where NaN/Inf first appear on one side (an fp16 overflow);
- a minimal list to keep in higher precision: only where an error starts (a layer past the
  floor right after one within it, or the first NaN/Inf), never the layers downstream that
  merely receive it; none when both runs compute in one precision.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from alignkit.comparison.diagnosis import Divergence
from alignkit.comparison.table import BAD

KEEP_MAX = 10


def drill_down(table: pd.DataFrame, first: Divergence, stateless: list[str] | str | None = None) -> dict[str, Any]:
    """The drill-down of ``first`` (empty when its call has no recorded layers); ``stateless``
    lists the reference's layers with no parameters of their own (its description)."""
    compared = ~table["status"].isin(["ref only", "tgt only", "shape"])
    layers = table[(table["seq"] == first.seq) & (table["io"] == "layers") & compared]
    if layers.empty:
        return {}
    passive = set(json.loads(stateless) if isinstance(stateless, str) else stateless or [])
    names = [str(t) for t in layers["tensor"]]
    bad = dict(zip(names, layers["status"].isin(BAD)))
    out: dict[str, Any] = {}
    first_bad = next((n for n in names if bad[n]), None)
    if first_bad is not None:
        out["first_layer"] = first_bad
        out["arises"] = _arises(first_bad, names, bad, passive)
    for side in ("tgt", "ref"):
        other = "ref" if side == "tgt" else "tgt"
        nf = layers[
            (layers[f"nan_{side}"] + layers[f"inf_{side}"] > 0) & (layers[f"nan_{other}"] + layers[f"inf_{other}"] == 0)
        ]
        if len(nf):
            out[f"first_nonfinite_{side}"] = str(nf["tensor"].iloc[0])
    overflow = "first_nonfinite_tgt" in out
    if overflow or layers["floor_dtype"].notna().any():  # none when both runs compute in one precision
        out["keep_fp32"] = _starts(names, bad, passive)[:KEEP_MAX]
    return out


def _parent(name: str) -> str | None:
    return name.rsplit(".", 1)[0] if "." in name else None


def _arises(layer: str, names: list[str], bad: dict[str, bool], passive: set[str]) -> dict[str, Any]:
    """Where the first divergent layer's error arises: the layer itself, or the code of the
    block around it between its last matching sibling and it."""
    children = [n for n in names if _parent(n) == layer]
    if children and not any(bad[c] for c in children):
        return {"in": layer, "own_code": True, "after": children[-1], "before": None}
    parent = _parent(layer)
    if layer in passive and parent is not None:
        siblings = [n for n in names if _parent(n) == parent]
        before = siblings[: siblings.index(layer)]
        return {"in": parent, "own_code": True, "after": before[-1] if before else None, "before": layer}
    return {"in": layer, "own_code": False, "after": None, "before": None}


def _starts(names: list[str], bad: dict[str, bool], passive: set[str]) -> list[str]:
    """The layers where an error starts, in completion order: bad right after a good layer
    that is not its own descendant. A start in a layer with no parameters is its block's code."""
    out: list[str] = []
    previous_good = True
    for name in names:
        if bad[name] and previous_good:
            parent = _parent(name)
            out.append(parent if name in passive and parent is not None else name)
        previous_good = not bad[name]
    return list(dict.fromkeys(out))


def drill_down_text(d: dict[str, Any]) -> str:
    parts = []
    if "first_layer" in d:
        parts.append(f"first divergent layer: {d['first_layer']}")
    where = d.get("arises")
    if where and where["own_code"]:
        text = f"the error arises in `{where['in']}`'s own forward"
        if where["after"]:
            text += f", after `{where['after']}` (matches)"
        if where["before"]:
            text += f", before `{where['before']}` (differs)"
        parts.append(text)
    if "first_nonfinite_tgt" in d:
        parts.append(f"NaN/Inf first appear in the target at layer {d['first_nonfinite_tgt']}")
    if "first_nonfinite_ref" in d:
        parts.append(f"NaN/Inf first appear in the reference at layer {d['first_nonfinite_ref']}")
    if d.get("keep_fp32"):
        parts.append("keep in higher precision: " + ", ".join(d["keep_fp32"][:5]))
    return "; ".join(parts)
