"""Layer recording: the output of every leaf module of a torch submodel, stored under the
submodel's call (``layers/<module path>``), so comparison can name the first layer that
diverges. ``pattern`` (a regex on module paths) and the recorder's step filter keep it
affordable."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from alignkit.record.flatten import name_outputs, split
from alignkit.record.hooks import Hook

if TYPE_CHECKING:
    from alignkit.record.recorder import Recorder


class LayerHooks(Hook):
    """Forward hooks on every leaf module of ``module`` that append to the current call."""

    def __init__(self, recorder: Recorder, module: Any, submodel: str, pattern: re.Pattern | None = None):
        self.name = f"{submodel} layers"
        self._handles = []
        for path, sub in module.named_modules():
            if path and next(sub.children(), None) is None and (pattern is None or pattern.search(path)):
                self._handles.append(sub.register_forward_hook(_layer_hook(path, submodel)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _layer_hook(path: str, submodel: str):
    from alignkit.record.recorder import current_call

    def hook(module: Any, args: tuple, output: Any) -> None:
        record = current_call()
        if record is None or record.submodel != submodel:
            return
        tensors, _ = split(name_outputs(output))
        taken = {t.name for t in record.layers}
        for t in tensors:
            name = path if t.name == "output" else f"{path}.{t.name.removeprefix('output.')}"
            base, n = name, 2
            while name in taken:
                name, n = f"{base}#{n}", n + 1
            t.name = name
            taken.add(name)
            record.layers.append(t)

    return hook
