"""Copy a value out of a running pipeline into an exact numpy array, or say it is no tensor.

Copies happen at call time because pipelines update latents in place.
"""

from __future__ import annotations

import enum
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignkit.store.schema import BIT_STORED


@dataclass
class Tensor:
    """One captured tensor: the stored bits, its logical dtype, and where it came from."""

    name: str
    data: np.ndarray
    dtype: str
    source: str  # "torch", "numpy" or "python"
    device: str = "cpu"

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def _torch_tensor_type():
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def is_tensor(value: Any) -> bool:
    """True for the values alignkit stores as datasets: torch and numpy arrays, numbers."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.dtype.kind not in "OSUV" or _is_bit_stored(value.dtype)
    if isinstance(value, float):
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    tensor_type = _torch_tensor_type()
    return tensor_type is not None and isinstance(value, tensor_type)


def _is_bit_stored(dtype: np.dtype) -> bool:
    return dtype.name in BIT_STORED


def capture(name: str, value: Any) -> Tensor:
    """Copy ``value`` (a tensor per :func:`is_tensor`) into a :class:`Tensor`."""
    tensor_type = _torch_tensor_type()
    if tensor_type is not None and isinstance(value, tensor_type):
        return _capture_torch(name, value)
    if isinstance(value, (int, float)):
        array = np.asarray(value, dtype=np.int64 if isinstance(value, int) else np.float64)
        return Tensor(name, array, array.dtype.name, "python")
    array = np.array(value, copy=True, order="C")
    if _is_bit_stored(array.dtype):
        return Tensor(name, array.view(BIT_STORED[array.dtype.name]), array.dtype.name, "numpy")
    return Tensor(name, array, array.dtype.name, "numpy")


def _capture_torch(name: str, value: Any) -> Tensor:
    import torch

    t = value.detach()
    if t.is_sparse:
        t = t.to_dense()
    t = t.resolve_conj().resolve_neg()
    device = str(t.device)
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype in BIT_STORED:
        view = torch.int16 if dtype == "bfloat16" else torch.uint8
        bits = t.contiguous().view(view).to("cpu", copy=True).numpy().view(BIT_STORED[dtype])
        return Tensor(name, bits, dtype, "torch", device)
    if t.device.type != "cpu":
        data = t.to("cpu").numpy()
    else:
        data = np.array(t.numpy(), copy=True, order="C")
    return Tensor(name, data, dtype, "torch", device)


def describe_value(value: Any) -> str:
    """JSON text for a non-tensor argument, so a config difference shows; never pickled."""
    try:
        return json.dumps(_plain(value), sort_keys=True)
    except (TypeError, ValueError):
        return json.dumps(f"<{type(value).__qualname__}>")


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.dtype.kind in "SU":
        return value.astype(str).tolist()
    if isinstance(value, enum.Enum):
        return str(value)
    raise TypeError(type(value))
