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

from typing import Any

import numpy as np

from alignkit.storage.records import Tensor

SAMPLE = 512
_MIX = 1_000_003  # the checksum weighs each element's bits by its position, modulo a prime


def positions(numel: int) -> np.ndarray:
    """The sampled positions of a flattened tensor of ``numel`` elements: the same in every run."""
    if numel <= SAMPLE:
        return np.arange(numel, dtype=np.int64)
    return np.linspace(0, numel - 1, SAMPLE).round().astype(np.int64)


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
    source = "python" if isinstance(value, (int, float)) else "numpy"
    flat = array.reshape(-1)
    as_float = flat.astype(np.float64) if flat.dtype.kind in "fiub" else np.zeros(flat.size)
    bits = np.ascontiguousarray(flat).view(np.uint8)
    stats = _stats(as_float, _checksum(bits))
    sample = as_float[positions(flat.size)].astype(np.float32)
    return Tensor(name, sample, array.dtype.name, source, stats=stats, full_shape=array.shape)


def _torch_stats(name: str, t: Any) -> Tensor:
    import torch

    flat = t.detach().reshape(-1)
    dtype = str(flat.dtype).removeprefix("torch.")
    values = flat.double() if (flat.is_floating_point() or not flat.is_complex()) else flat.real.double()
    finite = values[torch.isfinite(values)]
    n = int(values.numel())
    stats = {
        "stats_min": float(finite.min()) if finite.numel() else float("nan"),
        "stats_max": float(finite.max()) if finite.numel() else float("nan"),
        "stats_mean": float(finite.mean()) if finite.numel() else float("nan"),
        "stats_std": float(finite.std(unbiased=False)) if finite.numel() else float("nan"),
        "stats_l2": float(torch.linalg.vector_norm(finite)) if finite.numel() else 0.0,
        "stats_nan": int(torch.isnan(values).sum()),
        "stats_inf": int(torch.isinf(values).sum()),
        "stats_checksum": _torch_checksum(flat),
    }
    index = torch.from_numpy(positions(n)).to(flat.device)
    sample = values[index].float().cpu().numpy() if n else np.zeros(0, np.float32)
    device = str(flat.device)
    return Tensor(name, sample, dtype, "torch", device=device if device != "cpu" else "cpu", stats=stats,
                  full_shape=tuple(t.shape))  # fmt: skip


def _stats(values: np.ndarray, checksum: int) -> dict[str, float | int]:
    finite = values[np.isfinite(values)]
    empty = not finite.size
    return {
        "stats_min": float("nan") if empty else float(finite.min()),
        "stats_max": float("nan") if empty else float(finite.max()),
        "stats_mean": float("nan") if empty else float(finite.mean()),
        "stats_std": float("nan") if empty else float(finite.std()),
        "stats_l2": 0.0 if empty else float(np.sqrt(np.dot(finite, finite))),
        "stats_nan": int(np.isnan(values).sum()),
        "stats_inf": int(np.isinf(values).sum()),
        "stats_checksum": checksum,
    }


def _checksum(bits: np.ndarray) -> int:
    """A position-weighted sum of the bytes, modulo 2⁶¹ − 1: equal bits, equal checksum."""
    weights = (np.arange(bits.size, dtype=np.int64) % _MIX) + 1
    return int(np.dot(bits.astype(np.int64), weights) % ((1 << 61) - 1))


def _torch_checksum(flat: Any) -> int:
    """The same checksum, computed on the tensor's device from its bytes."""
    import torch

    raw = flat.contiguous().view(torch.uint8).to(torch.int64)
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
