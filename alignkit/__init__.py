"""alignkit: record a reference and a target run of a pipeline, find where they part ways.

::

    import alignkit as ak

    with ak.record("dumps/ref.h5", pipe, label="torch-fp32"):
        image = pipe(prompt, num_inference_steps=20)

    result = ak.compare("dumps/ref.h5", "dumps/tgt.h5")
    print(result.verdict, result.first_divergence)

Importing alignkit loads neither torch, onnxruntime nor matplotlib; each is imported by the
code that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from alignkit._version import __version__
from alignkit.errors import (
    AlignkitError,
    CallNotFoundError,
    DumpCorruptError,
    DumpError,
    FormatVersionError,
    MissingDependencyError,
    NotADumpError,
    RecordingError,
    UsageError,
)

__all__ = [
    "AlignkitError",
    "Call",
    "CallNotFoundError",
    "Comparison",
    "Divergence",
    "Dump",
    "DumpCorruptError",
    "DumpError",
    "FormatVersionError",
    "MissingDependencyError",
    "NotADumpError",
    "Recorder",
    "RecordingError",
    "UsageError",
    "__version__",
    "compare",
    "open_dump",
    "record",
    "replay",
    "step",
]

_LAZY = {
    "Recorder": "alignkit.record",
    "record": "alignkit.record",
    "step": "alignkit.record",
    "Dump": "alignkit.store",
    "Call": "alignkit.store",
    "open_dump": "alignkit.store",
    "compare": "alignkit.compare",
    "Comparison": "alignkit.compare",
    "Divergence": "alignkit.compare",
    "replay": "alignkit.replay",
}

if TYPE_CHECKING:
    from alignkit.compare import Comparison, Divergence, compare
    from alignkit.record import Recorder, record, step
    from alignkit.replay import replay
    from alignkit.store import Call, Dump, open_dump


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
