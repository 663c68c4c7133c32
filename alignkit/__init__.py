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
from alignkit.comparison import Comparison, Divergence, compare
from alignkit.comparison.ranks import RankComparisons, compare_ranks
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
from alignkit.recording import Recorder, record, step
from alignkit.replaying import replay
from alignkit.storage import Call, Dump, open_dump

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
    "RankComparisons",
    "Recorder",
    "RecordingError",
    "UsageError",
    "__version__",
    "compare",
    "compare_ranks",
    "open_dump",
    "record",
    "replay",
    "step",
]


def __dir__() -> list[str]:
    return sorted(__all__)
