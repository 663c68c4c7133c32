"""Build the tidy table: one row per compared tensor pair, with metrics and a status.

Statuses: ``ok``; ``precision`` (over the thresholds, but within ``floor_factor`` times the
noise floor of the target's lower-precision dtype: expected loss, not a divergence; or past it,
where the ``glue`` column says how the input is made alike in both runs of outputs within it);
``mismatch``; ``nonfinite`` (NaN/Inf where the other side has none); ``shape``; and
``ref only`` / ``tgt only`` for tensors on one side.

Control inputs must be equal: a model is not robust to a timestep that is off by 0.25, however
small its relative L1. They are integer or bool tensors (token ids, masks) and inputs of at most
``EXACT_NUMEL`` elements that are scalars or vectors (timesteps, a guidance scale) or hold whole
numbers (SDXL's ``time_ids``). A small matrix of fractions is a signal, not a control: a pooled
text embedding of a tiny test model is compared with tolerances, as a real model's would be.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from alignkit.comparison.matching import MergedCall, MergedTensor, NameMap, TensorPair, match_tensors
from alignkit.comparison.metrics import (
    BLOCK_ELEMENTS,
    FLOOR_OF_PRECISION,
    array_metrics,
    dataset_metrics,
    floor_dtype_for,
    least_precise,
    lower_precision,
)
from alignkit.comparison.workers import in_order
from alignkit.errors import DumpCorruptError, UsageError
from alignkit.phrasing import count
from alignkit.storage.reader import Call, Dump, TensorInfo

EXACT_NUMEL = 64
WHOLESALE_DTYPE_CHANGE = 4  # tensors in a lower precision that make a run one computing in it
SWAP_CHECK_MAX = 8  # position-matched mismatches per call and side tried pairwise for a swap
BAD = ("mismatch", "nonfinite", "shape")

COLUMNS = [
    "seq",
    "submodel",
    "step",
    "call",
    "io",
    "tensor",
    "tgt_tensor",
    "matched_by",
    "swapped_with",
    "broadcast",
    "overlap",
    "estimate",
    "ref_dtype",
    "tgt_dtype",
    "ref_shape",
    "tgt_shape",
    "numel",
    "exact",
    "l1",
    "rel_l1",
    "max_abs",
    "cos",
    "cos_dist",
    "rmse",
    "sqnr_db",
    "nan_ref",
    "nan_tgt",
    "inf_ref",
    "inf_tgt",
    "nonfinite_mismatch",
    "floor_rel_l1",
    "floor_cos_dist",
    "floor_ratio",
    "floor_dtype",
    "status",
    "ref_value",
    "tgt_value",
    "glue",
]


@dataclass(frozen=True)
class Thresholds:
    cos_min: float = 0.999
    rel_l1_max: float = 1e-3
    floor_factor: float = 10.0

    def __post_init__(self) -> None:
        if not -1 <= self.cos_min <= 1:
            raise UsageError(f"cos_min {self.cos_min:g}: a cosine lies between -1 and 1")
        if not self.rel_l1_max >= 0:
            raise UsageError(f"rel_l1_max {self.rel_l1_max:g}: a relative L1 is never negative")
        if not self.floor_factor >= 0:
            raise UsageError(f"floor_factor {self.floor_factor:g}: a multiple of the noise floor is never negative")


def as_table(rows: list[dict]) -> pd.DataFrame:
    """The table of :func:`table_rows`' rows (rows computed in parts elsewhere, joined, too)."""
    return pd.DataFrame(rows, columns=COLUMNS).astype({"glue": object})


