"""optimum's ONNX Runtime classes: the Python wrappers (``ORTUnet``, ``ORTTextEncoder``,
``ORTVae``, ``ORTModelForCausalLM``…) around the sessions that do the work.

A wrapper is never recorded itself: the session inside it is, under the name of what the wrapper
stands for in the pipeline (``unet``; the VAE's decoder session as ``vae.decode``), so that the
tensors stored are the feed the engine actually received, after the wrapper's own casts, named
as the export names them. optimum's pipelines leave the scheduler out of ``components``; the
diffusers adapter finds it among the pipeline's attributes.
"""

from __future__ import annotations

from typing import Any

from alignkit.recording.seam import CallLog
from alignkit.recording.targets import is_ort_session

ENGINE_ATTRS = ("session", "model", "request", "compiled_model")  # where wrappers keep their engine
_METHOD_PARTS = {"decode": "decoder", "encode": "encoder"}  # ORTVae.decode runs self.decoder


def engine_inside(wrapper: Any) -> Any:
    """The engine a Python wrapper forwards to (an ONNX Runtime session, an OpenVINO compiled
    model or infer request), or None."""
    from alignkit.recording.openvino import is_openvino_engine

    def is_engine(value: Any) -> bool:
        return value is not None and (is_ort_session(value) or is_openvino_engine(value))

    for attr in ENGINE_ATTRS:
        if is_engine(inner := getattr(wrapper, attr, None)):
            return inner
    held = [value for value in getattr(wrapper, "__dict__", {}).values() if is_engine(value)]
    return held[0] if len(held) == 1 else None  # a hand-written wrapper's one engine, whatever it is called


def ready_engines(pipe: Any) -> bool:
    """Compile the parts of an optimum-intel pipeline that compile on their first call, as the
    call about to run would: their engines are then there to be watched under the parts' names
    (``compile=False`` at load, or ``clear_requests()``). True when one was compiled."""
    compiled = False
    for part in getattr(pipe, "components", {}).values():
        if getattr(part, "request", False) is None and callable(getattr(part, "compile", None)):
            try:
                part.compile()
            except Exception:  # the call itself will meet the same trouble, and say why
                continue
            compiled = True
    return compiled


def wraps_unwatched_engine(log: CallLog, wrapper: Any) -> bool:
    """Whether ``wrapper`` holds an engine (itself, or its decoder's and encoder's) not watched yet."""
    engines = [engine_inside(wrapper)] + [
        engine_inside(getattr(wrapper, part, None)) for part in _METHOD_PARTS.values()
    ]
    return any(engine is not None and not log.is_watched(engine) for engine in engines)


def watch_wrapper(log: CallLog, wrapper: Any, name: str) -> bool:
    """Watch the engine(s) inside ``wrapper`` as ``name`` (a VAE's parts as ``name.decode`` and
    ``name.encode``); False when it wraps none."""
    engine = engine_inside(wrapper)
    if engine is not None:
        log.watch(engine, name)
        log.mark_watched(wrapper, name)
        return True
    parts = {
        method: engine_inside(getattr(wrapper, part, None))
        for method, part in _METHOD_PARTS.items()
        if callable(getattr(wrapper, method, None))
    }
    parts = {method: engine for method, engine in parts.items() if engine is not None}
    for method, engine in parts.items():
        log.watch(engine, f"{name}.{method}")
        log.mark_watched(getattr(wrapper, _METHOD_PARTS[method]), f"{name}.{method}")
    if parts:
        log.mark_watched(wrapper, name)
    return bool(parts)
