"""Walk the calls in time order and say where the two runs first part ways, and why.

- *input mismatch*: a call's inputs differ although every earlier call matched — the glue
  code between submodels feeds something different.
- *local error*: the inputs match but the outputs differ — the port of that submodel.
- *propagated*: the inputs differ because an earlier call's output already differed.
- *raised*: the inputs match, and one run's call raised where the other's returned (an
  engine that refuses a dtype or shape the reference takes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from alignkit.comparison.table import BAD, WHOLESALE_DTYPE_CHANGE
from alignkit.phrasing import count

INPUT_MISMATCH, LOCAL_ERROR, PROPAGATED, RAISED = "input mismatch", "local error", "propagated", "raised"
NOISE_MIN_ELEMENTS, NOISE_MAX_COS, NOISE_REL_L1 = 256, 0.1, (1.2, 1.7)  # what two independent draws of noise look like


@dataclass
class Divergence:
    """The first place where the target parts ways with the reference."""

    submodel: str
    step: int
    call: int
    io: str
    tensor: str
    kind: str
    message: str
    seq: int = 0
    evidence: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classify_calls(table: pd.DataFrame, calls: pd.DataFrame, raised: dict[int, str] | None = None) -> pd.DataFrame:
    """One row per matched call with its kind ('' when it matches) and worst output error;
    ``raised`` says which calls raised on one side only (by reference seq)."""
    bad = table["status"].isin(BAD)
    recast = bad & (table["io"] == "inputs") & _kinds_differ(table)
    per_call = (
        table.assign(bad_in=bad & (table["io"] == "inputs"), bad_out=bad & (table["io"] == "outputs"), recast=recast)
        .groupby("seq", sort=True)
        .agg(bad_in=("bad_in", "any"), bad_out=("bad_out", "any"), recast=("recast", "any"))
    )
    outputs = table[table["io"] == "outputs"]
    outs = outputs.groupby("seq").agg(out_rel_l1=("rel_l1", "max"), out_cos=("cos", "min"))
    outs["out_l1"] = outputs.groupby("seq")["l1"].first()  # the primary output: latents, sample
    outs["out_nonfinite"] = outputs.assign(nf=outputs["status"] == "nonfinite").groupby("seq")["nf"].any()
    matched = calls.dropna(subset=["ref_seq", "tgt_seq"]).sort_values("ref_seq")
    frame = matched[["seq", "submodel", "step", "call"]].astype({"seq": "int64"}).set_index("seq")
    frame = frame.join(per_call).join(outs).fillna({"bad_in": False, "bad_out": False, "recast": False})
    frame["raised"] = [(raised or {}).get(seq, "") for seq in frame.index]
    kinds, earlier = [], False
    for bad_in, recast_in, bad_out, raise_ in zip(frame["bad_in"], frame["recast"], frame["bad_out"], frame["raised"]):
        if bad_in:  # an input of another kind of dtype (a float timestep as int64) is no earlier error's doing
            kinds.append(PROPAGATED if earlier and not recast_in else INPUT_MISMATCH)
        elif raise_:
            kinds.append(RAISED)
        elif bad_out:
            kinds.append(LOCAL_ERROR)
        else:
            kinds.append("")
        earlier = earlier or bool(bad_in) or bool(bad_out) or bool(raise_)
    frame["kind"] = kinds
    return frame.reset_index()


_FLOAT_KINDS = ("float", "bfloat", "complex")


def _kinds_differ(table: pd.DataFrame) -> pd.Series:
    """Rows whose two sides are of other kinds of dtype (float against integer or bool): drift
    changes values, never a dtype, so such an input is made so by the glue or the engine. (Only
    rows with both sides are read: the bad ones.)"""

    def is_float(dtype: object) -> bool:
        return str(dtype).startswith(_FLOAT_KINDS)

    return table["ref_dtype"].map(is_float) != table["tgt_dtype"].map(is_float)


def unread_errors(per_call: pd.DataFrame) -> set[int]:
    """The seqs of local errors that nothing later reads: some later call was compared, every
    later call's inputs match up to the next divergence of its own (an input of another kind of
    dtype), and the submodel never diverges again. An SDXL text encoder exported with a wrong
    ``hidden_states[-1]``, which the pipeline never uses, is such an error: named first, it
    would hide the divergence that matters."""
    rows = per_call.reset_index(drop=True)
    recast = rows["recast"]
    out = set()
    for i in rows.index[rows["kind"] == LOCAL_ERROR]:
        later = rows.iloc[i + 1 :]
        if later.empty or later.loc[later["submodel"] == rows.at[i, "submodel"], "bad_out"].any():
            continue
        roots = later.index[(later["kind"] == INPUT_MISMATCH) & recast.loc[later.index]]
        before_root = later.loc[: roots[0] - 1] if len(roots) else later
        if not before_root.empty and not before_root["bad_in"].any():
            out.add(int(rows.at[i, "seq"]))
    return out


def unread_warnings(table: pd.DataFrame, per_call: pd.DataFrame) -> list[str]:
    """Each local error that nothing later reads, said once (the first divergence skips them)."""
    out = []
    for seq in sorted(unread_errors(per_call)):
        call = per_call[per_call["seq"] == seq].iloc[0]
        rows = table[(table["seq"] == seq) & (table["io"] == "outputs") & table["status"].isin(BAD)]
        if rows.empty:
            continue
        row = rows.iloc[0]
        out.append(
            f"{_where(call)}: output `{row['tensor']}` differs ({_metrics_text(_evidence(row))}), but no later call's "
            "input differs: nothing downstream reads it, so it is not taken for the first divergence"
        )
    return out


def first_divergence(
    table: pd.DataFrame,
    per_call: pd.DataFrame,
    explain: Callable[[pd.Series], str | None] | None = None,
    same_seed: str | None = None,
) -> Divergence | None:
    """The earliest divergent call, with its evidence; ``explain`` may say why an input
    mismatch's input differs (the glue that made it), given its table row. ``same_seed`` is
    the seed both runs recorded, if they did: then noise-like differences are no other seed's."""
    hits = per_call[per_call["kind"] != ""]
    if hits.empty:
        return None
    read = hits[~hits["seq"].isin(unread_errors(per_call))]
    call = (read if not read.empty else hits).iloc[0]
    if call["kind"] == RAISED:
        where = _where(call)
        inputs = table[(table["seq"] == call["seq"]) & (table["io"] == "inputs")].dropna(
            subset=["ref_dtype", "tgt_dtype"]
        )
        recast = [
            f"`{r.tensor}` is {r.tgt_dtype} in the target, {r.ref_dtype} in the reference"
            for r in inputs.itertuples()
            if r.ref_dtype != r.tgt_dtype
        ]
        message = f"{where}: raised — {call['raised']}, from matching inputs" + (
            f" (equal values, but {'; '.join(recast)})" if recast else ""
        )
        return Divergence(
            str(call["submodel"]),
            int(call["step"]),
            int(call["call"]),
            "outputs",
            "",
            RAISED,
            message,
            int(call["seq"]),
            {"raised": call["raised"]},
        )
    io = "outputs" if call["kind"] == LOCAL_ERROR else "inputs"
    rows = table[(table["seq"] == call["seq"]) & (table["io"] == io) & table["status"].isin(BAD)]
    row = rows.iloc[0]
    evidence = _evidence(row)
    cause = explain(row) if explain is not None and call["kind"] == INPUT_MISMATCH else None
    message = _message(call, row, evidence, cause, same_seed)
    return Divergence(
        str(call["submodel"]),
        int(call["step"]),
        int(call["call"]),
        io,
        str(row["tensor"]),
        str(call["kind"]),
        message,
        int(call["seq"]),
        evidence,
    )