def table_rows(
    ref: Dump,
    tgt: Dump,
    calls: pd.DataFrame,
    names: NameMap,
    limits: Thresholds,
    progress: Callable[[int], None] | None = None,
    carried: tuple[str, int] | None = None,
) -> list[dict]:
    """One row per tensor pair of the matched ``calls``, in order (:func:`as_table` makes them
    the table); ``carried`` is the target run's :func:`carried_precision`."""
    parts = calls["tgt_parts"] if "tgt_parts" in calls else pd.Series([None] * len(calls))

    def call_rows(item: tuple[Any, Any]) -> list[dict]:
        row, split = item
        if pd.isna(row.ref_seq) or pd.isna(row.tgt_seq):
            return []
        rc = ref.call_at(int(row.ref_seq))
        tc = (
            _merged_in_order(ref, tgt, rc, [tgt.call_at(int(s)) for s in split])
            if isinstance(split, tuple)
            else tgt.call_at(int(row.tgt_seq))
        )
        pairs = match_tensors(rc, tc, names)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf are counted in the metrics
            out = [_row(ref, tgt, rc, tc, pair, limits, _since(carried, tc)) for pair in pairs]
        _mark_swaps(ref, tgt, rc, tc, pairs, out, limits)
        return out

    ref.prepare_for_threads(), tgt.prepare_for_threads()
    sizes = ref.tensors.groupby("seq")["numel"].sum().to_dict()

    def heavy(item: tuple[Any, Any]) -> bool:  # more than a block: worth a thread of its own
        return not pd.isna(item[0].ref_seq) and sizes.get(int(item[0].ref_seq), 0) > BLOCK_ELEMENTS

    rows: list[dict] = []
    items = zip(calls.itertuples(index=False), parts)
    for i, call_rows_done in enumerate(in_order(call_rows, items, heavy)):
        rows.extend(call_rows_done)
        if progress is not None:
            progress(i)
    return rows


def carried_precision(ref: Dump, tgt: Dump, engines: dict[str, str] | None = None) -> tuple[str, int] | None:
    """The lower precision the target run computes in where the reference never does, and the
    seq of the target's first call that holds it: from there on every float tensor carries its
    rounding, even one kept in float32, and is measured against its noise floor. Seen in the
    dtypes (float16 for a pipeline cast with ``.to(torch.float16)``), or in ``engines``: the
    precision each target submodel's engine computes in behind float32 inputs and outputs
    (:func:`engine_precisions`)."""
    tensors = tgt.tensors
    ref_lower = lower_precision(ref.tensors["dtype"].unique())
    new = lower_precision(tensors["dtype"].unique()) - ref_lower
    counts = tensors[tensors["dtype"].isin(new)]["dtype"].value_counts()
    found = {
        str(d): int(tensors[tensors["dtype"] == d]["seq"].min())
        for d, n in counts.items()
        if n >= WHOLESALE_DTYPE_CHANGE
    }
    for submodel, precision in (engines or {}).items():
        seqs = tgt.calls.loc[tgt.calls["submodel"] == submodel, "seq"]
        dtype = FLOOR_OF_PRECISION[precision]
        if len(seqs) and dtype not in ref_lower:
            found[dtype] = min(found.get(dtype, int(seqs.min())), int(seqs.min()))
    if not found:
        return None
    dtype = least_precise(found)
    return dtype, found[dtype]


def raised_calls(ref: Dump, tgt: Dump, calls: pd.DataFrame) -> dict[int, str]:
    """The matched calls where one run raised and the other returned, by reference seq: who
    raised what, where the other returned. A call that raised has no outputs, so only such
    calls are asked."""
    out = {}
    for rs, ts in calls.dropna(subset=["ref_seq", "tgt_seq"])[["ref_seq", "tgt_seq"]].itertuples(index=False):
        rc, tc = ref.call_at(int(rs)), tgt.call_at(int(ts))
        returned = bool(rc.info("outputs")), bool(tc.info("outputs"))
        if returned[0] == returned[1]:
            continue
        (who, call), other = (
            (("the target", tc), "the reference") if returned[0] else (("the reference", rc), "the target")
        )
        error = call.error
        if error is not None and not error.startswith("alignkit "):  # not alignkit's own trouble copying the outputs
            out[rc.seq] = f"{who} raised {error}, where {other} returned"
    return out


