"""Layer recording: the output of every leaf module of a torch submodel, copied when the layer
runs and stored under the submodel's call (``layers/<module path>``), so comparison can name
the first layer that diverges. ``pattern`` (a regex on module paths) and the recorder's step
filter keep it affordable. A module called twice in one call gives ``path`` and ``path#2``;
a tuple output gives ``path.0``, ``path.1``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from alignkit.recording.flatten import Named, name_outputs, split
from alignkit.recording.seam import Hook, current_call
from alignkit.recording.targets import uncompiled
from alignkit.recording.tensors import Tensor

if TYPE_CHECKING:
    from alignkit.recording.seam import CallLog

Sink = Callable[[], "list[Tensor] | None"]


Capture = Callable[[Named], "tuple[list[Tensor], dict[str, str]]"]


class LayerHooks(Hook):
    """Forward hooks on the leaf modules of ``module`` that append to ``sink()`` (if not None),
    taking each output's values with ``capture``."""

    def __init__(
        self,
        module: Any,
        name: str,
        sink: Sink,
        pattern: re.Pattern | None = None,
        capture: Capture = split,
        depth: int | None = None,
    ):
        self.name = name
        self._records(module)
        self._handles = [
            sub.register_forward_hook(_hook(path, sub, sink, capture))
            for path, sub in recorded_modules(module, pattern, depth)
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def recorder_layers(
    recorder: CallLog, module: Any, submodel: str, pattern: re.Pattern | None, depth: int | None = None
) -> LayerHooks:
    """Layer hooks that add to whichever call of ``submodel`` is being recorded on this thread."""

    def sink() -> list[Tensor] | None:
        record = current_call()
        return record.layers if record is not None and record.submodel == submodel else None

    return LayerHooks(
        module, f"{submodel} layers", sink, pattern, lambda named: recorder.capture(named, layers=True), depth
    )


@contextmanager
def capture_layers(module: Any, enabled: bool = True) -> Iterator[list[Tensor]]:
    """Collect every leaf module's output while the block runs (replay of a torch target)."""
    collected: list[Tensor] = []
    hooks = LayerHooks(module, "replay layers", lambda: collected) if enabled else None
    try:
        yield collected
    finally:
        if hooks is not None:
            hooks.remove()


def recorded_modules(
    module: Any, pattern: re.Pattern | None = None, depth: int | None = None
) -> Iterator[tuple[str, Any]]:
    """The modules whose outputs are recorded: every module at every depth (a block's own
    output as well as its children's, so that an error written inline in a block's forward is
    found there), down to ``depth`` levels of the path (``down_blocks.0.resnets`` is 3), and
    whose path ``pattern`` matches."""
    for path, sub in uncompiled(module).named_modules():
        if path and (depth is None or path.count(".") < depth) and (pattern is None or pattern.search(path)):
            yield path, sub


def stateless(module: Any) -> list[str]:
    """The leaf modules with no parameters of their own (activations, dropout, pooling): an
    error first seen in their output was most often made by the code that fed them."""
    return [
        path
        for path, sub in uncompiled(module).named_modules()
        if path and next(sub.children(), None) is None and next(sub.parameters(recurse=False), None) is None
    ]


def _hook(path: str, layer: Any, sink: Sink, capture: Capture):
    def hook(module: Any, args: tuple, output: Any) -> None:
        if module is not layer:  # a deep copy's layer, which torch gave the hook too
            return
        layers = sink()
        if layers is None:
            return
        tensors, _ = capture(name_outputs(output))
        taken = getattr(layers, "names", None)  # kept by a call's Layers as they come
        if taken is None:
            taken = {t.name for t in layers}
        for t in tensors:
            name = path if t.name == "output" else f"{path}.{t.name.removeprefix('output.')}"
            base, n = name, 2
            while name in taken:
                name, n = f"{base}#{n}", n + 1
            t.name = name
            taken.add(name)
            layers.append(t)

    return hook
