"""Metrics between a reference tensor r and a target tensor t, streamed block by block.

Memory stays bounded by the block size. Tensors that float32 holds exactly (float32, float16,
bfloat16, small integers) are computed in float32 blocks, each block's sums added up in
float64: what a careful script does, at the speed of the disk. The norm gap that the cosine
distance needs is taken as Σ(t − r)(t + r), so it keeps its digits when the two tensors are
nearly equal. A block with a NaN, an Inf or a float32 overflow, and every other dtype, is
widened to float64. Definitions (docs/comparing.md), over the elements that are finite on
both sides:

- ``l1``      mean |t − r|                 - ``rel_l1``  Σ|t − r| / Σ|r|
- ``max_abs`` max |t − r|                  - ``rmse``    sqrt(mean (t − r)²)
- ``cos``     ⟨r,t⟩ / (‖r‖‖t‖); both all-zero → 1, one all-zero → 0
- ``cos_dist`` 1 − cos, computed as (‖r − t‖² − (‖r‖ − ‖t‖)²) / (2‖r‖‖t‖) so that it does
  not cancel for nearly identical tensors (and as 1 − cos where that form would cancel)
- ``sqnr_db`` 10·log10(Σr² / Σ(t − r)²)

The noise floor (``floor_*``) is the same error between r and r rounded to the target's dtype:
what a target that stores the tensor in fp16 or bf16 cannot do better than.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from alignkit.storage.schema import decode, logical_dtype, round_to_bf16

BLOCK_ELEMENTS = 1 << 18  # 2 MiB of float64 per side
SMALL = 1 << 12  # a tensor of at most this many elements is computed in float64 without work buffers

_EXACT_IN_FLOAT32 = {np.dtype(d) for d in ("float32", "float16", "int8", "uint8", "int16", "uint16", "bool")}

_LOW_PRECISION = {"float16": 11, "bfloat16": 8, "float8_e4m3fn": 4, "float8_e5m2": 3}
_FLOAT_BITS = {"float64": 53, "float32": 24, **_LOW_PRECISION}
_QUANTIZED = {"int8": 7}  # a quantized engine's floor: its values on 2⁸ levels, about 7 bits of a float's mantissa
_FLOOR_BITS = {**_LOW_PRECISION, **_QUANTIZED}
FLOOR_OF_PRECISION = {"fp16": "float16", "bf16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn"}  # an engine's


@dataclass
class Sums:
    """Running sums for one tensor pair; ``add`` a block, ``metrics`` at the end."""

    n: int = 0  # elements finite on both sides, which the metrics are taken over
    total: int = 0
    abs_diff: float = 0.0
    abs_ref: float = 0.0
    max_abs: float = 0.0
    ref_sq: float = 0.0
    tgt_sq: float = 0.0
    diff_sq: float = 0.0
    dot: float = 0.0
    norm_gap: float = 0.0  # Σt² − Σr², summed as Σ(t − r)(t + r)
    nan_ref: int = 0
    nan_tgt: int = 0
    inf_ref: int = 0
    inf_tgt: int = 0
    nonfinite_mismatch: int = 0
    floor_abs: float = 0.0
    floor_sq: float = 0.0
    floor_tgt_sq: float = 0.0
    floor_gap: float = 0.0

    def add(self, r: np.ndarray, t: np.ndarray, floor_dtype: str | None = None) -> None:
        if np.iscomplexobj(r) or np.iscomplexobj(t):
            r, t = as_reals(r), as_reals(t)
        if np.size(r) <= SMALL and self._add_small(np.asarray(r), np.asarray(t), floor_dtype):
            return
        if r.dtype in _EXACT_IN_FLOAT32 and t.dtype in _EXACT_IN_FLOAT32 and self._add_float32(r, t, floor_dtype):
            return
        scratch = _scratch(np.size(r))
        r64, t64, d, work = (buf[: np.size(r)] for buf in scratch)
        np.copyto(r64, np.ravel(r), casting="unsafe")  # widen into reused buffers: fresh pages
        np.copyto(t64, np.ravel(t), casting="unsafe")  # cost more than the arithmetic
        self.total += r64.size
        if not (np.isfinite(r64).all() and np.isfinite(t64).all()):
            r64, t64 = self._nonfinite(r64, t64)
            d, work = d[: r64.size], work[: r64.size]
        np.subtract(t64, r64, out=d)
        np.abs(d, out=work)
        self.n += r64.size
        self.abs_diff += float(work.sum())
        if work.size:
            self.max_abs = max(self.max_abs, float(work.max()))
        np.abs(r64, out=work)
        self.abs_ref += float(work.sum())
        ref_sq, tgt_sq = float(np.dot(r64, r64)), float(np.dot(t64, t64))
        self.ref_sq += ref_sq
        self.tgt_sq += tgt_sq
        self.norm_gap += tgt_sq - ref_sq
        self.diff_sq += float(np.dot(d, d))
        self.dot += float(np.dot(r64, t64))
        if floor_dtype is not None:
            self._add_floor(r64, floor_dtype)

    def _add_small(self, r: np.ndarray, t: np.ndarray, floor_dtype: str | None) -> bool:
        """Add a small tensor in float64, in as few numpy calls as it takes: for a layer-by-layer
        dump of 100k small tensors, each call's overhead is the cost. The reference, the target
        and their difference are rows of one matrix, so that one product gives the sums of
        products of the two sides and one pass every absolute sum. False (nothing added) when
        it holds a NaN or an Inf."""
        m = np.empty((3, r.size))
        m[0], m[1] = r.reshape(-1), t.reshape(-1)
        sides = m[:2]
        (ref_sq, dot), (_, tgt_sq) = (sides @ sides.T).tolist()
        if not math.isfinite(ref_sq + tgt_sq):  # a NaN or an Inf, found before it is subtracted
            return False
        np.subtract(m[1], m[0], out=m[2])
        diff_sq = float(m[2] @ m[2])
        absolute = np.abs(m[::2])  # the reference's and the difference's
        abs_ref, abs_diff = absolute.sum(axis=1).tolist()
        self.total += m.shape[1]
        self.n += m.shape[1]
        self.abs_diff += abs_diff
        if m.shape[1]:
            self.max_abs = max(self.max_abs, float(absolute[1].max()))
        self.abs_ref += abs_ref
        self.ref_sq += ref_sq
        self.tgt_sq += tgt_sq
        self.norm_gap += tgt_sq - ref_sq
        self.diff_sq += diff_sq
        self.dot += dot
        if floor_dtype is not None:
            self._add_floor(m[0], floor_dtype)
        return True

    def _add_float32(self, r: np.ndarray, t: np.ndarray, floor_dtype: str | None) -> bool:
        """Add a block computed in float32 with float64 sums; False (nothing added) when the block
        holds a NaN or an Inf, or overflows float32, and must be widened instead."""
        n = np.size(r)
        r32, t32, d, work = (buf[:n] for buf in _scratch(n, np.float32))
        r32, t32 = _as_float32(r, r32), _as_float32(t, t32)
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(t32, r32, out=d)
            diff_sq, ref_sq, tgt_sq = float(np.dot(d, d)), float(np.dot(r32, r32)), float(np.dot(t32, t32))
        if not (math.isfinite(diff_sq) and math.isfinite(ref_sq) and math.isfinite(tgt_sq)):
            return False  # a NaN, an Inf or an overflow is in this block: every sum above is non-finite
        self.total += n
        self.n += n
        self.diff_sq += diff_sq
        self.ref_sq += ref_sq
        self.tgt_sq += tgt_sq
        self.dot += (ref_sq + tgt_sq - diff_sq) / 2  # the difference form serves cos near 1, where this cancels
        self.norm_gap += float(np.dot(d, r32)) + float(np.dot(d, t32))
        np.abs(d, out=work)
        self.abs_diff += float(work.sum())
        if n:
            self.max_abs = max(self.max_abs, float(work.max()))
        np.abs(r32, out=work)
        self.abs_ref += float(work.sum())
        if floor_dtype is not None:
            self._add_floor(r32, floor_dtype)
        return True

    def _add_floor(self, r: np.ndarray, floor_dtype: str) -> None:
        """The sums of ``r`` against itself rounded to ``floor_dtype``. A value beyond the dtype's
        range is kept as it is (no rounding error): overflowing it is a divergence of its own,
        not the precision's noise."""
        with np.errstate(over="ignore", invalid="ignore"):
            q = round_to(r, floor_dtype)
            q = np.where(np.isfinite(q), q, r)
            dq = q - r
            self.floor_abs += float(np.abs(dq).sum())
            self.floor_sq += float(np.dot(dq, dq))
            self.floor_tgt_sq += float(np.dot(q, q))
            self.floor_gap += float(np.dot(dq, q + r))

    def _nonfinite(self, r: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count NaN/Inf on each side and where they disagree; keep the jointly finite elements."""
        self.nan_ref += int(np.isnan(r).sum())
        self.nan_tgt += int(np.isnan(t).sum())
        self.inf_ref += int(np.isinf(r).sum())
        self.inf_tgt += int(np.isinf(t).sum())
        both = np.isfinite(r) & np.isfinite(t)
        same = (r == t) | (np.isnan(r) & np.isnan(t))
        self.nonfinite_mismatch += int((~both & ~same).sum())
        return r[both], t[both]

    def metrics(self) -> dict[str, float]:
        n = self.n
        cos_dist = _cos_distance(self.ref_sq, self.tgt_sq, self.diff_sq, self.dot, self.norm_gap)
        counts = {
            "nan_ref": self.nan_ref,
            "nan_tgt": self.nan_tgt,
            "inf_ref": self.inf_ref,
            "inf_tgt": self.inf_tgt,
            "nonfinite_mismatch": self.nonfinite_mismatch,
        }
        if n == 0 and self.total:  # no element finite on both sides: nothing to measure, not a perfect match
            nan = math.nan
            return {
                "l1": nan,
                "rel_l1": nan,
                "max_abs": nan,
                "cos": nan,
                "cos_dist": nan,
                "rmse": nan,
                "sqnr_db": nan,
                **counts,
            }
        out = {
            "l1": self.abs_diff / n if n else 0.0,
            "rel_l1": _ratio(self.abs_diff, self.abs_ref),
            "max_abs": self.max_abs,
            "cos": 1.0 - cos_dist,
            "cos_dist": cos_dist,
            "rmse": math.sqrt(self.diff_sq / n) if n else 0.0,
            "sqnr_db": _sqnr(self.ref_sq, self.diff_sq),
            "nan_ref": self.nan_ref,
            "nan_tgt": self.nan_tgt,
            "inf_ref": self.inf_ref,
            "inf_tgt": self.inf_tgt,
            "nonfinite_mismatch": self.nonfinite_mismatch,
        }
        return out

    def floor(self) -> dict[str, float]:
        """The noise floor: the same metrics for r against r rounded to the target dtype."""
        if self.n == 0 and self.total:
            return {"floor_rel_l1": math.nan, "floor_cos_dist": math.nan}
        return {
            "floor_rel_l1": _ratio(self.floor_abs, self.abs_ref),
            "floor_cos_dist": _cos_distance(self.ref_sq, self.floor_tgt_sq, self.floor_sq, None, self.floor_gap),
        }


_SCRATCH = threading.local()


def _scratch(n: int, dtype: type = np.float64) -> list[np.ndarray]:
    """Four work buffers of ``dtype`` and at least ``n`` elements, reused per thread."""
    key = f"bufs_{np.dtype(dtype).name}"
    bufs = getattr(_SCRATCH, key, None)
    if bufs is None or bufs[0].size < n:
        bufs = [np.empty(max(n, BLOCK_ELEMENTS), dtype) for _ in range(4)]
        setattr(_SCRATCH, key, bufs)
    return bufs


def _as_float32(x: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """``x`` flat as float32: itself when it already is (no copy), else copied into ``buffer``."""
    flat = np.ravel(x)
    if flat.dtype == np.float32:
        return flat
    np.copyto(buffer, flat, casting="unsafe")
    return buffer


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * (math.log10(signal) - math.log10(noise))  # no underflow of the ratio


def _cos_distance(ref_sq: float, tgt_sq: float, diff_sq: float, dot: float | None, norm_gap: float | None) -> float:
    """1 − cos without cancellation; both all-zero → 0, one all-zero → 1.

    The difference form subtracts ``(‖r‖ − ‖t‖)²`` from ``‖r − t‖²``: near cos = 1, with norms
    alike, both are small and it keeps its digits where ``1 − dot/(‖r‖‖t‖)`` has none. Where
    what it subtracts outweighs ``2‖r‖‖t‖`` (far from cos = 1, or one tensor's norm far from
    the other's: 383 against 1e-7), its rounding is the larger, and the dot-product form is
    used.
    """
    if ref_sq == 0.0 and tgt_sq == 0.0:
        return 0.0
    if ref_sq == 0.0 or tgt_sq == 0.0:
        return 1.0
    nr, nt = math.sqrt(ref_sq), math.sqrt(tgt_sq)
    norm_gap_sq = ((tgt_sq - ref_sq if norm_gap is None else norm_gap) / (nr + nt)) ** 2  # (‖t‖ − ‖r‖)²
    if dot is not None and diff_sq + norm_gap_sq > 2.0 * nr * nt:
        return min(max(1.0 - dot / (nr * nt), 0.0), 2.0)
    value = (diff_sq - norm_gap_sq) / (2.0 * nr * nt)
    return min(max(value, 0.0), 2.0)


def _chunks(flat: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, max(flat.size, 1), BLOCK_ELEMENTS):
        yield flat[i : i + BLOCK_ELEMENTS]


def as_reals(x: np.ndarray) -> np.ndarray:
    """A tensor's values as reals: a complex one as (real, imaginary) pairs, so that metrics
    and statistics see both parts instead of dropping the imaginary one."""
    x = np.asarray(x)
    if not np.iscomplexobj(x):
        x = x.astype(np.complex128)  # the other side is complex: an imaginary part of 0
    return np.ascontiguousarray(x).view(x.real.dtype)


def floor_dtype_for(ref_dtype: str, tgt_dtype: str, carried: str | None = None) -> str | None:
    """The dtype whose rounding is the noise floor of a tensor pair: the target's, when it is
    a lower-precision float than the reference's; else ``carried``, the lower precision the
    target run has already computed in, for float tensors more precise than it (a VAE
    upcast to float32 decodes latents that carry float16's rounding). None when neither."""
    if tgt_dtype in _LOW_PRECISION and _FLOAT_BITS.get(ref_dtype, 0) > _LOW_PRECISION[tgt_dtype]:
        return tgt_dtype
    if carried is not None and min(_FLOAT_BITS.get(ref_dtype, 0), _FLOAT_BITS.get(tgt_dtype, 0)) > _FLOOR_BITS[carried]:
        return carried
    return None


def lower_precision(dtypes: Iterable[str]) -> set[str]:
    """The lower-precision float dtypes among ``dtypes``."""
    return {d for d in dtypes if d in _LOW_PRECISION}


def least_precise(dtypes: Iterable[str]) -> str:
    return min(dtypes, key=lambda d: _FLOAT_BITS.get(d, _FLOOR_BITS.get(d, 0)))


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float values to ``dtype`` and back to their own dtype, as a target storing them would."""
    if dtype == "bfloat16":
        return round_to_bf16(x).astype(x.dtype, copy=False)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(x.dtype)
    if dtype == "int8":  # symmetric per-block quantization, an estimate of what a quantized graph adds
        scale = float(np.max(np.abs(x), initial=0.0)) / 127
        return np.round(x / scale) * scale if scale > 0 else x
    try:
        import ml_dtypes

        return x.astype(getattr(ml_dtypes, dtype)).astype(x.dtype)
    except (ImportError, AttributeError):
        return x


def iter_blocks(ds, max_elements: int = BLOCK_ELEMENTS) -> Iterator[np.ndarray]:
    """Read an h5py dataset in C-order blocks of at most ``max_elements`` (or one row)."""
    dtype = logical_dtype(ds)
    shape = tuple(ds.shape)
    if not shape or ds.size <= max_elements:  # one read, without a selection to build
        yield decode(np.asarray(ds[()]), dtype)
        return
    yield from (decode(block, dtype) for block in _blocks(ds, (), shape, max_elements))


def _blocks(ds, prefix: tuple, shape: tuple, max_elements: int) -> Iterator[np.ndarray]:
    """Blocks read into one reused buffer: each is valid until the next is read."""
    row = int(np.prod(shape[1:], dtype=np.int64))
    if row <= max_elements or len(shape) == 1:
        rows = max(1, min(shape[0], max_elements // max(row, 1)))
        buffer = np.empty((rows, *shape[1:]), dtype=ds.dtype)
        for i in range(0, shape[0], rows):
            n = min(rows, shape[0] - i)
            if buffer.size:
                ds.read_direct(buffer, np.s_[prefix + (slice(i, i + n),)], np.s_[0:n])
            yield buffer[:n]
        return
    for i in range(shape[0]):
        yield from _blocks(ds, prefix + (i,), shape[1:], max_elements)


def dataset_metrics(ref_ds, tgt_ds, floor_dtype: str | None) -> dict[str, float]:
    """Metrics of two stored tensors of equal element count, streamed in blocks. ``tgt_ds``
    may be a list of datasets read one after another (a batch split into calls, joined along
    its first axis); tensors of the same size and another shape (``[1, N]`` against ``[N]``)
    are streamed as flat C-order blocks, so memory stays near one block either way."""
    s = Sums()
    parts = list(tgt_ds) if isinstance(tgt_ds, (list, tuple)) else [tgt_ds]
    if len(parts) == 1 and tuple(ref_ds.shape) == tuple(parts[0].shape):
        pairs: Iterable[tuple[np.ndarray, np.ndarray]] = zip(iter_blocks(ref_ds), iter_blocks(parts[0]))
    else:
        pairs = aligned_blocks(iter_blocks(ref_ds), itertools.chain.from_iterable(iter_blocks(p) for p in parts))
    for rb, tb in pairs:
        s.add(rb, tb, floor_dtype)
    return {**s.metrics(), **(s.floor() if floor_dtype else {})}


def aligned_blocks(
    ref_blocks: Iterable[np.ndarray], tgt_blocks: Iterable[np.ndarray]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Two streams of C-order blocks of equal total size, cut into pairs of equal length.
    Each block is used up before the next is read from its stream (blocks share a buffer)."""
    ref_it, tgt_it = (np.ravel(b) for b in ref_blocks), (np.ravel(b) for b in tgt_blocks)
    a, b = next(ref_it, None), next(tgt_it, None)
    i = j = 0
    while a is not None and b is not None:
        n = min(a.size - i, b.size - j)
        yield a[i : i + n], b[j : j + n]
        i, j = i + n, j + n
        if i == a.size:
            a, i = next(ref_it, None), 0
        if j == b.size:
            b, j = next(tgt_it, None), 0


def array_metrics(ref: np.ndarray, tgt: np.ndarray, floor_dtype: str | None = None) -> dict[str, float]:
    """Metrics of two tensors of equal element count already in memory (compared flattened), in
    the same blocks as a stored tensor is streamed in, so that either way gives the same figures.
    (A NaN or an Inf is counted, not warned of: numpy's warnings are left to the caller, who
    may compare many pairs under one ``np.errstate``.)"""
    s = Sums()
    r, t = np.asarray(ref).reshape(-1), np.asarray(tgt).reshape(-1)
    if r.size > SMALL or r.dtype.kind == "c" or t.dtype.kind == "c" or not s._add_small(r, t, floor_dtype):
        for rb, tb in zip(_chunks(r), _chunks(t)):
            s.add(rb, tb, floor_dtype)
    return {**s.metrics(), **(s.floor() if floor_dtype else {})}