def one_side_notes(table: pd.DataFrame) -> list[str]:
    """Tensors of matched calls that only one run has, each said once: an output the export
    left out (a text encoder's ``pooler_output``), an input the port does not feed."""
    notes = []
    one_side = table[table["status"].isin(["ref only", "tgt only"])]
    for (submodel, io, status), group in one_side.groupby(["submodel", "io", "status"], sort=False):
        side = "reference" if status == "ref only" else "target"
        calls = group.groupby("tensor", sort=False).size()
        if len(calls) == 1:
            tensor, n = next(iter(calls.items()))
            notes.append(f"{submodel} {io[:-1]} `{tensor}`: only in the {side} ({count(n, 'call')}); not compared")
            continue
        names = ", ".join(f"`{name}`" for name in calls.index[:FIRST_NAMES])
        more = f" and {len(calls) - FIRST_NAMES} more" if len(calls) > FIRST_NAMES else ""
        notes.append(
            f"{submodel} {io}: {len(calls)} tensors only in the {side} ({names}{more}; up to "
            f"{count(int(calls.max()), 'call')} each); not compared"
        )
    return notes


FIRST_NAMES = 3  # names a grouped note lists before '… and N more' (the table and the JSON list them all)


def inputs_agree(
    ref: Dump, tgt: Dump, rc: Call, tc: Call, names: NameMap, limits: Thresholds, carried: tuple[str, int] | None = None
) -> bool:
    """Whether two calls were fed the same inputs, as the table would judge them."""
    pairs = [p for p in match_tensors(rc, tc, names) if p.io == "inputs"]
    return bool(pairs) and all(
        _row(ref, tgt, rc, tc, pair, limits, _since(carried, tc))["status"] not in BAD for pair in pairs
    )


def _since(carried: tuple[str, int] | None, tc: Call | MergedCall) -> str | None:
    """The lower precision a target call's tensors carry: from the run's first call in it on."""
    return carried[0] if carried is not None and tc.seq >= carried[1] else None


def _mark_swaps(
    ref: Dump, tgt: Dump, rc: Call, tc: Call | MergedCall, pairs: list[TensorPair], rows: list[dict], limits: Thresholds
) -> None:
    """Say which position-matched tensors hold each other's values (``swapped_with``: the
    reference tensor the target's holds). Position matching trusts the order an engine
    records its inputs in; when two tensors of one shape come in the other order, both
    mismatch and each equals the other's reference. Whether the engine takes them in that
    order (map the names) or the glue code feeds them swapped (a bug) only the user knows,
    so the pairing stands and the finding is reported."""
    for io in ("inputs", "outputs"):
        bad = [
            i
            for i, (p, row) in enumerate(zip(pairs, rows))
            if p.io == io and p.how == "position" and row["status"] in BAD
        ][:SWAP_CHECK_MAX]
        for i, j in itertools.combinations(bad, 2):
            a, b = pairs[i], pairs[j]
            if a.ref.shape != b.ref.shape or rows[i]["swapped_with"] is not None or rows[j]["swapped_with"] is not None:
                continue
            if all(
                _row(ref, tgt, rc, tc, TensorPair(io, r, t, "position"), limits)["status"] not in BAD
                for r, t in ((a.ref, b.tgt), (b.ref, a.tgt))
            ):
                rows[i]["swapped_with"], rows[j]["swapped_with"] = b.ref.name, a.ref.name


