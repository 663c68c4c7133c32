"""Quantizers run the model to calibrate it: those runs are not the pipeline's.

NNCF's ``quantize`` (and ``quantize_with_accuracy_control``) feeds a calibration set through the
model, compiling an OpenVINO model for each statistics pass, and ``compress_weights`` may run
it to choose scales. A script that quantizes its UNet before the pipeline runs would otherwise
have each of those inferences recorded as a submodel of its own (dozens of ``openvino#N``), or
as extra calls of a watched torch module.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from alignkit.recording.seam import Hook, not_recording

# the functions that calibrate, and the modules that export them (the package re-exports them)
QUANTIZERS = ("quantize", "quantize_with_accuracy_control", "compress_weights")
NNCF_MODULES = ("nncf", "nncf.quantization", "nncf.quantization.quantize_model")


class PausedWhileCalibrating(Hook):
    """Record nothing on the calling thread while one of NNCF's quantizers runs."""

    name = "calibration"

    def __init__(self) -> None:
        self._restore: list[tuple[Any, str, Callable[..., Any]]] = []
        paused: dict[int, Callable[..., Any]] = {}  # one wrapper per function, wherever it is exported
        for module in filter(None, (sys.modules.get(name) for name in NNCF_MODULES)):
            for attr in QUANTIZERS:
                original = getattr(module, attr, None)
                if not callable(original) or getattr(original, "__alignkit__", False):
                    continue
                wrapper = paused.get(id(original)) or paused.setdefault(id(original), _paused(original))
                setattr(module, attr, wrapper)
                self._restore.append((module, attr, original))

    def remove(self) -> None:
        for module, attr, original in reversed(self._restore):
            setattr(module, attr, original)
        self._restore.clear()


def _paused(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def calibrating(*args: Any, **kwargs: Any) -> Any:
        with not_recording():
            return original(*args, **kwargs)

    calibrating.__alignkit__ = True  # type: ignore[attr-defined]
    return calibrating
