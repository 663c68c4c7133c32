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

# Submodules share names with the functions they export (alignkit.record the package,
# alignkit.record() the function): import them here, before anything else can, so that the
# package attribute is the function. None of them imports torch, onnxruntime or matplotlib.
from alignkit.compare import Comparison, Divergence, compare  # noqa: E402
from alignkit.record import Recorder, record, step  # noqa: E402
from alignkit.replay import replay  # noqa: E402
from alignkit.store import Call, Dump, open_dump  # noqa: E402


def __dir__() -> list[str]:
    return sorted(__all__)
