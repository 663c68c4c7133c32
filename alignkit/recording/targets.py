"""Recognise what is being watched and name it, without importing torch or onnxruntime."""

from __future__ import annotations

import sys
from pathlib import PurePath
from typing import Any

_GENERIC_STEMS = {"model", "compilation", "compiled", "engine", "graph", "net", "network", "main", "model_fp16", "model_fp32"}
_PATH_ATTRS = ("model_path", "_model_path", "path", "model_file", "onnx_path", "engine_path")


def is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_torch_module_class(cls: type) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and issubclass(cls, torch.nn.Module)


def is_ort_session(obj: Any) -> bool:
    ort = sys.modules.get("onnxruntime")
    return ort is not None and isinstance(obj, ort.InferenceSession)


def is_pipeline(obj: Any) -> bool:
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__) and hasattr(obj, "components")


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


def ort_bind(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """``run(output_names, input_feed, run_options)``: inputs are named by the feed."""
    feed = kwargs.get("input_feed", args[1] if len(args) > 1 else {})
    return list(feed.items())


def ort_outputs_for(session: Any):
    def outputs(result: Any, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
        names = kwargs.get("output_names", args[0] if args else None)
        if not names:
            names = [o.name for o in session.get_outputs()]
        return list(zip(names, result))

    return outputs
