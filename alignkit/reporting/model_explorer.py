"""Google's Model Explorer node data: the drift drawn on the model's graph.

``{"<graph id>": {"results": {"<node or value name>": {"value": 0.93}}, "gradient": [...]}}``
(Model Explorer's ``node_data_builder``). Each compared layer and output tensor gets its worst
value of one metric over the calls; the gradient runs green (agrees) to red (most error).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

GRAPH_ID = "alignkit"


def node_data(table: pd.DataFrame, metric: str = "rel_l1") -> dict[str, Any]:
    rows = table[table["io"].isin(["layers", "outputs"]) & table[metric].notna()]
    results: dict[str, dict[str, float]] = {}
    for name, value in rows.groupby("tensor", sort=False)[metric].max().items():
        results[str(name)] = {"value": float(value) if math.isfinite(value) else 1e30}
    return {
        GRAPH_ID: {
            "results": results,
            "gradient": [
                {"stop": 0, "bgColor": "#2e7d32"},
                {"stop": 0.5, "bgColor": "#f9a825"},
                {"stop": 1, "bgColor": "#c62828"},
            ],
        }
    }