def _evidence(row: pd.Series) -> dict[str, Any]:
    keys = [
        "ref_dtype",
        "tgt_dtype",
        "ref_shape",
        "tgt_shape",
        "ref_value",
        "tgt_value",
        "l1",
        "rel_l1",
        "max_abs",
        "cos",
        "cos_dist",
        "floor_ratio",
        "floor_dtype",
        "status",
        "numel",
        "nan_ref",
        "nan_tgt",
        "inf_ref",
        "inf_tgt",
    ]
    return {k: _plain(row.get(k)) for k in keys if k in row and not _missing(row.get(k))}


def _where(call: pd.Series) -> str:
    return f"{call['submodel']} step {call['step']}" + (f" call {call['call']}" if call["call"] else "")


def _message(
    call: pd.Series, row: pd.Series, ev: dict[str, Any], cause: str | None = None, same_seed: str | None = None
) -> str:
    where = _where(call)
    tensor = row["tensor"]
    if call["kind"] == LOCAL_ERROR:
        message = (
            f"{where}: local error — the inputs match but output `{tensor}` differs ({_metrics_text(ev)}); the "
            f"port of {call['submodel']} itself is off"
        )
    elif call["kind"] == INPUT_MISMATCH and cause:
        message = f"{where}: input mismatch — {_values_text(tensor, ev)}, although every earlier call matched; {cause}"
    elif call["kind"] == INPUT_MISMATCH and _independent_draws(row, ev) and same_seed is not None:
        message = (
            f"{where}: input mismatch — {_values_text(tensor, ev)}, although every earlier call matched; the two are "
            f"uncorrelated, yet both runs were given the same seed ({same_seed}): not other starting noise but glue "
            f"that feeds {call['submodel']} something else in its place (an inverted mask, another tensor, noise "
            "drawn again)"
        )
    elif call["kind"] == INPUT_MISMATCH and _independent_draws(row, ev):
        message = (
            f"{where}: input mismatch — {_values_text(tensor, ev)}, although every earlier call matched; the two are "
            "uncorrelated but alike "
            "in size, as two draws of random noise are: the runs start from different noise (another seed or "
            "generator, or noise drawn "
            "on another device or in another dtype)"
        )
    else:  # an input mismatch (the first divergence is never propagated: what it propagates from comes first)
        message = (
            f"{where}: input mismatch — {_values_text(tensor, ev)}, although every earlier call matched; the "
            f"glue code that feeds {call['submodel']} differs"
        )
        if math.isfinite(ev.get("floor_ratio", math.inf)):
            message += (
                f", or computes in {ev['tgt_dtype']} what the reference computes in {ev['ref_dtype']} and amplifies "
                "its rounding "
                "(as classifier-free guidance does, by about its guidance scale)"
            )
    if not _missing(row.get("swapped_with")):
        message += (
            f" (target `{row['tgt_tensor']}`, matched to it by position, holds the reference's "
            f"`{row['swapped_with']}`: see the warning on swapped tensors)"
        )
    return message


