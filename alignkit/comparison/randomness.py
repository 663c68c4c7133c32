"""Is a local error random? A submodel with a random op in its forward (noise injection,
dropout left in train mode) computes other numbers in every run, even against itself.

Its added error looks like an independent draw of noise: uncorrelated with the output, and
with no structure between neighbouring elements. A port's real error (other weights, another
kernel) is a function of the input: it follows the output's features, and neighbouring elements
of a convolution's or a matmul's output share most of their inputs, so its error is smooth.
"""

from __future__ import annotations

import numpy as np

MIN_ELEMENTS = 256  # fewer, and the correlations do not settle
MAX_CORRELATION = 0.15  # |corr| below which two series count as uncorrelated (a real error: 0.2–0.9)


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
