"""Drill-down into a divergent call's recorded layers: from "the UNet drifts" to "this layer".

- the first layer whose output diverges;
- the layer where NaN/Inf first appear on one side (an fp16 overflow);
- the layers that add the most error, a list to keep in higher precision ("keep-fp32").
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from alignkit.comparison.diagnosis import Divergence
from alignkit.comparison.table import BAD


def drill_down(table: pd.DataFrame, first: Divergence) -> dict[str, Any]:
    """The drill-down of ``first`` (empty when its call has no recorded layers).

    A layer's contribution is how much its relative L1 exceeds the worst of the layers before
    it; an overflow to NaN/Inf in the target ranks first.
    """
    compared = ~table["status"].isin(["ref only", "tgt only", "shape"])
    layers = table[(table["seq"] == first.seq) & (table["io"] == "layers") & compared]
    if layers.empty:
        return {}
    out: dict[str, Any] = {}
    bad = layers[layers["status"].isin(BAD)]
    if len(bad):
        out["first_layer"] = str(bad["tensor"].iloc[0])
    for side in ("tgt", "ref"):
        other = "ref" if side == "tgt" else "tgt"
        nf = layers[
            (layers[f"nan_{side}"] + layers[f"inf_{side}"] > 0) & (layers[f"nan_{other}"] + layers[f"inf_{other}"] == 0)
        ]
        if len(nf):
            out[f"first_nonfinite_{side}"] = str(nf["tensor"].iloc[0])
    err = layers["rel_l1"].replace(float("inf"), 1e300).fillna(1e300).to_numpy()  # n/a: nothing finite to compare
    added = err - pd.Series(err).cummax().shift(1, fill_value=0.0).to_numpy()
    ranked = layers.assign(added=added).sort_values("added", ascending=False)
    ranked = ranked[ranked["added"] > 0]
    overflow = [out[k] for k in ("first_nonfinite_tgt",) if k in out]  # an overflow comes first
    if overflow or layers["floor_dtype"].notna().any():  # none when both runs compute in one precision
        out["keep_fp32"] = list(dict.fromkeys([*overflow, *(str(t) for t in ranked["tensor"])]))[:10]
    return out


def drill_down_text(d: dict[str, Any]) -> str:
    parts = []
    if "first_layer" in d:
        parts.append(f"first divergent layer: {d['first_layer']}")
    if "first_nonfinite_tgt" in d:
        parts.append(f"NaN/Inf first appear in the target at layer {d['first_nonfinite_tgt']}")
    if "first_nonfinite_ref" in d:
        parts.append(f"NaN/Inf first appear in the reference at layer {d['first_nonfinite_ref']}")
    if d.get("keep_fp32"):
        parts.append("keep in higher precision: " + ", ".join(d["keep_fp32"][:5]))
    return "; ".join(parts)
