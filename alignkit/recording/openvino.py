"""OpenVINO: compiled models and infer requests, recorded like ONNX Runtime sessions.

A ``CompiledModel`` is called (``compiled(inputs)``) or runs through an ``InferRequest``
(``infer``); both are recorded with the inputs named by the model's input names and the outputs
by its output names. The dump's description of the submodel keeps the device and the
inference precision in force (``INFERENCE_PRECISION_HINT``): a CPU that computes in bf16 behind
float32 inputs and outputs says so there.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from alignkit.recording.flatten import Named
from alignkit.recording.seam import Hook
from alignkit.recording.tensors import torch_tensor_type


def is_openvino_engine(obj: Any) -> bool:
    ov = sys.modules.get("openvino")
    if ov is None:
        return False
    return isinstance(obj, (ov.CompiledModel, ov.InferRequest))


def compiled_model_of(engine: Any) -> Any:
    ov = sys.modules["openvino"]
    return engine if isinstance(engine, ov.CompiledModel) else engine.get_compiled_model()


def port_names(ports: Any) -> list[str]:
    """A port's name as the model gives it (its first tensor name), else ``output.N``.

    A name that several ports share says nothing of which is which: compiling an SDXL text
    encoder exported by optimum-intel, OpenVINO's CPU plugin names ``last_hidden_state`` as it
    names ``hidden_states.5``. Those ports are named by position (``output.1``), so that they
    pair with the reference by their place, not by a name that would swap them."""
    names = []
    for i, port in enumerate(ports):
        try:
            names.append(port.get_any_name())
        except RuntimeError:  # a port with no name
            names.append(f"output.{i}")
    shared = {name for name in names if names.count(name) > 1}
    return [f"output.{i}" if name in shared else name for i, name in enumerate(names)]


def declared_inputs(engine: Any) -> list[tuple[str, np.dtype | None]]:
    """Each model input's name and the element type it declares (None where dynamic): asked
    once per engine, not on every call."""
    ports = compiled_model_of(engine).inputs
    return list(zip(port_names(ports), map(_declared_dtype, ports)))


def bind_inputs(declared: list[tuple[str, np.dtype | None]], args: tuple, kwargs: dict) -> Named:
    """The inputs of ``compiled(inputs)`` / ``request.infer(inputs)``: a dict by name or by
    index, a list in the model's order, or one array; each as the engine computes with it (see
    :func:`as_declared`). ``declared`` is the engine's :func:`declared_inputs`."""
    inputs = args[0] if args else kwargs.get("inputs")
    names = [name for name, _ in declared]
    if isinstance(inputs, dict):
        named = [
            (names[k] if isinstance(k, int) else getattr(k, "get_any_name", lambda k=k: str(k))(), v)
            for k, v in inputs.items()
        ]
    elif isinstance(inputs, (list, tuple)):
        named = list(zip(names, inputs))
    else:
        named = [] if inputs is None else [(names[0], inputs)]
    types = dict(declared)
    return [(name, as_declared(_values_of(value), types.get(name))) for name, value in named]


def _values_of(value: Any) -> Any:
    """An ``ov.Tensor``'s values as an array (its ``data``); anything else as it is."""
    if type(value).__name__ == "Tensor" and type(value).__module__.startswith("openvino"):
        try:
            return np.array(value.data)  # a copy: the tensor may share memory the engine reuses
        except (RuntimeError, TypeError):
            return value
    return value


def as_declared(value: Any, dtype: np.dtype | None) -> Any:
    """``value`` converted to the element type its model input declares, as OpenVINO converts it
    before computing: a float timestep fed to an input declared int64 (optimum-intel exports
    the UNet's so) is truncated, 499.5 to 499, and the recording must show what the engine
    computed with, not what it was handed."""
    if dtype is None:
        return value
    tensor_type = torch_tensor_type()
    if tensor_type is not None and isinstance(value, tensor_type):  # optimum-intel feeds torch tensors
        import torch

        wanted = torch.from_numpy(np.zeros(0, dtype)).dtype
        return value if value.dtype == wanted or value.is_complex() else value.detach().to(wanted)
    if not isinstance(value, (np.ndarray, np.generic, int, float)):
        return value
    array = np.asarray(value)
    if array.dtype == dtype or array.dtype.kind not in "biuf":
        return value
    with np.errstate(invalid="ignore", over="ignore"):
        return array.astype(dtype)


def _declared_dtype(port: Any) -> np.dtype | None:
    try:
        dtype = np.dtype(port.get_element_type().to_dtype())
    except (RuntimeError, TypeError, AttributeError):  # a dynamic element type: fed as it comes
        return None
    return dtype if dtype.kind in "biuf" else None


def name_results(engine: Any, result: Any) -> Named:
    """OpenVINO's ``OVDict`` of results, by output name, as arrays."""
    names = port_names(compiled_model_of(engine).outputs)
    try:
        values = list(result.values())
    except AttributeError:
        return [("output", result)]
    return [(name, np.asarray(value)) for name, value in zip(names, values)]