def _row(
    ref: Dump,
    tgt: Dump,
    rc: Call,
    tc: Call | MergedCall,
    pair: TensorPair,
    limits: Thresholds,
    carried: str | None = None,
) -> dict:
    r, t = pair.ref, pair.tgt
    base = {
        "seq": rc.seq,
        "submodel": rc.submodel,
        "step": rc.step,
        "call": rc.call,
        "io": pair.io,
        "tensor": r.name if r else t.name,
        "tgt_tensor": t.name if t else None,
        "matched_by": pair.how,
        "swapped_with": None,
        "ref_dtype": r.dtype if r else None,
        "tgt_dtype": t.dtype if t else None,
        "ref_shape": shape_text(r.shape) if r else None,
        "tgt_shape": shape_text(t.shape) if t else None,
    }
    if r is None or t is None:
        return {**base, "status": "tgt only" if r is None else "ref only"}
    numel_r, numel_t = math.prod(r.shape), math.prod(t.shape)
    numel = base["numel"] = max(numel_r, numel_t)
    if not isinstance(t, MergedTensor) and (ref.is_stats(r.path) or tgt.is_stats(t.path)):
        return _stats_row(base, ref, tgt, r, t, pair, carried, limits)
    broadcast = _one_value_for_many(pair.io, numel_r, numel_t)
    if numel_r != numel_t and not broadcast:
        return _overlap_row(base, ref, tgt, r, t, floor_dtype_for(r.dtype, t.dtype, carried), limits)
    floor = floor_dtype_for(r.dtype, t.dtype, carried)
    values = None
    try:
        parts = t.parts if isinstance(t, MergedTensor) else (t.path,)
        small = numel <= BLOCK_ELEMENTS or (broadcast and isinstance(t, MergedTensor))  # most are
        if small or not (ref.is_whole(r.path) and all(tgt.is_whole(p) for p in parts)):
            values = ref.read(r.path, r.dtype), _read(tgt, t)
            m = array_metrics(*(np.broadcast_to(v.ravel(), (numel,)) for v in values) if broadcast else values, floor)
        else:  # streamed in blocks: a batch split into calls as its parts one after another
            parts = [tgt.dataset(p) for p in t.parts] if isinstance(t, MergedTensor) else tgt.dataset(t.path)
            m = dataset_metrics(ref.dataset(r.path), parts, floor)
    except (OSError, KeyError, ValueError) as exc:
        raise DumpCorruptError(
            f"{ref.path} / {tgt.path}: cannot read {rc.submodel} step {rc.step} {pair.io[:-1]} `{base['tensor']}` "
            f"({exc})"
        ) from exc
    if floor:
        m["floor_ratio"], m["floor_dtype"] = _floor_ratio(m), floor
    if ref.metadata.get("repeat"):
        _with_spread(m, ref, r)
    exact = pair.io == "inputs" and (
        _discrete(r.dtype) or _discrete(t.dtype) or (numel <= EXACT_NUMEL and _controls(r.shape, values[0]))
    )
    status = _status(m, exact, limits)
    out = {**base, **m, "exact": exact, "broadcast": broadcast, "status": status}
    if values is not None and (numel <= 8 or (exact and numel <= CONTROL_VALUES_SHOWN)):
        out["ref_value"], out["tgt_value"] = (_value(v) for v in values)
    return out


def _stats_row(
    base: dict, ref: Dump, tgt: Dump, r: TensorInfo, t: TensorInfo, pair: TensorPair, carried: Any, limits: Thresholds
) -> dict:
    """A pair of which one side (or both) was recorded as statistics: the metrics estimated on
    the sampled positions (the full side sampled at the same ones), the NaN/Inf counts from the
    whole tensors' statistics, an equal checksum taken as equal values (``estimate``)."""
    from alignkit.recording.stats import as_sample, positions

    if math.prod(r.shape) != math.prod(t.shape):
        return {**base, "status": "shape"}
    numel = math.prod(r.shape)

    def sample(dump: Dump, info: TensorInfo) -> np.ndarray:
        values = dump.read(info.path, info.dtype)
        if dump.is_stats(info.path):
            return as_sample(values.reshape(-1)).astype(np.float64)
        return values.reshape(-1)[positions(numel)].astype(np.float64)

    a, b = sample(ref, r), sample(tgt, t)
    floor = floor_dtype_for(r.dtype, t.dtype, carried)
    m = array_metrics(a, b, floor)
    stats = [dump.stats(info.path) if dump.is_stats(info.path) else {} for dump, info in ((ref, r), (tgt, t))]
    for side, figures in zip(("ref", "tgt"), stats):
        if figures:
            m[f"nan_{side}"], m[f"inf_{side}"] = int(figures["stats_nan"]), int(figures["stats_inf"])
    same = all(stats) and stats[0].get("stats_checksum") == stats[1].get("stats_checksum") and r.dtype == t.dtype
    if same:
        m.update(l1=0.0, rel_l1=0.0, max_abs=0.0, cos=1.0, cos_dist=0.0, rmse=0.0)
    m["nonfinite_mismatch"] = int(
        (m["nan_ref"] + m["inf_ref"]) != (m["nan_tgt"] + m["inf_tgt"]) or m.get("nonfinite_mismatch", 0)
    )
    if floor:
        m["floor_ratio"], m["floor_dtype"] = _floor_ratio(m), floor
    whole = numel <= len(a)  # a small tensor's sample is all of it
    exact = (
        pair.io == "inputs"
        and whole
        and (_discrete(r.dtype) or _discrete(t.dtype) or (numel <= EXACT_NUMEL and _controls(tuple(r.shape), a)))
    )
    out = {**base, **m, "exact": exact, "estimate": numel > len(a), "status": _status(m, exact, limits)}
    if numel <= 8:
        out["ref_value"], out["tgt_value"] = _value(a.reshape(r.shape)), _value(b.reshape(t.shape))
    return out


