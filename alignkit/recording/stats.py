"""``record --mode stats``: per tensor its statistics and a small deterministic sample, not
its values, so that a whole real run, layers included, fits in megabytes.

Kept per tensor: dtype, shape, min, max, mean, std, L2 norm, NaN and Inf counts, a checksum of
its bits, and ``SAMPLE`` elements (in float32) at the same positions in every run (evenly
spaced over the flattened tensor), from which compare estimates L1, relative L1 and cosine. A
tensor of at most ``SAMPLE`` elements is kept whole. Reductions run
where the tensor lives (on the GPU for a CUDA tensor): only the statistics and the sample
cross to the host.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import numpy as np

from alignkit.storage.records import Tensor

SAMPLE = 256
LEGACY_SAMPLE = 512  # what alignkit 0.1 sampled: its positions, every other one taken, are SAMPLE's
_MIX = 1_000_003  # the checksum weighs each element's bits by its position, modulo a prime


@functools.lru_cache(maxsize=1024)
def positions(numel: int) -> np.ndarray:
    """The sampled positions of a flattened tensor of ``numel`` elements: the same in every run
    (kept per size: a run's layers come in a few sizes, over and over)."""
    if numel <= SAMPLE:
        out = np.arange(numel, dtype=np.int64)
    elif numel <= LEGACY_SAMPLE:
        out = np.linspace(0, numel - 1, SAMPLE).round().astype(np.int64)
    else:  # every other of LEGACY_SAMPLE evenly spaced positions: an older dump's sample holds them
        out = np.linspace(0, numel - 1, LEGACY_SAMPLE).round().astype(np.int64)[::2]
    out.flags.writeable = False
    return out


def _sums(values: Any, dot: Any, float64: Any, take_finite: Any) -> tuple[Any, float, float, bool]:
    """(the finite values, their sum, their sum of squares, whether all were finite).
    A sum and a sum of squares that come out finite prove every element finite, so the NaN/Inf
    mask is built only for a tensor that has some, or whose values or squares pass float32's
    range (then summed in float64). numpy and torch sum float32 pairwise, in vector lanes: its
    error grows with the log of the count, and widening each element to float64 first cost
    a third of a statistics recording's time."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is what sends it to the float64 path
        total, squares = float(values.sum()), float(dot(values, values))
    if math.isfinite(total) and math.isfinite(squares):
        return values, total, squares, True
    clean = take_finite(values)
    wide = clean.astype(float64) if isinstance(clean, np.ndarray) else clean.to(float64)
    return clean, float(wide.sum()), float(dot(wide, wide)), bool(clean.shape[0] == values.shape[0])


def as_sample(values: np.ndarray) -> np.ndarray:
    """A stored sample at :func:`positions`' places: an older dump's (LEGACY_SAMPLE elements)
    at every other one."""
    return values[::2] if values.size == LEGACY_SAMPLE else values


def capture_stats(name: str, value: Any) -> Tensor:
    """A tensor's statistics and sample, as a :class:`Tensor` whose ``data`` is the sample; a
    tensor no larger than the sample is taken whole (its statistics would be no smaller)."""
    from alignkit.recording.tensors import capture, torch_tensor_type

    if int(np.prod(getattr(value, "shape", ()))) <= SAMPLE:
        return capture(name, value)
    tensor_type = torch_tensor_type()
    if tensor_type is not None and isinstance(value, tensor_type):
        return _torch_stats(name, value)
    array = np.asarray(value)
    flat = np.ascontiguousarray(array).reshape(-1)
    values = flat.astype(np.float32, copy=False) if flat.dtype.kind in "fiub" else np.zeros(flat.size, np.float32)
    clean, total, squares, whole = _sums(values, np.dot, np.float64, lambda v: v[np.isfinite(v)])
    stats = _figures(
        clean.size,
        lambda: (float(clean.min()), float(clean.max())),
        total,
        squares,
        0 if whole else int(np.isnan(values).sum()),
        0 if whole else int(np.isinf(values).sum()),
        zlib.crc32(flat.view(np.uint8)),
    )
    return Tensor(
        name, values[positions(flat.size)].copy(), array.dtype.name, "numpy", stats=stats, full_shape=array.shape
    )


def _torch_stats(name: str, t: Any) -> Tensor:
    """The same figures for a torch tensor, reduced where it lives: only they and the sample
    cross to the host."""
    import torch

    flat = t.detach().reshape(-1)
    dtype = str(flat.dtype).removeprefix("torch.")
    values = flat.real if flat.is_complex() else flat
    values = values.float() if values.dtype != torch.float32 else values
    clean, total, squares, whole = _sums(values, torch.dot, torch.float64, lambda v: v[torch.isfinite(v)])
    stats = _figures(
        int(clean.numel()),
        lambda: tuple(float(x) for x in torch.aminmax(clean)),
        total,
        squares,
        0 if whole else int(torch.isnan(values).sum()),
        0 if whole else int(torch.isinf(values).sum()),
        _checksum(flat),
    )
    index = _torch_positions(int(values.numel()), str(flat.device))
    sample = values[index].cpu().numpy()
    return Tensor(name, sample, dtype, "torch", device=str(flat.device), stats=stats, full_shape=tuple(t.shape))


@functools.lru_cache(maxsize=1024)
def _torch_positions(numel: int, device: str) -> Any:
    import torch

    return torch.from_numpy(positions(numel).copy()).to(device)


def _figures(n: int, extremes: Any, total: float, squares: float, nan: int, inf: int, checksum: int) -> dict:
    """Min, max, mean, std and L2 norm over the ``n`` finite elements."""
    low, high = extremes() if n else (float("nan"), float("nan"))
    mean = total / n if n else float("nan")
    return {
        "stats_min": low,
        "stats_max": high,
        "stats_mean": mean,
        "stats_std": float(np.sqrt(max(squares / n - mean * mean, 0.0))) if n else float("nan"),
        "stats_l2": float(np.sqrt(squares)),
        "stats_nan": nan,
        "stats_inf": inf,
        "stats_checksum": checksum,
    }


def _checksum(flat: Any) -> int:
    """CRC-32 of a tensor's bytes: on the host for a CPU tensor (as for numpy: equal bits, equal
    checksum on either side), a position-weighted sum of its 32-bit words on its device else."""
    import torch

    if flat.device.type == "cpu":
        return zlib.crc32(flat.contiguous().view(torch.uint8).numpy())
    raw = flat.contiguous().view(torch.uint8)
    raw = torch.nn.functional.pad(raw, (0, (-raw.numel()) % 4)).view(torch.int32).to(torch.int64)
    weights = (torch.arange(raw.numel(), device=raw.device, dtype=torch.int64) % _MIX) + 1
    return int((raw * weights).sum().item() % ((1 << 61) - 1))


class Against:
    """``record --against ref.h5``: each call is compared with the reference's same call (the
    submodel's n-th) while the run goes on; a call that agrees is kept as statistics, one that
    differs (or that the reference lacks) in full, so the dump holds full tensors just where
    the runs part."""

    def __init__(self, reference: Any, cos_min: float = 0.999, rel_l1_max: float = 1e-3):
        self.reference = reference
        self.cos_min, self.rel_l1_max = cos_min, rel_l1_max
        self.full_calls = 0

    def reduce(self, record: Any) -> None:
        """Turn ``record``'s tensors into statistics where the call agrees with the reference."""
        if not self._agrees(record):
            self.full_calls += 1
            return
        for _, tensors, _ in record.sides():
            tensors[:] = [_as_stats(t) for t in tensors]

    def _agrees(self, record: Any) -> bool:
        from alignkit.comparison.metrics import array_metrics
        from alignkit.errors import AlignkitError
        from alignkit.storage.schema import decode

        try:
            call = self.reference[f"{record.submodel}:{record.ordinal}"]
        except AlignkitError:
            return False
        for io, tensors, _ in record.sides():
            theirs = getattr(call, io)
            for t in tensors:
                other = theirs.get(t.name)
                if t.staged is not None or other is None or other.size != t.data.size:
                    return False
                ours = decode(t.data, t.dtype)
                if ours.dtype.kind not in "fc" or other.dtype.kind not in "fc":
                    if not np.array_equal(ours.reshape(-1), other.reshape(-1)):
                        return False
                    continue
                m = array_metrics(other.astype(np.float64), ours.astype(np.float64), None)
                if m["nonfinite_mismatch"] or m["cos"] < self.cos_min or m["rel_l1"] > self.rel_l1_max:
                    return False
        return True


def _as_stats(tensor: Tensor) -> Tensor:
    from alignkit.storage.schema import decode

    if tensor.data.size <= SAMPLE:
        return tensor
    stats = capture_stats(tensor.name, decode(tensor.data, tensor.dtype))
    stats.dtype, stats.source, stats.device = tensor.dtype, tensor.source, tensor.device
    if tensor.release is not None:
        tensor.release()
    return stats
