"""Find a diffusers pipeline's submodels by component name and make its scheduler the clock.

Tokenizers, feature extractors and image processors are not submodels. The VAE is watched on
``decode``/``encode`` (what pipelines call), recorded as ``vae.decode``/``vae.encode``. The
scheduler's ``step`` is recorded as the submodel ``scheduler`` (its inputs and outputs are the
glue between UNet calls) and each of its calls ends a step: in a pipeline, and as well in a
hand-written loop that calls a diffusers scheduler itself. The pipeline's own calls are not
submodel calls; their arguments (prompt, guidance scale, size, seed) are noted, each call's
once, under ``/pipeline_calls`` (docs/format.md).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from alignkit.recording.hooks import CallHook
from alignkit.recording.optimum import ready_engines, watch_wrapper, wraps_unwatched_engine
from alignkit.recording.targets import is_diffusers_scheduler, is_torch_module
from alignkit.recording.tensors import plain_value

if TYPE_CHECKING:
    from alignkit.recording.seam import CallLog

_NOT_SUBMODELS = ("tokenizer", "feature_extractor", "image_processor", "processor", "image_encoder_processor")


def is_submodel_name(name: str) -> bool:
    return not any(word in name for word in _NOT_SUBMODELS)


def watch_pipeline(recorder: CallLog, pipe: Any) -> None:
    """Watch every submodel of ``pipe`` that is not watched yet, and note its calls' arguments."""
    if recorder.method_watched_as(pipe, "__call__") is None:
        _note_calls(recorder, pipe)
    for name, component in _components(pipe).items():
        if component is None or not is_submodel_name(name):
            continue
        if recorder.is_watched(component) and not _engine_since(recorder, component, name):
            continue
        _free_name(recorder, name, component)
        if name.startswith("scheduler") or is_diffusers_scheduler(component):
            watch_scheduler(recorder, component, name)
        elif is_torch_module(component) and _is_autoencoder(component):
            for method in ("decode", "encode"):
                if hasattr(component, method):
                    submodel = recorder.watch_method(component, method, f"{name}.{method}")
                    recorder.watch_layers(component, submodel)  # --layers vae.decode: the module it runs
            recorder.mark_watched(component, name)
        elif is_torch_module(component):
            recorder.watch(component, name)
        elif watch_wrapper(recorder, component, name):  # diffusers' OnnxRuntimeModel, optimum's ORTUnet, ORTVae
            continue
        elif callable(component):
            recorder.watch(component, name)


def _engine_since(recorder: CallLog, component: Any, name: str) -> bool:
    """Whether a wrapper watched as itself, because it held no engine yet when the pipeline was
    made (optimum-intel compiles its models after making the pipeline), now holds one that is not
    watched: the wrapper is then let go, if it never ran, for the engine to take its name."""
    if not wraps_unwatched_engine(recorder, component):
        return False
    _free_name(recorder, name, component)
    return not recorder.is_watched(component)


def _free_name(recorder: CallLog, name: str, component: Any) -> None:
    """A component swapped out before it ran (the pipeline was watched when it was made, then
    ``pipe.unet = EngineOV(...)``) gives its name to what replaced it, which is not watched yet."""
    for submodel in (name, f"{name}.decode", f"{name}.encode"):
        recorder.release(submodel)


def _components(pipe: Any) -> dict[str, Any]:
    """The pipeline's components, and any scheduler among its attributes that they leave out
    (optimum's pipelines do: without it the target would have no steps)."""
    out = dict(pipe.components)
    for name, value in vars(pipe).items():
        if name not in out and not name.startswith("_") and is_diffusers_scheduler(value):
            out[name] = value
    return out


def _note_calls(recorder: CallLog, pipe: Any) -> None:
    """Note the arguments of each call of ``pipe``, defaults filled in: a guidance scale, a
    prompt or a seed that differs between the runs then shows as such."""
    try:
        signature = inspect.signature(pipe.__call__)
    except (TypeError, ValueError):
        return
    pipeline = f"{type(pipe).__module__}.{type(pipe).__qualname__}"

    def around(call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if ready_engines(pipe):  # optimum-intel's parts compiled now: their engines take the parts' names
            watch_pipeline(recorder, pipe)
        try:
            arguments = call_arguments(signature, args, kwargs)
        except Exception:  # an argument that cannot be described is no reason to stop the run
            arguments = None
        if arguments is not None:
            recorder.note_pipeline_call(pipeline, arguments)
        return call(*args, **kwargs)

    try:
        hook = CallHook(recorder, pipe, "pipeline", around=around)
    except TypeError:  # a class whose instances cannot change class: the calls go unnoted
        return
    recorder.mark_method_watched(pipe, "__call__", hook.name)
    recorder.add_hook(None, hook)


def call_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Each argument of a call, by parameter name with defaults filled in, as a JSON-ready
    value (a tensor by its dtype and shape, a generator by its seed); None when the call does
    not fit the signature (it is about to fail)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update((key, plain_value(v)) for key, v in value.items())
        else:
            out[name] = plain_value(value)
    return out


def watch_scheduler(recorder: CallLog, scheduler: Any, name: str = "scheduler") -> None:
    """Record the scheduler's ``step`` calls as the submodel ``name``, each ending a step."""
    submodel = recorder.watch_method(scheduler, "step", name, after=functools.partial(recorder.step, "scheduler"))
    recorder.mark_watched(scheduler, submodel)


def _is_autoencoder(module: Any) -> bool:
    return (
        hasattr(module, "decode")
        and hasattr(module, "encode")
        and "Autoencoder" in type(module).__name__
        or type(module).__name__ == "VQModel"
    )
