"""Recording: watch submodels, key their calls by step, copy tensors out to the writer."""

from alignkit.recording.recorder import Recorder, record, step

__all__ = ["Recorder", "record", "step"]
