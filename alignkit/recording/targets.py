"""Recognise what is being watched and name it, without importing torch or onnxruntime."""

from __future__ import annotations

import inspect
import json
import sys
import weakref
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any

_GENERIC_STEMS = {
    "model",
    "compilation",
    "compiled",
    "engine",
    "graph",
    "net",
    "network",
    "main",
    "model_fp16",
    "model_fp32",
}
_PATH_ATTRS = ("model_path", "_model_path", "path", "model_file", "onnx_path", "engine_path")


def is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_torch_module_class(cls: type) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and issubclass(cls, torch.nn.Module)


def torch_is_tracing() -> bool:
    """Whether torch is tracing or exporting the model rather than running it (a script that
    converts its UNet for OpenVINO or ONNX before it runs the port): such calls compute
    nothing and are not recorded."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    checks = (
        torch.jit.is_tracing,
        torch.onnx.is_in_onnx_export,
        getattr(torch.compiler, "is_compiling", lambda: False),
    )
    return any(check() for check in checks)


def uncompiled(module: Any) -> Any:
    """The module ``torch.compile`` wrapped (its forward's parameters name the inputs, its
    class names the submodel, its layer paths have no ``_orig_mod.``), or ``module`` itself."""
    return getattr(module, "_orig_mod", module) if type(module).__name__ == "OptimizedModule" else module


def is_ort_session(obj: Any) -> bool:
    ort = sys.modules.get("onnxruntime")
    return ort is not None and isinstance(obj, ort.InferenceSession)


def is_pipeline(obj: Any) -> bool:
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__) and hasattr(obj, "components")


def is_diffusers_scheduler(obj: Any) -> bool:
    """A diffusers scheduler (``SchedulerMixin``): its ``step`` is the step boundary."""
    return any(c.__name__ == "SchedulerMixin" for c in type(obj).__mro__) and callable(getattr(obj, "step", None))


def description(obj: Any) -> dict[str, str]:
    """What a submodel is, for ``/submodels`` (docs/format.md): its class (a plain function's
    own qualified name) and, for a diffusers or transformers object, its config as JSON text,
    so that a scheduler of another class or with another ``timestep_spacing`` can be named."""
    obj = uncompiled(obj)
    named = obj if is_function(obj) else type(obj)
    out = {"class": f"{getattr(named, '__module__', None) or 'builtins'}.{named.__qualname__}"}
    config = _config(obj)
    if config is not None:
        out["config"] = json.dumps(config, sort_keys=True, default=str)
    if is_ort_session(obj):
        out.update(_ort_facts(obj))
    return out


def _ort_facts(session: Any) -> dict[str, str]:
    """An ONNX Runtime session's provider and the precision its graph computes in."""
    from alignkit.recording.onnx_layers import onnx_precision

    out = {"engine": "onnxruntime", "device": ",".join(session.get_providers()[:1])}
    path = getattr(session, "_model_path", None)
    if isinstance(path, str) and path and (precision := onnx_precision(path)) is not None:
        out["precision"] = precision
    return out


def is_function(obj: Any) -> bool:
    """A plain function or method, which is watched by wrapping it (it has no class of its own
    to hook) and is named by its own qualified name."""
    return inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj)


def _config(obj: Any) -> dict[str, Any] | None:
    """A diffusers object's config (a mapping) or a transformers model's (``to_dict``)."""
    if not any(c.__module__.split(".")[0] in ("diffusers", "transformers") for c in type(obj).__mro__):
        return None
    config = getattr(obj, "config", None)
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def name_from_path(path: str) -> str:
    """``unet/model.onnx`` → ``unet``; ``text_encoder.onnx`` → ``text_encoder``."""
    p = PurePath(str(path))
    if p.stem.lower() in _GENERIC_STEMS and p.parent.name not in ("", "."):
        return p.parent.name
    return p.stem or "model"


def path_of(obj: Any) -> str | None:
    """The model file an engine object was built from, when it says."""
    for attr in _PATH_ATTRS:
        value = getattr(obj, attr, None)
        if isinstance(value, (str, PurePath)) and str(value):
            return str(value)
    return None


def ort_session_name(session: Any) -> str:
    path = getattr(session, "_model_path", None)
    return name_from_path(path) if isinstance(path, str) and path else "onnx"


class ObjectNames:
    """Submodel names by object identity, for objects still alive.

    CPython gives a freed object's id to the next object, so a pipeline that loads its models
    one after another to save memory would get its new model taken for the freed one. Each
    entry is checked against a weak reference (a strong one where the object allows none,
    which then keeps it, and its id, alive)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str], tuple[Callable[[], Any], str, str]] = {}  # (id, part) → (ref, name, base)

    def get(self, obj: Any, part: str = "") -> str | None:
        """The name ``obj`` (or its method ``part``) was given, if it was."""
        entry = self._entries.get((id(obj), part))
        return entry[1] if entry is not None and entry[0]() is obj else None

    def add(self, obj: Any, name: str, part: str = "", base: str = "") -> None:
        """Name ``obj`` unless it has a name already."""
        if self.get(obj, part) is None:
            self._entries[(id(obj), part)] = (reference(obj), name, base)

    def name_for(self, obj: Any, base: str, unique: Callable[[str], str]) -> str:
        """``obj``'s name, given on first sight: the name of a freed object of the same ``base``
        (a session made again for the same model file keeps its name), else ``unique(base)``."""
        name = self.get(obj)
        if name is None:
            freed = next((key for key, (ref, _, b) in self._entries.items() if b == base and ref() is None), None)
            name = self._entries.pop(freed)[1] if freed is not None else unique(base)
            self.add(obj, name, base=base)
        return name

    def discard(self, obj: Any) -> None:
        """Forget every name of ``obj`` and of its methods."""
        for key in [key for key, (ref, _, _) in self._entries.items() if ref() is obj]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


def reference(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj``, or a strong one where it takes no weak reference."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj
