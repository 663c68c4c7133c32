"""What recording hands to storage: one captured tensor, and everything recorded about one
submodel call. Recording fills them in; the writer stores them (docs/format.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Tensor:
    """One captured tensor: the stored bits, its logical dtype, and where it came from."""

    name: str
    data: np.ndarray
    dtype: str
    source: str  # "torch", "numpy" or "python"
    device: str = "cpu"
    ready: Callable[[], None] | None = None  # wait for an asynchronous device copy to land
    release: Callable[[], None] | None = None  # give a recycled buffer back once written
    staged: str | None = None  # already in the dump at this path; ``data`` is then a stand-in
    spread: dict[str, float] | None = None  # its run-to-run spread (record --repeat), kept as attributes
    stats: dict[str, float] | None = None  # record --mode stats: its statistics, ``data`` then its sample
    full_shape: tuple | None = None  # the tensor's shape where ``data`` is a sample of it

    @property
    def nbytes(self) -> int:
        """Bytes held in memory until written (none for a staged tensor)."""
        return 0 if self.staged is not None else int(self.data.nbytes)


class Layers(list):
    """A call's layer outputs, and the names taken so far: a layer that runs twice in one call
    is named ``path#2`` the second time, and with hundreds of layers a call, listing the names
    at each would cost more than the rest of the hook."""

    def __init__(self, tensors: list[Tensor] | None = None):
        super().__init__(tensors or [])
        self.names = {t.name for t in self}

    def append(self, tensor: Tensor) -> None:
        super().append(tensor)
        self.names.add(tensor.name)


@dataclass(eq=False)  # identity: records hold arrays
class CallRecord:
    """Everything recorded about one submodel call."""

    seq: int
    submodel: str
    step: int
    call: int
    ordinal: int
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    layers: list[Tensor] = field(default_factory=Layers)
    values: dict[str, str] = field(default_factory=dict)
    output_values: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def sides(self) -> list[tuple[str, list[Tensor], dict[str, str]]]:
        """(io, tensors, non-tensor values) of each stored side; ``layers`` only when there
        are layers (docs/format.md)."""
        sides = [("inputs", self.inputs, self.values), ("outputs", self.outputs, self.output_values)]
        return sides + [("layers", self.layers, {})] if self.layers else sides

    def tensors(self) -> list[Tensor]:
        return [*self.inputs, *self.outputs, *self.layers]
