"""``record --repeat N``: the reference's own run-to-run spread, kept per tensor.

GPU kernels are often not bit-deterministic, and a model may draw random numbers: the same
reference, run twice, differs. The earlier runs are recorded into scratch dumps; while the last
run is recorded, each of its tensors is measured against the same tensor of every earlier run
(the same submodel's n-th call, the same name), and the widest spread is kept with the tensor
(``spread_rel_l1``, ``spread_cos_dist``: docs/format.md). compare takes it as the reference's
own noise floor.
"""

from __future__ import annotations

from typing import Any

from alignkit.errors import AlignkitError
from alignkit.storage.reader import Dump
from alignkit.storage.records import CallRecord


class Spread:
    """Measures a call's tensors against the earlier runs' (read from their dumps)."""

    def __init__(self, earlier: list[Dump]):
        self.earlier = earlier
        self.measured = 0
        self.unmatched = 0  # tensors no earlier run has: the runs took other paths

    def measure(self, record: CallRecord) -> None:
        from alignkit.comparison.metrics import array_metrics

        for io, tensors, _ in record.sides():
            earlier = [_side(dump, record, io) for dump in self.earlier]
            for tensor in tensors:
                if tensor.staged is not None:  # written straight into the dump: its values are not at hand
                    continue
                widest: dict[str, float] | None = None
                for side in earlier:
                    other = side.get(tensor.name)
                    if other is None or other.shape != tensor.data.shape:
                        continue
                    m = array_metrics(other.astype("float64"), _values(tensor), None)
                    if widest is None or m["rel_l1"] > widest["rel_l1"]:
                        widest = m
                if widest is None:
                    self.unmatched += 1
                    continue
                tensor.spread = {"spread_rel_l1": widest["rel_l1"], "spread_cos_dist": widest["cos_dist"]}
                self.measured += 1


def _side(dump: Dump, record: CallRecord, io: str) -> dict[str, Any]:
    """The tensors of one side of the same call in an earlier run (none where it made no such call)."""
    try:
        return getattr(dump[f"{record.submodel}:{record.ordinal}"], io)  # its n-th call, whatever the steps
    except AlignkitError:
        return {}


def _values(tensor: Any) -> Any:
    from alignkit.storage.schema import decode

    return decode(tensor.data, tensor.dtype).astype("float64")