def _independent_draws(row: pd.Series, ev: dict[str, Any]) -> bool:
    """Whether two tensors look like independent draws of one distribution: no correlation,
    and a relative L1 near that of two such draws (√2 for Gaussian noise, 4/3 for uniform,
    3/2 for Laplace). Judged only on tensors large enough for the figures to settle."""
    return (
        ev.get("status") == "mismatch"
        and int(row.get("numel") or 0) >= NOISE_MIN_ELEMENTS
        and abs(ev.get("cos", 1.0)) <= NOISE_MAX_COS
        and NOISE_REL_L1[0] <= ev.get("rel_l1", 0.0) <= NOISE_REL_L1[1]
    )


def _values_text(tensor: str, ev: dict[str, Any]) -> str:
    if ev.get("status") == "shape":
        return f"`{tensor}`: reference shape {ev.get('ref_shape')}, target {ev.get('tgt_shape')}"
    if "ref_value" in ev and "tgt_value" in ev:
        return f"`{tensor}`: reference {ev['ref_dtype']} {ev['ref_value']}, target {ev['tgt_dtype']} {ev['tgt_value']}"
    dtypes = f" ({ev['ref_dtype']} vs {ev['tgt_dtype']})" if ev.get("ref_dtype") != ev.get("tgt_dtype") else ""
    return f"`{tensor}` differs{dtypes}: {_metrics_text(ev)}"


