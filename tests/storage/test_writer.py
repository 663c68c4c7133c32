"""The background writer: its failures surface when recording ends, and it yields the CPU."""

import os
import sys
import threading

import numpy as np
import pytest

import alignkit as ak
from alignkit.storage.writer import WRITER_NICENESS

UNSTORABLE = np.array(["2020-01-01"], dtype="datetime64[D]")  # HDF5 has no type for it


def test_a_writer_failure_surfaces_when_recording_ends(tmp_path):
    path = tmp_path / "failed.h5"
    returned = []
    with pytest.raises(ak.RecordingError, match=r"recording failed at call 1 \(f, step 1, call 0\): No conversion path for dtype"):
        with ak.Recorder(path) as rec:
            f = rec.watch(lambda x: x, "f")
            f(np.zeros(3))
            ak.step()
            returned.append(f(UNSTORABLE))  # the run goes on; the writer fails behind it
    assert returned[0] is UNSTORABLE
    with ak.open_dump(path) as d:
        assert not d.metadata["complete"]
        np.testing.assert_array_equal(d["f", 0, 0].inputs["x"], np.zeros(3))


def test_the_runs_own_exception_is_not_masked_by_a_writer_failure(tmp_path):
    with pytest.warns(RuntimeWarning, match="recording failed"), pytest.raises(KeyError, match="from the run"):
        with ak.Recorder(tmp_path / "failed.h5") as rec:
            rec.watch(lambda x: x, "f")(UNSTORABLE)
            raise KeyError("from the run")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are set on Linux only")
def test_the_writer_thread_alone_runs_at_a_low_priority(tmp_path):
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ak.Recorder(tmp_path / "nice.h5") as rec:
        rec.watch(lambda x: x, "f")(np.zeros(3))
        writers = [t for t in threading.enumerate() if t.name == "alignkit-writer"]
        assert len(writers) == 1
        assert os.getpriority(os.PRIO_PROCESS, writers[0].native_id) == before + WRITER_NICENESS > before
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