def slice_axis(ref_shape: tuple, tgt_shape: tuple) -> int | None:
    """The one axis along which two shapes of equal rank differ, if only one does: one tensor
    then holds a part of the other (transformers' ``generate`` asks for the last position's
    logits where an export returns every position; a batch padded to a fixed size). Each
    position must hold more than one value: one value against many is no part of the other."""
    if len(ref_shape) != len(tgt_shape):
        return None
    axes = [i for i, (a, b) in enumerate(zip(ref_shape, tgt_shape)) if a != b]
    if len(axes) != 1 or math.prod(d for i, d in enumerate(ref_shape) if i != axes[0]) < 2:
        return None
    return axes[0]


def _overlap_row(base: dict, ref: Dump, tgt: Dump, r: TensorInfo, t: TensorInfo, floor: str | None, limits) -> dict:
    """A pair whose shapes differ along one axis, compared on the part both hold: the first or
    the last positions of the larger along that axis, whichever agrees (``overlap`` says which)."""
    axis = slice_axis(tuple(r.shape), tuple(t.shape))
    if axis is None or isinstance(t, MergedTensor):
        return {**base, "status": "shape"}
    a, b = ref.read(r.path, r.dtype), tgt.read(t.path, t.dtype)
    n, larger = min(a.shape[axis], b.shape[axis]), ("target" if b.shape[axis] > a.shape[axis] else "reference")
    total = max(a.shape[axis], b.shape[axis])
    best = None
    for part, index in (("last", slice(total - n, total)), ("first", slice(0, n))):
        take = [slice(None)] * a.ndim
        take[axis] = index
        ra, tb = (a[tuple(take)], b) if larger == "reference" else (a, b[tuple(take)])
        m = array_metrics(ra, tb, floor)
        if best is None or m["rel_l1"] < best[1]["rel_l1"]:
            best = (part, m)
    part, m = best
    if floor:
        m["floor_ratio"], m["floor_dtype"] = _floor_ratio(m), floor
    overlap = f"the {part} {n} of the {larger}'s {total} along axis {axis}"
    return {
        **base,
        **m,
        "numel": m.get("numel", a.size),
        "exact": False,
        "overlap": overlap,
        "status": _status(m, False, limits),
    }


MAX_SPLIT_ORDERS = 24  # orders of a batch split tried (4 parts); beyond, the target's own order


def _merged_in_order(ref: Dump, tgt: Dump, rc: Call, parts: list[Call]) -> MergedCall:
    """The target's batch-split calls joined in the order whose inputs come closest to the
    reference's batch: a port may run the conditional half of classifier-free guidance first."""
    orders = list(itertools.permutations(parts))
    if len(orders) > MAX_SPLIT_ORDERS:
        return MergedCall(parts)
    ref_inputs = {t.name: t for t in rc.info("inputs")}

    def distance(order: tuple[Call, ...]) -> float:
        total = 0.0
        for t in MergedCall(list(order)).info("inputs"):
            r = ref_inputs.get(t.name)
            if r is None or tuple(r.shape) != tuple(t.shape) or _discrete(r.dtype):
                continue
            a, b = ref.read(r.path, r.dtype).astype(np.float64), _read(tgt, t).astype(np.float64)
            total += float(np.abs(a - b).sum() / max(np.abs(a).sum(), 1e-30))
        return total

    return MergedCall(list(min(orders, key=distance)))


def _read(dump: Dump, info: TensorInfo) -> np.ndarray:
    if isinstance(info, MergedTensor):  # a batch split into calls: the parts joined again
        values = [dump.read(p, info.dtype) for p in info.parts]
        return np.concatenate(values) if values[0].ndim else np.stack(values)
    return dump.read(info.path, info.dtype)