def nonfinite_text(ev: Mapping[str, Any]) -> str:
    """Where NaN/Inf stand, as a share of the tensor: ``n/a: 100% NaN in the target`` when no
    element is finite on both sides (nothing was measured: not a match), else the counts and
    the metrics over the elements finite on both."""
    numel = ev.get("numel") or 0
    parts = []
    for side, who in (("tgt", "target"), ("ref", "reference")):
        for kind in ("nan", "inf"):
            n = int(ev.get(f"{kind}_{side}") or 0)
            if n:
                share = f"{100 * n / numel:.3g}%" if numel else str(n)
                parts.append(f"{share} {'NaN' if kind == 'nan' else 'Inf'} in the {who}")
    where = ", ".join(parts) or "NaN/Inf on one side"
    rel = ev.get("rel_l1")
    if rel is None or rel != rel:
        return f"n/a: {where}"
    return f"{where}; over the rest rel_l1 {rel:.3g}, cos {ev.get('cos', float('nan')):.9f}"


def _metrics_text(ev: dict[str, Any]) -> str:
    if ev.get("status") == "nonfinite":
        return nonfinite_text(ev)
    if ev.get("status") == "shape":
        return f"reference shape {ev.get('ref_shape')}, target {ev.get('tgt_shape')}: not comparable"
    parts = []
    if "rel_l1" in ev:
        parts.append(f"rel_l1 {ev['rel_l1']:.3g}")
    if "cos" in ev:
        parts.append(f"cos {ev['cos']:.9f}")
    if "max_abs" in ev:
        parts.append(f"max_abs {ev['max_abs']:.3g}")
    if math.isfinite(ev.get("floor_ratio", math.inf)):
        floor = ev.get("floor_dtype", ev["tgt_dtype"])
        of = "the reference's run-to-run spread" if floor == "run-to-run spread" else f"the noise floor of {floor}"
        parts.append(f"{ev['floor_ratio']:.3g}× {of}")
    return ", ".join(parts)


def growth(per_call: pd.DataFrame, first: Divergence) -> dict[str, Any]:
    """How the error grows after the first divergence, in mean absolute error (L1).

    The drift curve follows the call that ends each step (in a diffusers loop, the scheduler
    step that writes the next latents): the state carried into the next step. Absolute L1
    shows accumulation even while the latents themselves shrink towards the image.
    """
    since = per_call[per_call["seq"] >= first.seq].sort_values("seq")
    broken = since[since["out_nonfinite"].eq(True)] if "out_nonfinite" in since else since.iloc[:0]
    nonfinite = (
        {"submodel": str(broken.iloc[0]["submodel"]), "step": int(broken.iloc[0]["step"])} if len(broken) else None
    )
    after = since[since["out_l1"].notna()]
    if after.empty:
        return {"nonfinite_from": nonfinite} if nonfinite else {}
    enders = after.groupby("step").tail(1)
    carrier = enders["submodel"].mode().iloc[0]
    curve = enders[enders["submodel"] == carrier]
    out: dict[str, Any] = {
        "submodel": str(carrier),
        "steps": [int(s) for s in curve["step"]],
        "l1": [float(v) for v in curve["out_l1"]],
    }
    last = after.iloc[-1]
    out["final"] = {
        "submodel": str(last["submodel"]),
        "step": int(last["step"]),
        "l1": float(last["out_l1"]),
        "rel_l1": float(last["out_rel_l1"]),
        "cos": float(last["out_cos"]),
    }
    if nonfinite:
        out["nonfinite_from"] = nonfinite
    start = next((v for v in out["l1"] if v > 0), None)
    out["factor"] = max(out["l1"]) / start if start else None
    return out


def growth_text(g: dict[str, Any]) -> str:
    broken = g.get("nonfinite_from")
    nan_text = f"NaN/Inf in the target from step {broken['step']} on ({broken['submodel']})" if broken else ""
    if not g.get("l1"):
        return nan_text
    vals, steps = g["l1"], g["steps"]
    final = g.get("final")
    if not any(vals) and not (final and final["l1"]):
        return nan_text or "none — every output from there on matches exactly (L1 0)"
    text = f"{g['submodel']} output L1 {vals[0]:.3g} at step {steps[0]}"
    if len(vals) > 1:
        peak = max(range(len(vals)), key=vals.__getitem__)
        text += f" → {vals[-1]:.3g} at step {steps[-1]}"
        if peak != len(vals) - 1 and vals[peak] > vals[-1] * 1.05:
            text += f" (peak {vals[peak]:.3g} at step {steps[peak]})"
        factor = g.get("factor")
        if factor and math.isfinite(factor) and factor > 1.05:
            text += f", ×{factor:.3g} the first divergent step's"
    if final and (final["submodel"] != g["submodel"] or final["step"] != steps[-1]):
        text += (
            f"; the final output ({final['submodel']}, step {final['step']}) has rel_l1 {final['rel_l1']:.3g}, "
            f"cos {final['cos']:.6f}"
        )
    return f"{text}; {nan_text}" if nan_text else text


