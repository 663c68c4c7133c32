"""The ways an ONNX Runtime session runs, each recorded with inputs by feed name and outputs by
output name: ``run``, ``run_with_iobinding`` (optimum's way on a GPU) and ``run_with_ort_values``.

ONNX Runtime cannot say what a binding's inputs are once they are bound, so while a recording
is on, :class:`IOBinding`'s bind methods are patched to remember what each binding was given:
an array (``bind_cpu_input``), an ``OrtValue`` (``bind_ortvalue_input``), or a pointer with its
element type and shape (``bind_input``). The values are read when the session runs, as
``run``'s feed is. Device memory behind a bare pointer cannot be read without the device's
runtime: such an input is stored as a value naming it (``"<cuda pointer>"``).
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignkit.recording.hooks import Binder, Hook, OutputNamer
from alignkit.recording.targets import reference

_ONNX_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
}  # TensorProto's element types numpy holds

Named = list[tuple[str, Any]]
RUN_METHODS = ("run", "run_with_iobinding", "run_with_ort_values")
PREBOUND = "through run_with_iobinding with inputs bound before the recording began: only their outputs are in the dump"


def session_runs(session: Any, prebound: Callable[[], None]) -> dict[str, tuple[Binder, OutputNamer]]:
    """How to record each way ``session`` runs: by method, what names its inputs and what
    names its outputs. ``prebound`` is told of each binding run whose inputs are unknown."""

    def binding_feed(args: tuple, kwargs: dict) -> Named:
        if bound_before(args, kwargs):
            prebound()
        return binding_inputs(args, kwargs)

    outputs = ort_outputs_for(session)
    runs = {
        "run": (ort_bind, outputs),
        "run_with_iobinding": (binding_feed, binding_outputs),
        "run_with_ort_values": (_feed("input_dict_ort_values"), outputs),
    }
    return {method: runs[method] for method in RUN_METHODS if callable(getattr(session, method, None))}


@dataclass(frozen=True)
class _Pointer:
    """An input bound as a raw buffer (``bind_input``)."""

    device: str
    element_type: Any
    shape: tuple[int, ...]
    address: int

    def read(self) -> Any:
        dtype = _numpy_dtype(self.element_type)
        if self.device.lower() != "cpu" or dtype is None:
            return (
                f"<{self.device} pointer>"
                if dtype is not None
                else f"<{self.device} pointer to element type {self.element_type}>"
            )
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        buffer = (ctypes.c_char * nbytes).from_address(self.address) if nbytes else b""
        return np.frombuffer(buffer, dtype).reshape(self.shape)  # a view: the call's capture copies it


def _numpy_dtype(element_type: Any) -> np.dtype | None:
    if isinstance(element_type, int) and not isinstance(element_type, bool):
        name = _ONNX_TYPES.get(element_type)
        return np.dtype(name) if name is not None else None
    try:
        return np.dtype(element_type)
    except TypeError:
        return None


def binding_inputs(args: tuple, kwargs: dict) -> Named:
    """``run_with_iobinding(iobinding, run_options)``: the binding's inputs, read now (none
    known for a binding given them before the recording began)."""
    state = _bound(kwargs.get("iobinding", args[0] if args else None))
    return [(name, _read(source)) for name, source in state["inputs"].items()] if state else []


def binding_outputs(result: Any, args: tuple, kwargs: dict) -> Named:
    """The binding's outputs after the run, named as they were bound."""
    binding = kwargs.get("iobinding", args[0] if args else None)
    names = (_bound(binding) or {}).get("outputs", [])
    values = [value.numpy() for value in binding.get_outputs()]
    return [(names[i] if i < len(names) else f"output.{i}", value) for i, value in enumerate(values)]


def bound_before(args: tuple, kwargs: dict) -> bool:
    """Whether the binding of this run was given its inputs before the recording began (they
    are then unknown)."""
    return _bound(kwargs.get("iobinding", args[0] if args else None)) is None


