"""The self-contained HTML report: one file, no network, plots embedded, read top-down.

Every string that comes from a dump (submodel, tensor and label names, metadata) passes
through :func:`html.escape`.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.reporting import plots
from alignkit.reporting.files import write_text
from alignkit.reporting.summary import exact_mismatches, submodel_table

if TYPE_CHECKING:
    import pandas as pd

    from alignkit.comparison.result import Comparison

_CALL_COLUMNS = [
    "seq",
    "submodel",
    "step",
    "call",
    "io",
    "tensor",
    "status",
    "ref_dtype",
    "tgt_dtype",
    "ref_shape",
    "rel_l1",
    "cos",
    "max_abs",
    "sqnr_db",
    "floor_ratio",
    "matched_by",
]
CALL_ROWS = 1000  # rows of the calls table in the report; the CSV and JSON have every row
_SEVERITY = {"nonfinite": 0, "shape": 1, "mismatch": 2, "precision": 3, "ref only": 4, "tgt only": 4, "ok": 5}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
  padding:1.2em;color:#222}
h1{font-size:1.5em;margin:.2em 0} h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.verdict{padding:.8em 1em;border-radius:6px;font-size:1.05em;margin:.6em 0}
.diverged{background:#fdecea;border-left:6px solid #c0392b}
.incomplete{background:#fef5e7;border-left:6px solid #b9770e}
.aligned{background:#eafaf1;border-left:6px solid #1e8449}
.evidence{font-family:ui-monospace,monospace;background:#f7f7f7;padding:.5em .8em;border-radius:4px;
  white-space:pre-wrap}
table{border-collapse:collapse;font-size:.82em;width:100%}
th,td{border-bottom:1px solid #eee;padding:.25em .5em;text-align:left}
th{background:#fafafa;cursor:pointer;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fff1f0} tr.warn td{background:#fffbea} .diff td{background:#fff7d6}
.muted{color:#777;font-size:.9em} img{max-width:100%} .warn-list li{margin:.2em 0}
.scroll{max-height:480px;overflow:auto;border:1px solid #eee}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, i){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
    rows.sort(function(a, b){
      var x = a.cells[i].dataset.v || a.cells[i].textContent, y = b.cells[i].dataset.v || b.cells[i].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def write_report(result: Comparison, path: Path) -> Path:
    return write_text(path, render_html(result), "report")


def render_html(result: Comparison) -> str:
    e = html.escape
    title = f"alignkit: {result.ref_label} vs {result.tgt_label}"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src "
        "'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p class='muted'>reference <code>{e(result.reference)}</code> · target <code>{e(result.target)}</code></p>",
        _verdict(result),
        _tokens(result),
        _curves(result),
        _section("Submodels", _frame_table(submodel_table(result), sortable=False)),
        _heatmap(result),
        _section("Calls and tensors (mismatches first; click a header to sort)", _calls_table(result)),
        _images(result),
        _section("Runs", _metadata(result)),
        f"<script>{_SORT_JS}</script></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _tokens(result: Comparison) -> str:
    """A decode loop's verdict in tokens: the sentence, and each step's tokens and top-k agreement."""
    if not result.tokens:
        return ""
    from alignkit.comparison.tokens import tokens_text

    e = html.escape
    rows = "".join(
        f"<tr><td>{r['step']}</td><td>{e(str(r['ref_token']))}</td><td>{e(str(r['tgt_token']))}</td>"
        f"<td>{'yes' if r['same'] else '<b>no</b>'}</td><td>{r['top_k']:.0%}</td></tr>"
        for r in result.tokens["per_step"]
    )
    columns = ("step", "reference token", "target token", "same", f"top-{result.tokens['k']}")
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
    table = f"<table id='tokens'><thead>{head}</thead><tbody>{rows}</tbody></table>"
    return _section("Tokens", f"<p>{e(tokens_text(result.tokens))}</p>{table}")


def _verdict(result: Comparison) -> str:
    e = html.escape
    fd = result.first_divergence
    cls = {"aligned": "aligned", "incomplete": "incomplete"}.get(result.verdict, "diverged")
    out = [
        f"<div class='verdict {cls}' id='verdict'><b>{e(result.verdict.upper())}</b> — "
        f"{e(_verdict_sentence(result))}</div>"
    ]
    if fd is not None:
        ev = fd.evidence
        place = f"{fd.io[:-1]} `{fd.tensor}`" if fd.tensor else "the call itself"
        lines = [f"where:    {fd.submodel}, step {fd.step}, call {fd.call}, {place}", f"kind:     {fd.kind}"]
        if "raised" in ev:
            lines.append(f"raised:   {ev['raised']}")
        elif "ref_value" in ev:
            lines.append(f"reference: {ev.get('ref_dtype')} {ev.get('ref_value')}")
            lines.append(f"target:    {ev.get('tgt_dtype')} {ev.get('tgt_value')}")
        else:
            lines.append(
                f"reference: {ev.get('ref_dtype')} {ev.get('ref_shape')}   target: {ev.get('tgt_dtype')} "
                f"{ev.get('tgt_shape')}"
            )
        for key in ("rel_l1", "cos", "max_abs"):
            if key in ev:
                lines.append(f"{key + ':':10}{_num(ev[key])}")
        out.append(f"<div class='evidence'>{e(chr(10).join(lines))}</div>")
        if result.growth_text():
            out.append(f"<p><b>How the error grows:</b> {e(result.growth_text())}</p>")
        if result.layers:
            from alignkit.comparison.layers import drill_down_text

            out.append(f"<p><b>Layers:</b> {e(drill_down_text(result.layers))}</p>")
            if result.layers.get("keep_fp32"):
                out.append(f"<div class='evidence'>keep-fp32 list: {e(','.join(result.layers['keep_fp32']))}</div>")
        out.append(f"<p>{e(_advice(fd.kind))}</p>")
    if result.tolerance and not result.aligned:
        tol = result.tolerance
        exact = exact_mismatches(result)
        note = f"; control inputs must match exactly, and these do not: {', '.join(exact)}" if exact else ""
        out.append(
            f"<p class='muted'>Loosest tolerance the measured tensors need: cos ≥ {tol['cos_min']:.9f}, rel_l1 ≤ "
            f"{tol['rel_l1_max']:.3g} (current: cos ≥ {result.thresholds.cos_min}, rel_l1 ≤ "
            f"{result.thresholds.rel_l1_max:g}){e(note)}</p>"
        )
    if result.replay is not None:
        out.append(
            "<p><b>Replay</b> (reference inputs fed to the target submodel, no accumulation): "
            f"{e(result.replay.headline())}</p>"
        )
    if result.warnings or result.notes:
        items = [f"<li>⚠ {e(w)}</li>" for w in result.warnings] + [f"<li>ℹ {e(n)}</li>" for n in result.notes]
        out.append(f"<ul class='warn-list'>{''.join(items)}</ul>")
    return "\n".join(out)


def _verdict_sentence(result: Comparison) -> str:
    fd = result.first_divergence
    return fd.message if fd is not None else result.headline().removeprefix("aligned: ")


def _advice(kind: str) -> str:
    return {
        "input mismatch": "An input differs although every earlier call matched: look at the glue code that prepares "
        "this input (dtype casts, timestep handling, scaling, normalisation).",
        "local error": "The inputs match but the outputs differ: the port of this submodel itself is off. Replay it "
        "(alignkit replay) and drill down to its layers.",
        "propagated": "The inputs differ because an earlier output already differed: look at the earlier call.",
        "raised": "One run's call raised where the other's returned, from matching inputs: the port refuses what the "
        "reference takes "
        "(an input's dtype or shape, a missing input); the inputs' dtypes are in the table and the warnings.",
    }.get(kind, "")


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}" if body else ""


def _curves(result: Comparison) -> str:
    uri = plots.error_curves(result)
    if not uri:
        return ""
    note = (
        "Red: the pipeline comparison (errors accumulate over the steps). Blue: the replay (local error only)."
        if result.replay is not None
        else "Output error of each submodel per step; a rising line is accumulated drift."
    )
    return _section("Error per step", f"<p class='muted'>{note}</p><img alt='error per step' src='{uri}'>")


def _heatmap(result: Comparison) -> str:
    uri = plots.heatmap(result)
    if not uri:
        return ""
    n = len(plots.heatmap_rows(result.table).drop_duplicates(["submodel", "io", "tensor"]))
    title = "Tensors × steps (log10 relative L1)"
    if n > plots.HEATMAP_ROWS:
        title += f": the {plots.HEATMAP_ROWS} of {n} tensors that differ most"
    return _section(title, f"<img alt='heatmap' src='{uri}'>")


def _images(result: Comparison) -> str:
    from alignkit.storage import open_dump

    try:
        with open_dump(result.reference) as r, open_dump(result.target) as t:
            panels = plots.image_panels(result, r, t)
    except Exception:  # the dumps moved since the comparison: the report goes on without images
        return ""
    body = "".join(
        f"<h3 style='font-size:.95em'>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='{uri}'>"
        for title, uri in panels
    )
    return _section("Images: reference | target | difference", body)


def _calls_table(result: Comparison) -> str:
    t = result.table
    if t.empty:
        return "<p>No tensors were compared.</p>"
    ordered = t.assign(_sev=t["status"].map(_SEVERITY).fillna(9)).sort_values(["_sev", "seq"], kind="stable")
    note = ""
    if len(ordered) > CALL_ROWS:
        note = (
            f"<p class='muted'>The first {CALL_ROWS} of {len(ordered)} rows, mismatches first; <code>--csv</code> "
            "or <code>--json</code> writes them all.</p>"
        )
        ordered = ordered.head(CALL_ROWS)
    return (
        note + "<div class='scroll'>" + _frame_table(ordered[_call_columns(t)], sortable=True, status=True) + "</div>"
    )


def _call_columns(t: pd.DataFrame) -> list[str]:
    """The call table's columns, with the target's own tensor names (and which reference
    tensor a position-matched one holds) only where they say something."""
    columns = [c for c in _CALL_COLUMNS if c in t.columns]
    named = t["tgt_tensor"].notna() & (t["tgt_tensor"] != t["tensor"])
    if named.any():
        columns.insert(columns.index("tensor") + 1, "tgt_tensor")
    if t["swapped_with"].notna().any():
        columns.append("swapped_with")
    return columns


def _frame_table(frame, *, sortable: bool, status: bool = False) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in frame.columns)
    rows = []
    for rec in frame.to_dict("records"):
        st = str(rec.get("status", ""))
        cls = (
            " class='bad'"
            if status and st in ("mismatch", "nonfinite", "shape")
            else (" class='warn'" if status and st == "precision" else "")
        )
        cells = "".join(_cell(v) for v in rec.values())
        rows.append(f"<tr{cls}>{cells}</tr>")
    cls = "sortable" if sortable else ""
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "<td class='num' data-v=''>-</td>"
        return f"<td class='num' data-v='{value!r}'>{html.escape(_num(value))}</td>"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return f"<td class='num'>{value}</td>"
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def _num(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if 0.99 <= value < 1.0:
        return f"{value:.9f}"
    return f"{value:.4g}"


def _metadata(result: Comparison) -> str:
    e = html.escape
    keys = list(dict.fromkeys([*result.ref_meta, *result.tgt_meta]))
    rows = []
    for key in keys:
        r, t = _meta_value(result.ref_meta.get(key)), _meta_value(result.tgt_meta.get(key))
        cls = " class='diff'" if r != t and key not in ("created", "command") else ""
        rows.append(f"<tr{cls}><td><b>{e(key)}</b></td><td>{e(r)}</td><td>{e(t)}</td></tr>")
    head = "<thead><tr><th></th><th>reference</th><th>target</th></tr></thead>"
    return f"<table>{head}<tbody>{''.join(rows)}</tbody></table>"


def _meta_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
    if value is None:
        return "—"
    return json.dumps(value) if isinstance(value, (list, bool)) else str(value)