def tolerance(table: pd.DataFrame) -> dict[str, float]:
    """The loosest thresholds any compared tensor needs: Polygraphy's minimum required tolerance."""
    measured = table[table["status"].isin(["ok", "precision", "mismatch"]) & ~table["exact"].eq(True)]
    if measured.empty:
        return {}
    return {"cos_min": float(measured["cos"].min()), "rel_l1_max": float(measured["rel_l1"].max())}


def warnings_for(table: pd.DataFrame, floor_factor: float) -> list[str]:
    """Dtype differences (even with equal values), precision-floor rows, one-sided NaN/Inf."""
    out = _dtype_warnings(table)
    out.extend(_swap_warnings(table))
    out.extend(_broadcast_warnings(table))
    out.extend(_overlap_warnings(table))
    out.extend(_structure_warnings(table))
    amplified = table["glue"].notna()
    within = table[(table["status"] == "precision") & ~amplified]
    spread = within["floor_dtype"] == "run-to-run spread"
    if (~spread).sum():
        out.append(
            f"{int((~spread).sum())} tensors differ within {floor_factor:g}× the noise floor of the target's "
            "lower-precision dtype: expected precision loss, not a divergence"
        )
    if spread.sum():
        out.append(
            f"{int(spread.sum())} tensors differ within {floor_factor:g}× the reference's own run-to-run spread "
            "(record --repeat): the reference itself varies that much, not a divergence"
        )
    for (sub, io, tensor, glue), group in table[amplified].groupby(["submodel", "io", "tensor", "glue"], sort=False):
        past = (
            f"{sub} {io[:-1]} `{tensor}` is past {floor_factor:g}× its noise floor at "
            f"{count(group['step'].nunique(), 'step')} (up to {group['floor_ratio'].max():.3g}×)"
        )
        if io == "inputs":
            out.append(
                f"{past}, but is {glue} in both runs, of outputs within theirs: their precision loss, amplified by "
                "the glue, not a divergence"
            )
        else:
            out.append(
                f"{past}, but is {glue}, which the glue took past its own: its relative error is no more than that "
                f"input's plus {floor_factor:g}× its floor, precision loss carried on, not a divergence"
            )
    mismatched = table[table["nonfinite_mismatch"].fillna(0) > 0]
    nonfinite = {side: mismatched[f"nan_{side}"] + mismatched[f"inf_{side}"] for side in ("ref", "tgt")}
    for side, other, who in (("tgt", "ref", "target"), ("ref", "tgt", "reference")):
        nf = mismatched[nonfinite[side] > nonfinite[other]]
        if len(nf):
            row = nf.iloc[0]
            out.append(
                f"NaN/Inf first appear in the {who} only at {row['submodel']} step {row['step']} {row['io'][:-1]} "
                f"`{row['tensor']}` ({int(row[f'nan_{side}'])} NaN, {int(row[f'inf_{side}'])} Inf)"
            )
    return out


