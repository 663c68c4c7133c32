"""Explain an input mismatch by the glue that made it.

Between submodel calls, pipeline code combines outputs into the next call's inputs:
classifier-free guidance turns the UNet's two batch halves into the scheduler's
``model_output``, ``u + s·(c − u)``; the scheduler's latents go on to the next step unchanged;
a VAE's latents are normalised per channel. When the mismatched input is, in the reference, an
exact linear combination of outputs of its step and the step before (or one of them scaled and
shifted per channel), that is its glue. The target's own outputs, put through the same glue,
then tell whether the target's glue is the same (and the difference is that of the outputs it
combines, amplified) or another one (the weights it uses: another guidance scale, the halves
swapped). An input that is no such combination may still be named: the reference's values in
another order (a layout the glue got wrong), or a control input within the rounding of the
target's lower-precision dtype (the glue computes it in that dtype).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from alignkit.comparison.diagnosis import INPUT_MISMATCH, LOCAL_ERROR, Divergence
from alignkit.comparison.metrics import array_metrics
from alignkit.comparison.table import parse_shape
from alignkit.storage.reader import Dump

MAX_PARTS = 4  # outputs (or batch slices of one) that a combination is sought among
REFERENCE_EXACT = 1e-4  # relative residual below which a float32 reference's fit is its glue
TARGET_EXACT = 1e-2  # the same for a target, whose glue may compute in float16
SAME_WEIGHTS = 1e-2  # relative distance below which two fits are the same weights
MANTISSA_BITS = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}  # explicit fraction bits of each float
ROUNDING_ULPS = 2.0  # rounding of a control input, or of what it was computed from, moves it at most this many units
MAX_READ_ELEMENTS = 1 << 24  # inputs read whole (and sorted) to tell a reordering or a rounding
REORDERED_AGREE = 1e-3  # relative L1 of the sorted values below which they are the same values
REORDERED_APART = 10.0  # ...while in place they differ by this many times more


@dataclass
class _Part:
    label: str
    ref: np.ndarray
    tgt: np.ndarray
    within: bool  # the output compared as ok or within its noise floor


@dataclass
class Glue:
    """How a mismatched input is made of earlier outputs of its step, in each run."""

    tensor: str
    submodel: str
    formula: str  # the reference's combination
    target_formula: str | None  # the target's, where its weights are others
    swapped: bool  # the target's weights are the reference's in the other order
    inputs_rel_l1: float  # the largest difference among the outputs combined
    amplified: float  # the input's difference over theirs
    inputs_within: bool  # every output combined is ok or within its noise floor

    @property
    def same(self) -> bool:
        return self.target_formula is None

    def text(self) -> str:
        if not self.same:
            how = "in the other order (the batch halves are swapped)" if self.swapped else "with other weights"
            return (
                f"`{self.tensor}` is {self.formula} in the reference but {self.target_formula} in the target: "
                f"the glue code that feeds {self.submodel} combines the same outputs {how}"
            )
        return (
            f"`{self.tensor}` is {self.formula} in both runs: the glue is the same, and the difference is that of "
            f"the outputs it combines (rel_l1 up to {self.inputs_rel_l1:.3g}), amplified ×{self.amplified:.3g} by the "
            "combination"
        )


class Explainer:
    """Explains table rows of mismatched inputs by their glue, each row worked out once (its
    input read once), and settles the first divergence where the glue shows it to be
    precision loss."""

    def __init__(self, ref: Dump, tgt: Dump, calls: pd.DataFrame, table: pd.DataFrame):
        self._ref, self._tgt, self._table = ref, tgt, table
        matched = calls.dropna(subset=["ref_seq", "tgt_seq"])
        self._tgt_seqs = dict(zip(matched["ref_seq"].astype(int), matched["tgt_seq"].astype(int)))
        self._seen: dict[object, tuple[Glue | None, str | None]] = {}  # row: its glue, and what to say of it

    def __call__(self, row: pd.Series) -> Glue | None:
        return self._worked_out(row)[0]

    def text(self, row: pd.Series) -> str | None:
        return self._worked_out(row)[1]

    def _worked_out(self, row: pd.Series) -> tuple[Glue | None, str | None]:
        if row.name not in self._seen:
            inputs = functools.cache(lambda: self._inputs(row))
            glue = explain(self._ref, self._tgt, self._tgt_seqs, self._table, row, inputs)
            self._seen[row.name] = glue, glue.text() if glue is not None else _other_cause(row, inputs)
        return self._seen[row.name]

    def _inputs(self, row: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
        """The input in each run, where both runs have it in one shape."""
        tgt_seq = self._tgt_seqs.get(int(row["seq"]))
        if tgt_seq is None:
            return None
        y_ref, y_tgt = (
            _input(self._ref, int(row["seq"]), str(row["tensor"])),
            _input(self._tgt, tgt_seq, str(row["tgt_tensor"])),
        )
        return (y_ref, y_tgt) if y_ref is not None and y_tgt is not None and y_ref.shape == y_tgt.shape else None

    def settle(self, first: Divergence, floor_factor: float) -> bool:
        """Mark the first divergence as precision loss, where it is one; whether it did.

        Past the noise floor of a lower-precision target, an input made by the same glue in
        both runs of outputs within theirs is their loss amplified (classifier-free guidance
        multiplies the UNet's rounding by about its scale). An output of a call fed such an
        input, whose relative error is within that input's plus ``floor_factor`` times its own
        floor, is the same loss carried on: it cannot be told apart from what it was fed."""
        table = self._table
        if first.kind not in (INPUT_MISMATCH, LOCAL_ERROR):
            return False
        index = table.index[
            (table["seq"] == first.seq) & (table["io"] == first.io) & (table["tensor"] == first.tensor)
        ][0]
        row = table.loc[index]
        if not math.isfinite(row["floor_ratio"]):
            return False
        if first.kind == LOCAL_ERROR:
            carriers = table[(table["seq"] == first.seq) & (table["io"] == "inputs") & table["glue"].notna()]
            if carriers.empty or row["rel_l1"] > carriers["rel_l1"].max() + floor_factor * row["floor_rel_l1"]:
                return False
            carrier = carriers.loc[carriers["rel_l1"].idxmax(), "tensor"]
            table.loc[index, ["status", "glue"]] = ["precision", f"carried on from input `{carrier}`"]
            return True
        found = self(row)
        if found is None or not found.same or not found.inputs_within:
            return False
        table.loc[index, ["status", "glue"]] = ["precision", found.formula]
        return True


def explain(
    ref: Dump,
    tgt: Dump,
    tgt_seqs: dict[int, int],
    table: pd.DataFrame,
    row: pd.Series,
    inputs: Callable[[], tuple[np.ndarray, np.ndarray] | None],
) -> Glue | None:
    """How the input ``row`` (a table row) is made, when it is a fixed combination of earlier
    outputs of its step in the reference; None when it is not one. ``tgt_seqs`` maps each
    matched reference call to its target call; ``inputs`` reads the input in both runs."""
    parts = _parts(ref, tgt, tgt_seqs, table, row)
    read = inputs() if parts else None
    if read is None:
        return None
    y_ref, y_tgt = read
    w_ref = _fit([p.ref for p in parts], y_ref, REFERENCE_EXACT)
    if w_ref is None:
        return _explain_by_channels(row, parts, y_ref, y_tgt)
    labels = [p.label for p in parts]
    used = [p for p, wi in zip(parts, w_ref) if _weighs(wi, w_ref)]
    glue = _glue(row, _formula(labels, w_ref), used, y_ref, y_tgt)
    if _made_alike(y_tgt, sum(w * p.tgt.astype(np.float64) for w, p in zip(w_ref, parts)), y_ref):
        return glue
    w_tgt = _fit([p.tgt for p in parts], y_tgt, TARGET_EXACT)
    if w_tgt is None or _same(w_tgt, w_ref):
        return None  # neither the reference's weights nor others make the target's input: nothing to say
    glue.target_formula, glue.swapped = _formula(labels, w_tgt), len(w_ref) == 2 and _same(w_tgt[::-1], w_ref)
    return glue


def _other_cause(row: pd.Series, inputs: Callable[[], tuple[np.ndarray, np.ndarray] | None]) -> str | None:
    """What to say of a mismatched input that no glue makes: its values reordered, or rounded."""
    if row["status"] != "mismatch" or int(row["numel"]) > MAX_READ_ELEMENTS:
        return None
    read = inputs()
    if read is None or not np.issubdtype(read[0].dtype, np.number):
        return None
    return reordered(row, *read) or rounded(row, *read)


def reordered(row: pd.Series, y_ref: np.ndarray, y_tgt: np.ndarray) -> str | None:
    """What to say of a mismatched input that holds the reference's values in another order
    (sorted, the two agree; as laid out, they do not): glue that lays the tensor out otherwise,
    with a reshape or view where a transpose was meant. None for any other input."""
    if y_ref.size < 2:
        return None
    in_order = _rel_l1(np.sort(y_tgt.astype(np.float64), axis=None), np.sort(y_ref.astype(np.float64), axis=None))
    if not in_order <= REORDERED_AGREE or row["rel_l1"] <= REORDERED_APART * in_order:
        return None
    return (
        f"`{row['tensor']}` holds the reference's values in another order (sorted, they agree to rel_l1 "
        f"{in_order:.2g}): the glue "
        f"code that feeds {row['submodel']} lays it out otherwise (a reshape or view where a transpose was meant, "
        "NHWC for NCHW)"
    )


def rounded(row: pd.Series, y_ref: np.ndarray, y_tgt: np.ndarray) -> str | None:
    """What to say of a mismatched control input (a timestep) that the target holds in a
    lower-precision float and that differs from the reference's by no more than that dtype's
    rounding of it or of what it was computed from: the glue computes it in that dtype. None
    for any other input."""
    mantissa = MANTISSA_BITS.get(str(row["tgt_dtype"]))
    if not row["exact"] or mantissa is None or MANTISSA_BITS.get(str(row["ref_dtype"]), 0) <= mantissa:
        return None
    r, t = y_ref.astype(np.float64), y_tgt.astype(np.float64)
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(r), np.finfo(np.float64).tiny))) - mantissa)
    if not np.all(np.abs(t - r) <= ROUNDING_ULPS * ulp):
        return None
    return (
        f"`{row['tensor']}` differs from the reference's by no more than {row['tgt_dtype']} rounding "
        f"({ROUNDING_ULPS:g} units in the "
        f"last place): the glue that feeds {row['submodel']} computes it in {row['tgt_dtype']}, which a control input "
        "does not "
        "survive unchanged (a timestep moves its embedding): keep it in float32"
    )


def _explain_by_channels(row: pd.Series, parts: list[_Part], y_ref: np.ndarray, y_tgt: np.ndarray) -> Glue | None:
    """The input as one output scaled and shifted per channel: a VAE's latents normalised
    with its per-channel mean and deviation (Wan, LTX), or with one scale and shift (Flux)."""
    for part in parts:
        if part.ref.ndim < 2 or part.ref.shape != y_ref.shape:
            continue
        ref_fit = _fit_channels(part.ref, y_ref, REFERENCE_EXACT)
        if ref_fit is None:
            continue
        glue = _glue(row, _channels_formula(part.label, ref_fit), [part], y_ref, y_tgt)
        if _made_alike(y_tgt, _apply_channels(ref_fit, part.tgt), y_ref):
            return glue
        tgt_fit = _fit_channels(part.tgt, y_tgt, TARGET_EXACT)
        if tgt_fit is None or _same(tgt_fit.ravel(), ref_fit.ravel()):
            return None
        glue.target_formula = _channels_formula(part.label, tgt_fit)
        return glue
    return None


def _glue(row: pd.Series, formula: str, used: list[_Part], y_ref: np.ndarray, y_tgt: np.ndarray) -> Glue:
    inputs = max(_rel_l1(p.tgt, p.ref) for p in used)
    difference = _rel_l1(y_tgt, y_ref)
    return Glue(
        str(row["tensor"]),
        str(row["submodel"]),
        formula,
        None,
        False,
        inputs,
        difference / inputs if inputs > 0 else float("inf"),
        all(p.within for p in used),
    )


def _made_alike(y_tgt: np.ndarray, expected: np.ndarray, y_ref: np.ndarray) -> bool:
    """Whether the reference's glue, applied to the target's outputs, makes the target's input
    (closer to it than the reference's input is: the rest is the target's own rounding)."""
    return _rel_l1(y_tgt, expected) <= max(0.5 * _rel_l1(y_tgt, y_ref), REFERENCE_EXACT)


def _parts(ref: Dump, tgt: Dump, tgt_seqs: dict[int, int], table: pd.DataFrame, row: pd.Series) -> list[_Part]:
    """The outputs of earlier calls of the input's step and the step before that have the
    input's shape, whole or as equal slices along the batch (a UNet run on the guidance
    batch), nearest calls first."""
    shape = parse_shape(row["ref_shape"])
    if not shape:
        return []
    earlier = table[
        (table["io"] == "outputs")
        & table["step"].isin([row["step"], row["step"] - 1])
        & (table["seq"] < row["seq"])
        & (table["ref_shape"] == table["tgt_shape"])
        & table["status"].isin(["ok", "precision", "mismatch"])
    ].sort_values("seq", ascending=False, kind="stable")
    parts: list[_Part] = []
    for out in earlier.itertuples(index=False):
        dims = parse_shape(out.ref_shape)
        if not dims or dims[1:] != shape[1:] or dims[0] % shape[0] or dims[0] // shape[0] > MAX_PARTS:  # () is a scalar
            continue
        k = dims[0] // shape[0]
        if len(parts) + k > MAX_PARTS or int(out.seq) not in tgt_seqs:
            break
        r = ref.call_at(int(out.seq)).tensor("outputs", out.tensor)
        t = tgt.call_at(tgt_seqs[int(out.seq)]).tensor("outputs", out.tgt_tensor)
        if t.shape != r.shape:  # a batch the target split into calls: only the reference's is whole
            continue
        step = f" step {out.step}" if out.step != row["step"] else ""
        name = f"{out.submodel}{f' call {out.call}' if out.call else ''}{step} `{out.tensor}`"
        for i in range(k):
            cut = slice(i * shape[0], (i + 1) * shape[0])
            parts.append(_Part(f"{name}[{i}]" if k > 1 else name, r[cut], t[cut], out.status in ("ok", "precision")))
    return parts


def _fit(parts: list[np.ndarray], y: np.ndarray, exact: float) -> np.ndarray | None:
    """The weights that make ``y`` of ``parts``, where some do to within ``exact``."""
    x = np.stack([p.astype(np.float64).ravel() for p in parts], axis=1)
    target = y.astype(np.float64).ravel()
    if not (np.isfinite(x).all() and np.isfinite(target).all()) or np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    w, *_ = np.linalg.lstsq(x, target, rcond=None)
    scale = np.linalg.norm(target)
    return w if scale > 0 and np.linalg.norm(target - x @ w) <= exact * scale else None


def _fit_channels(x: np.ndarray, y: np.ndarray, exact: float) -> np.ndarray | None:
    """Each channel's (scale, shift), axis 1, that make ``y`` of ``x``, where they do to
    within ``exact``."""
    xs = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
    ys = np.moveaxis(y.astype(np.float64), 1, 0).reshape(y.shape[1], -1)
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        return None
    fits, residual = [], 0.0
    for xc, yc in zip(xs, ys):
        a = np.stack([xc, np.ones_like(xc)], axis=1)
        if np.linalg.matrix_rank(a) < 2:
            return None
        c, *_ = np.linalg.lstsq(a, yc, rcond=None)
        residual += float(np.sum((yc - a @ c) ** 2))
        fits.append(c)
    scale = np.linalg.norm(ys)
    return np.array(fits) if scale > 0 and np.sqrt(residual) <= exact * scale else None


def _apply_channels(fits: np.ndarray, x: np.ndarray) -> np.ndarray:
    shape = [1] * x.ndim
    shape[1] = -1
    return x.astype(np.float64) * fits[:, 0].reshape(shape) + fits[:, 1].reshape(shape)


def _channels_formula(label: str, fits: np.ndarray) -> str:
    scales, shifts = fits[:, 0], fits[:, 1]
    if np.ptp(scales) <= 1e-4 * np.abs(scales).max() and np.ptp(shifts) <= 1e-4 * max(np.abs(shifts).max(), 1e-12):
        return f"{scales[0]:.3g}·{label} + {shifts[0]:.3g}".replace("+ -", "- ")
    return (
        f"{label} scaled and shifted per channel (scales {scales.min():.3g} to {scales.max():.3g}, "
        f"shifts {shifts.min():.3g} to {shifts.max():.3g})"
    )


def _formula(labels: list[str], w: np.ndarray) -> str:
    """``-4·a + 5·b``, and what it is where it is classifier-free guidance (two weights
    summing to 1: ``a + s·(b − a)``) or a value passed on unchanged; weights of nothing left out."""
    terms = [(wi, label) for wi, label in zip(w, labels) if _weighs(wi, w)]
    if len(terms) == 1 and abs(terms[0][0] - 1) < 1e-3:
        return f"{terms[0][1]} passed on unchanged"
    text = " + ".join(f"{wi:.3g}·{label}" for wi, label in terms).replace("+ -", "- ")
    weights = np.array([wi for wi, _ in terms])
    if len(terms) == 2 and abs(weights.sum() - 1) < 1e-3 and abs(weights[1] - 1) > 1e-3:
        text += f" (classifier-free guidance at scale {weights[1]:.3g})"
    return text


def _weighs(wi: float, w: np.ndarray) -> bool:
    return abs(wi) > 1e-4 * np.abs(w).max()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.linalg.norm(a - b) <= SAME_WEIGHTS * max(np.linalg.norm(a), 1.0))


def _input(dump: Dump, seq: int, name: str) -> np.ndarray | None:
    try:
        return dump.call_at(seq).tensor("inputs", name)
    except (KeyError, LookupError):
        return None


def _rel_l1(t: np.ndarray, r: np.ndarray) -> float:
    return array_metrics(r, t, None)["rel_l1"]
