"""The terminal summary: verdict and first divergence first, then a per-submodel table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from alignkit.comparison.result import Comparison


def submodel_table(result: Comparison) -> pd.DataFrame:
    """Per submodel: calls compared, mismatching calls, first and worst step, worst metrics."""
    calls = result.calls
    rows = []
    for sub, group in calls.groupby("submodel", sort=False):
        bad = group[group["kind"] != ""]
        worst = group.loc[group["out_rel_l1"].idxmax()] if group["out_rel_l1"].notna().any() else None
        rows.append(
            {
                "submodel": sub,
                "calls": len(group),
                "diverged": len(bad),
                "first step": int(bad["step"].iloc[0]) if len(bad) else None,
                "first kind": bad["kind"].iloc[0] if len(bad) else "",
                "worst step": int(worst["step"]) if worst is not None else None,
                "max rel_l1": float(group["out_rel_l1"].max()) if worst is not None else None,
                "min cos": float(group["out_cos"].min()) if worst is not None else None,
            }
        )
    frame = pd.DataFrame(rows)
    for col in ("first step", "worst step"):
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame


def exact_mismatches(result: Comparison) -> list[str]:
    """Control inputs (compared exactly) that differ, as ``submodel.tensor``."""
    t = result.table
    rows = t[t["exact"].eq(True) & (t["status"] == "mismatch")]
    return list(dict.fromkeys(rows["submodel"] + "." + rows["tensor"]))


def render(result: Comparison) -> Group:
    """A rich renderable: what ``print(result)`` shows in a terminal."""
    parts: list[Any] = []
    style = {"aligned": "bold green", "incomplete": "bold yellow"}.get(result.verdict, "bold red")
    parts.append(Text(f"{result.ref_label} vs {result.tgt_label}: {result.verdict.upper()}", style=style))
    if result.verdict == "incomplete":
        parts.append(Text("Not compared: ", style="bold") + Text(result.blind_text()))
    if "estimate" in result.table and result.table["estimate"].eq(True).any():
        parts.append(Text("Estimates: ", style="bold") + Text(estimate_text(result)))
    if result.tokens:
        from alignkit.comparison.tokens import tokens_text

        parts.append(Text("Tokens: ", style="bold") + Text(tokens_text(result.tokens)))
    if result.first_divergence is not None:
        parts.append(Text("First divergence: ", style="bold") + Text(result.first_divergence.message))
        if result.growth_text():
            parts.append(Text("Error growth: ", style="bold") + Text(result.growth_text()))
        if result.layers:
            from alignkit.comparison.layers import drill_down_text

            parts.append(Text("Layers: ", style="bold") + Text(drill_down_text(result.layers)))
    if result.tolerance and not result.aligned:
        tol = result.tolerance
        exact = exact_mismatches(result)
        note = f"; control inputs must match exactly ({', '.join(exact)})" if exact else ""
        parts.append(
            Text(
                f"Loosest tolerance the measured tensors need: --cos-min {tol['cos_min']:.9f} --rel-l1-max "
                f"{tol['rel_l1_max']:.3g}{note}",
                style="dim",
            )
        )
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    frame = submodel_table(result)
    for col in frame.columns:
        table.add_column(col, justify="right" if col not in ("submodel", "first kind") else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[_cell(v) for v in row], style="red" if row.diverged else None)
    if len(frame):
        parts.append(table)
    if result.replay is not None:
        parts.append(Text("Replay (local error, no accumulation): ", style="bold") + Text(result.replay.headline()))
    for w in result.warnings:
        parts.append(Text("warning: ", style="yellow") + Text(w))
    for n in result.notes:
        parts.append(Text("note: ", style="cyan") + Text(n))
    return Group(*parts)


def plain_summary(result: Comparison, width: int = 120) -> str:
    console = Console(width=width, record=True, file=_Null(), color_system=None)
    console.print(render(result))
    return console.export_text()


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if value < 0.99 else f"{value:.6f}"
    return str(value)


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def estimate_text(result: Comparison) -> str:
    """What a statistics comparison's figures are, and the command that zooms in on its first
    divergence (the same run, recorded in full at that submodel and step)."""
    from alignkit.recording.stats import SAMPLE

    n = int(result.table["estimate"].eq(True).sum())
    text = f"{n} tensors were recorded as statistics: their figures are estimated from {SAMPLE} sampled elements each"
    fd = result.first_divergence
    if fd is not None:
        command = result.tgt_meta.get("command") or "python run_target.py"
        text += (
            f'; zoom in with: alignkit record --mode stats --full-at "{fd.submodel}:{fd.step}" -o zoom.h5 -- '
            f"{command.split(' -- ', 1)[-1]}"
        )
    return text