def _dtype_warnings(table: pd.DataFrame) -> list[str]:
    """One line per tensor whose dtype differs between the runs, except where a run computes
    in another precision throughout (float32 → float16 on every activation): those tensors,
    whose values differ, are said in one line, so that the few that stand out (a timestep of
    another dtype, values equal in spite of the dtype) are not lost among them."""
    both = table.dropna(subset=["ref_dtype", "tgt_dtype"])
    diff = both[both["ref_dtype"] != both["tgt_dtype"]].assign(equal=lambda d: d["max_abs"] == 0)
    tensors = (
        diff.groupby(["submodel", "io", "tensor", "ref_dtype", "tgt_dtype"], sort=False)
        .agg(equal=("equal", "all"), steps=("step", "nunique"))
        .reset_index()
    )
    out = []
    for (rd, td), group in tensors[~tensors["equal"]].groupby(["ref_dtype", "tgt_dtype"], sort=False):
        if len(group) >= WHOLESALE_DTYPE_CHANGE:
            subs = ", ".join(dict.fromkeys(group["submodel"]))
            out.append(
                f"{len(group)} tensors are {rd} in the reference and {td} in the target, with values that differ "
                f"({subs}): the target computes in {td}"
            )
            tensors = tensors.drop(group.index)
    for row in tensors.itertuples(index=False):
        note = "values equal" if row.equal else "values differ"
        out.append(
            f"{row.submodel} {row.io[:-1]} `{row.tensor}`: reference {row.ref_dtype}, target {row.tgt_dtype} ({note}) "
            f"at {count(row.steps, 'step')}"
        )
    return out


def _swap_warnings(table: pd.DataFrame) -> list[str]:
    """One line per pair of position-matched tensors that hold each other's values, in the
    order the reference records them."""
    swapped = table[table["swapped_with"].notna()]
    targets = dict(zip(zip(swapped["submodel"], swapped["io"], swapped["tensor"]), swapped["tgt_tensor"]))
    out, said = [], set()
    for (sub, io, tensor, other), group in swapped.groupby(["submodel", "io", "tensor", "swapped_with"], sort=False):
        if (sub, io, other, tensor) in said:
            continue  # said with its partner
        said.add((sub, io, tensor, other))
        a, b = targets[sub, io, tensor], targets.get((sub, io, other), "?")
        steps = len(set(group["step"]))
        out.append(
            f"{sub} {io}: target `{a}` and `{b}`, matched by position to `{tensor}` and `{other}`, hold each other's "
            "values "
            f"at {count(steps, 'step')}: if the engine takes them in this order, map the names "
            f"(--map {a}={other} --map {b}={tensor}); if not, they are fed to it swapped"
        )
    return out


def _broadcast_warnings(table: pd.DataFrame) -> list[str]:
    """Inputs compared as one value against many (a scalar timestep against a tiled one)."""
    spread = table[table["broadcast"].eq(True)]
    out = []
    for (sub, tensor, rs, ts), group in spread.groupby(["submodel", "tensor", "ref_shape", "tgt_shape"], sort=False):
        steps = len(set(group["step"]))
        agree = "the values agree" if (group["status"] == "ok").all() else "the values differ"
        out.append(
            f"{sub} input `{tensor}`: reference shape {rs}, target {ts}: one value compared with each of the other's "
            f"at {count(steps, 'step')} ({agree})"
        )
    return out


def _structure_warnings(table: pd.DataFrame) -> list[str]:
    """Tensors paired by structure because their names collide with tensors of other shapes."""
    paired = table[table["matched_by"] == "structure"]
    out = []
    for (sub, io), group in paired.groupby(["submodel", "io"], sort=False):
        first = group.drop_duplicates("tensor")
        shown = ", ".join(f"`{t}` ↔ `{r}`" for t, r in zip(first["tgt_tensor"][:3], first["tensor"][:3]))
        more = f" and {len(first) - 3} more" if len(first) > 3 else ""
        out.append(
            f"{sub} {io}: the target's names would pair tensors of other shapes, so its {len(first)} tensors are "
            f"paired with the reference's by structure, in flattened order and shape (target ↔ reference: "
            f"{shown}{more})"
        )
    return out


def _overlap_warnings(table: pd.DataFrame) -> list[str]:
    """Tensors of which one side holds a part of the other's (last positions, a padded batch)."""
    if "overlap" not in table:
        return []
    part = table[table["overlap"].notna()]
    out = []
    for (sub, io, tensor, rs, ts, overlap), group in part.groupby(
        ["submodel", "io", "tensor", "ref_shape", "tgt_shape", "overlap"], sort=False
    ):
        agree = "they agree" if group["status"].isin(["ok", "precision"]).all() else "they differ"
        out.append(
            f"{sub} {io[:-1]} `{tensor}`: reference shape {rs}, target {ts}: compared on {overlap} at "
            f"{count(group['step'].nunique(), 'step')} ({agree})"
        )
    return out


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
