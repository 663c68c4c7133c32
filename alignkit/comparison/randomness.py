"""Is a local error random? A submodel with a random op in its forward (noise injection,
dropout left in train mode) computes other numbers in every run, even against itself.

Its added error looks like an independent draw of noise: uncorrelated with the output, and
with no structure between neighbouring elements. A port's real error (other weights, another
kernel) is a function of the input: it follows the output's features, and neighbouring elements
of a convolution's or a matmul's output share most of their inputs, so its error is smooth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from alignkit.comparison.diagnosis import Divergence
from alignkit.storage.reader import Dump

MIN_ELEMENTS = 256  # fewer, and the correlations do not settle
MAX_CORRELATION = 0.15  # |corr| below which two series count as uncorrelated (a real error: 0.2–0.9)
# A relative L1 below which the noise may as well be rounding: a text encoder computing in bf16
# behind float32 inputs and outputs differs by about 0.005; dropout by about its rate.
ROUNDING_SIZED = 0.02


def looks_random(ref: np.ndarray, tgt: np.ndarray) -> bool:
    """Whether ``tgt − ref`` looks like independent noise added to ``ref``."""
    if ref.shape != tgt.shape or ref.size < MIN_ELEMENTS or ref.shape[-1] < 2:
        return False
    r, t = ref.astype(np.float64), tgt.astype(np.float64)
    d = t - r
    if not np.isfinite(d).all() or not d.any():
        return False
    with_output = _correlation(d.ravel(), (r + t).ravel())  # zero when both draws are alike in size
    neighbours = _correlation(d[..., 1:].ravel(), d[..., :-1].ravel())
    return abs(with_output) < MAX_CORRELATION and abs(neighbours) < MAX_CORRELATION


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    return float(np.dot(a, b)) / den if den else 0.0


def name_randomness(first: Divergence, ref: Dump, tgt: Dump, calls: pd.DataFrame) -> None:
    """A local error between runs of one precision whose added error looks like independent
    noise is named as nondeterminism inside the submodel, with how to pin it."""
    ev = first.evidence
    if first.kind != "local error" or first.io != "outputs" or ev.get("ref_dtype") != ev.get("tgt_dtype"):
        return
    row = calls[calls["ref_seq"] == first.seq]
    if (
        row.empty
        or pd.isna(row["tgt_seq"].iloc[0])
        or "tgt_parts" in row
        and isinstance(row["tgt_parts"].iloc[0], tuple)
    ):
        return
    tgt_call = tgt.call_at(int(row["tgt_seq"].iloc[0]))
    ref_out, tgt_out = ref.call_at(first.seq).outputs, tgt_call.outputs
    name = first.evidence.get("tgt_tensor", first.tensor)
    if first.tensor not in ref_out or name not in tgt_out or not looks_random(ref_out[first.tensor], tgt_out[name]):
        return
    looks = (
        "; the added error looks like an independent draw of noise (uncorrelated with the output, with no structure "
        "between neighbouring elements): "
    )
    random_op = (
        "a random op in its forward (noise injection, dropout left in train mode) drawing other numbers in each run. "
        "Seed it (torch.manual_seed before the call, a generator passed in) or put it in eval mode, then compare again"
    )
    if float(ev.get("rel_l1", 1.0)) < ROUNDING_SIZED:
        cause = (
            f"{looks}as rounding makes it, where {first.submodel} computes in a lower precision than its "
            f"{ev.get('tgt_dtype')} inputs and outputs show (fp16 or bf16 on the device: say so with "
            f"--target-precision {first.submodel}=bf16 and compare again; `alignkit record --repeat 2` of the "
            f"reference tells nondeterminism apart), or {random_op}"
        )
    else:
        cause = f"{looks}{first.submodel} is nondeterministic, {random_op}"
    first.message = first.message.replace(f"; the port of {first.submodel} itself is off", cause)
