"""The result of a comparison: a verdict, the first divergence, and one tidy table.

Every output — the terminal summary, CSV, JSON and the HTML report — is a view of ``table``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from alignkit.comparison.diagnosis import Divergence, growth_text
from alignkit.comparison.table import Thresholds
from alignkit.reporting.files import write_text


@dataclass
class Comparison:
    """What :func:`alignkit.compare` returns."""

    reference: str
    target: str
    verdict: str
    first_divergence: Divergence | None
    table: pd.DataFrame
    calls: pd.DataFrame
    thresholds: Thresholds = field(default_factory=Thresholds)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    growth: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    ref_meta: dict[str, Any] = field(default_factory=dict)
    tgt_meta: dict[str, Any] = field(default_factory=dict)
    replay: Comparison | None = None
    layers: dict[str, Any] = field(default_factory=dict)
    uncompared: list[str] = field(default_factory=list)  # reference submodels the target ran under other names
    suggested_map: list[str] = field(default_factory=list)  # the --map their call pattern suggests
    tokens: dict[str, Any] = field(default_factory=dict)  # a decode loop's verdict in tokens (comparison/tokens.py)

    @property
    def aligned(self) -> bool:
        return self.verdict == "aligned"

    @property
    def exit_code(self) -> int:
        """Like ``diff``: 0 aligned, 1 diverged; 3 incomplete (what was compared agrees, but
        submodels the target ran under other names were never compared: a CI gate on the exit
        code must not pass without having looked at the port)."""
        return {"aligned": 0, "incomplete": 3}.get(self.verdict, 1)

    @property
    def ref_label(self) -> str:
        return str(self.ref_meta.get("label") or Path(self.reference).stem)

    @property
    def tgt_label(self) -> str:
        return str(self.tgt_meta.get("label") or Path(self.target).stem)

    def headline(self) -> str:
        """The verdict in one plain sentence."""
        if self.verdict == "incomplete":
            return f"incomplete: {self.blind_text()}"
        if self.first_divergence is None:
            return f"aligned: {self.tgt_label} matches {self.ref_label} on all {len(self.table)} compared tensors"
        return f"diverged: first at {self.first_divergence.message}"

    def blind_text(self) -> str:
        """``aligned on 2 of 4 submodels; controlnet, unet not compared (… --map …)``."""
        compared = list(dict.fromkeys(self.table["submodel"]))
        total = len(compared) + len(self.uncompared)
        text = (
            f"aligned on {len(compared)} of {total} submodels; {', '.join(self.uncompared)} not compared: the target "
            "ran submodels of other names at their steps"
        )
        if self.suggested_map:
            text += f" (compare them with {' '.join(f'--map {m}' for m in self.suggested_map)})"
        return text

    def growth_text(self) -> str:
        return growth_text(self.growth) if self.growth else ""

    def summary(self) -> str:
        """The terminal summary as plain text."""
        from alignkit.reporting.summary import plain_summary

        return plain_summary(self)

    def __rich__(self) -> Any:
        from alignkit.reporting.summary import render

        return render(self)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<Comparison {self.verdict} {self.ref_label} vs {self.tgt_label}: {len(self.table)} tensors>"

    def to_model_explorer(self, path: str | os.PathLike, metric: str = "rel_l1") -> Path:
        """Model Explorer node data (``model-explorer model.onnx --node_data_paths out.json``):
        for each compared layer and output tensor, its worst ``metric`` over the calls, on a
        green-to-red gradient, keyed by tensor name (the ONNX adapter matches results by value
        name; layers recorded from an ONNX port carry their torch module's name)."""
        from alignkit.reporting.model_explorer import node_data

        return write_text(path, json.dumps(node_data(self.table, metric), indent=1), "model explorer node data")

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        text = self.table.to_csv(index=False)
        if path is not None:
            write_text(path, text, "table")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "target": self.target,
            "verdict": self.verdict,
            "uncompared": self.uncompared,
            "suggested_map": self.suggested_map,
            "tokens": self.tokens,
            "first_divergence": self.first_divergence.to_dict() if self.first_divergence else None,
            "thresholds": vars(self.thresholds),
            "warnings": self.warnings,
            "notes": self.notes,
            "growth": self.growth,
            "tolerance": self.tolerance,
            "layers": self.layers,
            "reference_metadata": self.ref_meta,
            "target_metadata": self.tgt_meta,
            "table": json.loads(self.table.to_json(orient="records")),
            "replay": self.replay.to_dict() if self.replay is not None else None,
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(_finite(self.to_dict()), indent=2, default=str)
        if path is not None:
            write_text(path, text, "JSON")
        return text

    def to_html(self, path: str | os.PathLike) -> Path:
        """Write the self-contained HTML report; returns its path."""
        from alignkit.reporting.html import write_report

        return write_report(self, Path(path))


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
