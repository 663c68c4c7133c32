"""Copy a value out of a running pipeline into an exact numpy array, or say it is no tensor.

Values are taken at call time because pipelines update latents in place. Small host tensors
are copied; large ones are written straight into the dump when a recorder offers to (one pass
over the bytes instead of a copy and a later write, and nothing held in memory). CUDA tensors
are copied asynchronously into pinned buffers recycled across calls (:class:`BufferPool`), so
recording does not make the pipeline wait for the GPU, nor pin fresh memory every step.
"""

from __future__ import annotations

import enum
import json
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from alignkit.storage.records import Tensor
from alignkit.storage.schema import BIT_STORED, STACK_MAX_BYTES


class BufferPool:
    """Recycled pinned host buffers, keyed by shape and dtype, with at most ``limit`` bytes
    kept free."""

    def __init__(self, limit: int = 512 << 20):
        self.limit = limit
        self._free: dict[tuple, list[Any]] = defaultdict(list)
        self._held = 0
        self._lock = threading.Lock()

    def take(self, key: tuple, nbytes: int) -> Any | None:
        with self._lock:
            free = self._free.get(key)
            if not free:
                return None
            self._held -= nbytes
            return free.pop()

    def give(self, key: tuple, buffer: Any, nbytes: int) -> None:
        with self._lock:
            if self._held + nbytes <= self.limit:
                self._free[key].append(buffer)
                self._held += nbytes


POOL = BufferPool()


Stage = Callable[[np.ndarray], "str | None"]
"""Writes a large array into the dump at once and says where (None: it could not)."""

STAGE_MIN_BYTES = STACK_MAX_BYTES  # what the dump keeps as a dataset of its own


def _from_array(name: str, source: np.ndarray, dtype: str, origin: str, device: str, stage: Stage | None) -> Tensor:
    """Take a host array's values now: a large C-ordered one is written straight into the dump
    when a recorder offers ``stage`` (one pass over the bytes, nothing held in memory), any
    other is copied."""
    if stage is not None and source.nbytes >= STAGE_MIN_BYTES and source.flags.c_contiguous:
        path = stage(source)
        if path is not None:
            stand_in = np.broadcast_to(np.zeros((), source.dtype), source.shape)
            return Tensor(name, stand_in, dtype, origin, device, staged=path)
    return Tensor(name, np.array(source, copy=True, order="C"), dtype, origin, device)


def torch_tensor_type():
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def is_tensor(value: Any) -> bool:
    """True for the values alignkit stores as datasets: torch and numpy arrays, numbers."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.dtype.kind not in "OSUVMm" or _is_bit_stored(value.dtype)  # HDF5 holds no objects, strings, dates
    if isinstance(value, float):
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    tensor_type = torch_tensor_type()
    return tensor_type is not None and isinstance(value, tensor_type)


def _is_bit_stored(dtype: np.dtype) -> bool:
    return dtype.name in BIT_STORED


def capture(name: str, value: Any, stage: Stage | None = None) -> Tensor:
    """Copy ``value`` (a tensor per :func:`is_tensor`) into a :class:`Tensor`."""
    tensor_type = torch_tensor_type()
    if tensor_type is not None and isinstance(value, tensor_type):
        return _capture_torch(name, value, stage)
    if isinstance(value, (int, float)):
        array = np.asarray(value, dtype=np.int64 if isinstance(value, int) else np.float64)
        return Tensor(name, array, array.dtype.name, "python")
    source = np.asarray(value)
    if _is_bit_stored(source.dtype):
        bits = np.array(source, copy=True, order="C").view(BIT_STORED[source.dtype.name])
        return Tensor(name, bits, source.dtype.name, "numpy")
    return _from_array(name, source, source.dtype.name, "numpy", "cpu", stage)


def _capture_torch(name: str, value: Any, stage: Stage | None) -> Tensor:
    import torch

    t = value.detach()
    if t.layout != torch.strided:  # sparse COO, CSR, ...: the values the callee sees
        t = t.to_dense()
    t = t.resolve_conj().resolve_neg()
    device = str(t.device)
    dtype = str(t.dtype).removeprefix("torch.")
    if t.device.type == "cuda":
        captured = _capture_cuda(name, t, dtype, device)
        if captured is not None:
            return captured
    if dtype in BIT_STORED:  # HDF5 has no such type: keep the bits (a same-width view copies nothing)
        t = t.view(torch.int16 if dtype == "bfloat16" else torch.uint8)
    if t.device.type != "cpu":  # the move to the host is the copy
        return Tensor(name, _bits(t.to("cpu").numpy(), dtype), dtype, "torch", device)
    return _from_array(name, _bits(t.numpy(), dtype), dtype, "torch", device, stage)


def _bits(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.view(BIT_STORED[dtype]) if dtype in BIT_STORED else array


def _capture_cuda(name: str, t: Any, dtype: str, device: str) -> Tensor | None:
    """Copy into pinned host memory without waiting for the GPU: the copy is queued on the
    tensor's stream, before anything the pipeline does to the tensor next, and the writer
    waits for it. None when pinned memory cannot be had (then the copy is synchronous)."""
    import torch

    key = ("pinned", tuple(t.shape), t.dtype)
    nbytes = t.numel() * t.element_size()
    host = POOL.take(key, nbytes)
    if host is None:
        try:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError:
            return None
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    if dtype in BIT_STORED:
        data = host.view(torch.int16 if dtype == "bfloat16" else torch.uint8).numpy().view(BIT_STORED[dtype])
    else:
        data = host.numpy()
    return Tensor(
        name, data, dtype, "torch", device, ready=event.synchronize, release=lambda: POOL.give(key, host, nbytes)
    )


def describe_value(value: Any) -> str:
    """JSON text for a non-tensor argument, so a config difference shows; never pickled."""
    try:
        return json.dumps(_plain(value), sort_keys=True)
    except (TypeError, ValueError):
        return json.dumps(f"<{type(value).__qualname__}>")


def plain_value(value: Any) -> Any:
    """A JSON-ready account of any value, for a pipeline's call arguments: plain data as it is,
    a tensor as ``"<tensor float16 [1, 4, 64, 64]>"``, a torch generator by its seed, anything
    else by its type (as :func:`describe_value` names it)."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    try:
        return _plain(value)
    except TypeError:
        pass
    if is_tensor(value):  # torch or numpy alike: a port hands numpy where the reference hands torch
        dtype = str(value.dtype).removeprefix("torch.")
        return f"<tensor {dtype} {list(value.shape)}>"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Generator):
        return f"<Generator seed={value.initial_seed()}>"
    return f"<{type(value).__qualname__}>"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "SUMm":
        return value.astype(str).tolist()
    if isinstance(value, enum.Enum):
        return str(value)
    raise TypeError(type(value))