def _feed(keyword: str) -> Binder:
    """Inputs named by the feed dict, the second argument (``run``'s ``input_feed``,
    ``run_with_ort_values``' ``input_dict_ort_values``)."""

    def bind(args: tuple, kwargs: dict) -> Named:
        feed = kwargs.get(keyword, args[1] if len(args) > 1 else {})
        return [(name, _read(value)) for name, value in feed.items()]

    return bind


ort_bind = _feed("input_feed")


def ort_outputs_for(session: Any) -> OutputNamer:
    """Outputs named as asked for (``output_names``, the first argument), else as the session
    names them. The session is held weakly: a recording keeps no session alive."""
    session_ref = reference(session)

    def outputs(result: Any, args: tuple, kwargs: dict) -> Named:
        names = kwargs.get("output_names", args[0] if args else None) or [o.name for o in session_ref().get_outputs()]
        return [(name, _read(value)) for name, value in zip(names, result)]

    return outputs


def _read(source: Any) -> Any:
    if isinstance(source, _Pointer):
        return source.read()
    if type(source).__name__ == "OrtValue":
        return source.numpy()
    return source


# what each IOBinding was given, {"inputs": {name: source}, "outputs": [name]}, kept beside it
# (not on it: a binding leaves a recording as it came in)
_given: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(binding: Any) -> dict[str, Any]:
    return _given.setdefault(binding, {"inputs": {}, "outputs": []})


def _bound(binding: Any) -> dict[str, Any] | None:
    try:
        return _given.get(binding)
    except TypeError:  # not weakly referable: no IOBinding of ours
        return None


# -- remembering what bindings are given ------------------------------------------------------
_lock = threading.Lock()
_holders = 0
_originals: dict[str, Any] = {}


def _remembering(original: Callable[..., Any], remember: Callable[..., None]) -> Callable[..., Any]:
    @functools.wraps(original)
    def method(binding: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(binding, *args, **kwargs)
        remember(_state(binding), *args, **kwargs)
        return result

    return method


def _remember_input(state: dict, name: str, value: Any) -> None:
    state["inputs"][name] = value


def _remember_pointer(
    state: dict, name: str, device_type: str, device_id: int, element_type: Any, shape: Any, buffer_ptr: int
) -> None:
    state["inputs"][name] = _Pointer(str(device_type), element_type, tuple(int(d) for d in shape), int(buffer_ptr))


def _remember_output(state: dict, name: str, *args: Any, **kwargs: Any) -> None:
    if name not in state["outputs"]:
        state["outputs"].append(name)


_REMEMBER = {
    "bind_cpu_input": _remember_input,
    "bind_ortvalue_input": _remember_input,
    "bind_input": _remember_pointer,
    "bind_output": _remember_output,
    "bind_ortvalue_output": _remember_output,
    "clear_binding_inputs": lambda state: state["inputs"].clear(),
    "clear_binding_outputs": lambda state: state["outputs"].clear(),
}


class BindingMemory(Hook):
    """Keeps IOBinding's bind methods patched while at least one recording holds one."""

    def __init__(self) -> None:
        global _holders
        self.name, self._held = "iobinding", True
        with _lock:
            _holders += 1
            cls = getattr(sys.modules.get("onnxruntime"), "IOBinding", None)
            if _holders == 1 and cls is not None:
                for method, remember in _REMEMBER.items():
                    original = cls.__dict__.get(method)
                    if original is not None:
                        _originals[method] = original
                        setattr(cls, method, _remembering(original, remember))

    def remove(self) -> None:
        global _holders
        if not self._held:
            return
        self._held = False
        with _lock:
            _holders -= 1
            cls = getattr(sys.modules.get("onnxruntime"), "IOBinding", None)
            if _holders == 0 and cls is not None:
                for method, original in _originals.items():
                    setattr(cls, method, original)
                _originals.clear()
            if _holders == 0:
                _given.clear()  # what is bound from now on goes unseen: no later recording may trust it
