"""Find a diffusers pipeline's submodels by component name and make its scheduler the clock.

Tokenizers, feature extractors and image processors are not submodels. The VAE is watched on
``decode``/``encode`` (what pipelines call), recorded as ``vae.decode``/``vae.encode``. The
scheduler's ``step`` is recorded as the submodel ``scheduler`` (its inputs and outputs are the
glue between UNet calls) and each of its calls ends a step: in a pipeline, and as well in a
hand-written loop that calls a diffusers scheduler itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alignkit.recording.targets import is_diffusers_scheduler, is_ort_session, is_torch_module

if TYPE_CHECKING:
    from alignkit.recording.recorder import Recorder

_NOT_SUBMODELS = ("tokenizer", "feature_extractor", "image_processor", "processor", "image_encoder_processor")


def is_submodel_name(name: str) -> bool:
    return not any(word in name for word in _NOT_SUBMODELS)


def watch_pipeline(recorder: Recorder, pipe: Any) -> None:
    """Watch every submodel of ``pipe`` that is not watched yet."""
    for name, component in pipe.components.items():
        if component is None or not is_submodel_name(name) or recorder._is_watched(component):
            continue
        if name.startswith("scheduler") or is_diffusers_scheduler(component):
            watch_scheduler(recorder, component, name)
        elif is_torch_module(component) and _is_autoencoder(component):
            for method in ("decode", "encode"):
                if hasattr(component, method):
                    recorder._watch_method(component, method, f"{name}.{method}")
            recorder._mark_watched(component, name)
        elif is_torch_module(component):
            recorder.watch(component, name)
        elif is_ort_session(getattr(component, "model", None)):  # diffusers' OnnxRuntimeModel
            recorder.watch(component.model, name)
            recorder._mark_watched(component, name)
        elif callable(component):
            recorder.watch(component, name)


def watch_scheduler(recorder: Recorder, scheduler: Any, name: str = "scheduler") -> None:
    """Record the scheduler's ``step`` calls as the submodel ``name``, each ending a step."""
    submodel = recorder._watch_method(scheduler, "step", name, after=recorder._scheduler_step)
    recorder._mark_watched(scheduler, submodel)


def _is_autoencoder(module: Any) -> bool:
    return hasattr(module, "decode") and hasattr(module, "encode") and "Autoencoder" in type(module).__name__ or type(module).__name__ == "VQModel"