def _one_value_for_many(io: str, numel_r: int, numel_t: int) -> bool:
    """An input given as one value on one side and repeated on the other: a timestep as a
    scalar in diffusers and tiled to the batch for an engine (``np.tile(t, batch)``), which
    the model broadcasts anyway. Compared against every element, and said in a warning."""
    return io == "inputs" and numel_r != numel_t and min(numel_r, numel_t) == 1 and max(numel_r, numel_t) <= EXACT_NUMEL


def _status(m: dict, exact: bool, limits: Thresholds) -> str:
    if m["nonfinite_mismatch"]:
        return "nonfinite"
    if exact:
        return "ok" if m["max_abs"] == 0.0 else "mismatch"
    if m["cos"] >= limits.cos_min and m["rel_l1"] <= limits.rel_l1_max:
        return "ok"
    ratio = m.get("floor_ratio")
    if ratio is not None and not math.isnan(ratio) and ratio <= limits.floor_factor:
        return "precision"
    return "mismatch"


SPREAD = "run-to-run spread"  # the floor_dtype of a floor that is the reference's own spread


def _with_spread(m: dict, ref: Dump, r: TensorInfo) -> None:
    """Raise the floor to the reference's own run-to-run spread (``record --repeat``), where it
    is the wider: a kernel that is not bit-deterministic is the honest floor."""
    attrs = ref.tensor_attrs(r.path)
    if "spread_rel_l1" not in attrs:
        return
    spread = {"floor_rel_l1": float(attrs["spread_rel_l1"]), "floor_cos_dist": float(attrs["spread_cos_dist"])}
    if not spread["floor_rel_l1"] and not spread["floor_cos_dist"]:
        return  # bit-identical runs: no floor of their own
    wider = spread["floor_rel_l1"] > m.get("floor_rel_l1", 0.0)
    m["floor_rel_l1"] = max(m.get("floor_rel_l1", 0.0), spread["floor_rel_l1"])
    m["floor_cos_dist"] = max(m.get("floor_cos_dist", 0.0), spread["floor_cos_dist"])
    m["floor_ratio"] = _floor_ratio(m)
    if wider or "floor_dtype" not in m:
        m["floor_dtype"] = SPREAD


def _floor_ratio(m: dict) -> float:
    """The error as a multiple of the noise floor: the larger of the relative-L1 ratio and the
    square root of the cosine-distance ratio (1 − cos grows with the square of the error, so
    its ratio is taken back to the same amplitude scale)."""
    ratios = []
    for err, floor, power in ((m["rel_l1"], m["floor_rel_l1"], 1.0), (m["cos_dist"], m["floor_cos_dist"], 0.5)):
        if floor > 0:
            ratios.append((err / floor) ** power)
        elif err > 0:
            ratios.append(math.inf)
    return max(ratios) if ratios else 0.0


def _controls(shape: tuple, values: np.ndarray) -> bool:
    """Whether a small input selects behaviour rather than carries a signal: a scalar or a
    vector (a timestep, per sample or not), or whole numbers (sizes, crop offsets)."""
    return len(shape) <= 1 or bool(np.all(np.isfinite(values) & (values == np.round(values))))


def _discrete(dtype: str) -> bool:
    return dtype.startswith(("int", "uint", "bool"))


@functools.lru_cache(maxsize=4096)
def shape_text(shape: tuple) -> str:
    """A shape as the table writes it: ``[2,4,64,64]``, ``[]`` for a scalar (a run's tensors
    come in a few shapes, over and over)."""
    return "[" + ",".join(map(str, shape)) + "]"


def parse_shape(text: object) -> tuple[int, ...] | None:
    """The shape a table cell holds (:func:`shape_text`); None for an empty cell."""
    return tuple(int(x) for x in text.strip("[]").split(",") if x) if isinstance(text, str) else None


CONTROL_VALUES_SHOWN = 32  # a control input (SDXL's time_ids: 2 × 6 whole numbers) is told by its values


def _value(value: np.ndarray) -> str:
    text = np.array2string(value, precision=6, separator=", ", threshold=CONTROL_VALUES_SHOWN, max_line_width=10**6)
    return " ".join(text.split())  # one line, whatever the rank