def precision(engine: Any) -> dict[str, str]:
    """The device and the precision it computes in, for the dump's description."""
    compiled = compiled_model_of(engine)
    out = {"engine": "openvino"}
    for key, prop in (("device", "EXECUTION_DEVICES"), ("inference_precision", "INFERENCE_PRECISION_HINT")):
        try:
            value = compiled.get_property(prop)
        except RuntimeError:
            continue
        if isinstance(value, (list, tuple)):
            out[key] = ",".join(map(str, value))
        else:
            out[key] = value.to_string() if hasattr(value, "to_string") else str(value)
    if out.get("inference_precision") in _PRECISIONS:
        out["precision"] = _PRECISIONS[out["inference_precision"]]
    declared = {name: dtype.name for name, dtype in declared_inputs(engine) if dtype is not None}
    if declared:  # what OpenVINO converts each input to (see as_declared)
        out["input_types"] = json.dumps(declared)
    quantized = quantized_layers(compiled)
    if quantized:  # NNCF's int8 (FakeQuantize, or weights compressed to int8): layers that run on 8-bit integers
        out["precision"], out["quantized_layers"] = "int8", str(quantized)
    return out


_PRECISIONS = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "i8": "int8", "u8": "int8"}
_INTEGER_RUNTIME = {"i8", "u8"}
# layers whose arithmetic the quantization is for (a boolean mask is u8 too, in any model)
_MULTIPLYING = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm"}


def quantized_layers(compiled: Any) -> int:
    """How many of the compiled model's convolutions and matrix products the plugin runs on 8-bit integers: what an
    NNCF-quantized model (its FakeQuantize operations) or one whose weights NNCF compressed to
    int8 becomes on the device, behind a float inference precision."""
    try:
        ops = compiled.get_runtime_model().get_ordered_ops()
    except (RuntimeError, AttributeError):
        return 0
    count = 0
    for op in ops:
        info = op.get_rt_info()
        try:
            kind, runs_in = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        except (KeyError, RuntimeError, AttributeError):
            continue
        count += kind in _MULTIPLYING and runs_in in _INTEGER_RUNTIME
    return count


def introduce(log: Any, engine: Any, submodel: str) -> None:
    """Describe a newly named engine (device, precision) and say, if ``--layers`` asked for it,
    that its layers cannot be recorded."""
    log.describe(submodel, engine, **precision(engine))
    if log.wants_layers(submodel):
        log.note_filter(f"layers: {submodel} is an OpenVINO model, whose layers alignkit cannot record")


def model_name(engine: Any) -> str:
    """The model's friendly name (``Model0`` when the converter gave none: then ``openvino``)."""
    try:
        name = compiled_model_of(engine).get_runtime_model().get_friendly_name()
    except RuntimeError:
        return "openvino"
    return name if name and not name.startswith("Model") else "openvino"


def _run_to_end(start_async: Any, request: Any, args: tuple, kwargs: dict) -> Any:
    """Start an asynchronous inference and wait for it: a recorded call has its outputs. The
    caller's own ``wait`` then returns at once; what recording costs is the overlap."""
    start_async(request, *args, **kwargs)
    request.wait()
    return request.results


class OpenVINOHooks(Hook):
    """Record ``CompiledModel.__call__``, ``InferRequest.infer`` and ``InferRequest.start_async``
    for every engine that ``namer`` names (None: not recorded), by patching the two classes for
    as long as the hook lives. An engine's call that runs an infer request of its own is
    recorded once."""

    name = "openvino"

    def __init__(self, log: Any, namer: Any):
        import threading

        import openvino as ov

        from alignkit.recording.hooks import Watch
        from alignkit.recording.seam import recording_paused

        self._restore: list[tuple[type, str, Any]] = []
        inside = threading.local()
        watches: dict[str, Watch] = {}

        def patch(cls: type, method: str, to_end: bool = False) -> None:
            """``to_end``: an asynchronous start, run to its end so that the call has its outputs."""
            original = cls.__dict__[method]

            def recorded(engine: Any, *args: Any, **kwargs: Any) -> Any:
                name = None if getattr(inside, "depth", 0) or recording_paused() else namer(engine)
                if name is None:
                    return original(engine, *args, **kwargs)
                watch = watches.get(name) or watches.setdefault(
                    name,
                    Watch(
                        log,
                        name,
                        lambda a, k, d=declared_inputs(engine): bind_inputs(d, a, k),
                        lambda r, a, k, e=engine: name_results(e, r),
                    ),
                )
                inside.depth = getattr(inside, "depth", 0) + 1
                try:
                    if to_end:
                        watch.call(lambda *a, **k: _run_to_end(original, engine, a, k), args, kwargs)
                        return None
                    return watch.call(lambda *a, **k: original(engine, *a, **k), args, kwargs)
                finally:
                    inside.depth -= 1

            recorded.__wrapped__ = original  # type: ignore[attr-defined]
            setattr(cls, method, recorded)
            self._restore.append((cls, method, original))

        patch(ov.CompiledModel, "__call__")
        patch(ov.InferRequest, "infer")
        patch(ov.InferRequest, "start_async", to_end=True)  # optimum-intel's decoders: start_async, then wait
        self._pause_while_converting(ov)

    def _pause_while_converting(self, ov: Any) -> None:
        """``ov.convert_model`` runs the torch model it converts: those calls are not recorded."""
        from alignkit.recording.seam import not_recording

        original = ov.convert_model

        def convert_model(*args: Any, **kwargs: Any) -> Any:
            with not_recording():
                return original(*args, **kwargs)

        ov.convert_model = convert_model
        self._restore.append((ov, "convert_model", original))

    def remove(self) -> None:
        for cls, method, original in reversed(self._restore):
            setattr(cls, method, original)
        self._restore.clear()
