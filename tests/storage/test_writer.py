"""The background writer: its failures surface when recording ends, and it yields the CPU."""

import os
import sys
import threading
import time

import h5py
import numpy as np
import pytest

import alignkit as ak
from alignkit.storage import writer
from alignkit.storage.schema import split_row
from alignkit.storage.stacks import CallLayout
from alignkit.storage.writer import WRITER_NICENESS


@pytest.fixture()
def failing_writer(monkeypatch):
    """The writer fails on any call whose input ``x`` is negative (as a full device or a
    lost mount would fail it)."""
    add = CallLayout.add

    def fail_on_negative(layout, record):
        if any(t.name == "x" and (t.data < 0).any() for t in record.inputs):
            raise OSError("the device said no")
        add(layout, record)

    monkeypatch.setattr(CallLayout, "add", fail_on_negative)


def test_a_writer_failure_surfaces_when_recording_ends(tmp_path, failing_writer):
    path = tmp_path / "failed.h5"
    returned = []
    with pytest.raises(
        ak.RecordingError, match=r"recording failed at call 1 \(f, step 1, call 0\): the device said no"
    ):
        with ak.Recorder(path) as rec:
            f = rec.watch(lambda x: x * 2, "f")
            f(np.zeros(3))
            ak.step()
            returned.append(f(-np.ones(3)))  # the run goes on; the writer fails behind it
    np.testing.assert_array_equal(returned[0], -2 * np.ones(3))
    with ak.open_dump(path) as d:
        assert not d.metadata["complete"]
        assert d.metadata["writer_error"] == "OSError: the device said no at call 1 (f, step 1, call 0)"
        np.testing.assert_array_equal(d["f", 0, 0].inputs["x"], np.zeros(3))
        from alignkit.comparison.matching import shortfalls

        assert shortfalls(d) == [
            "recording the run failed (OSError: the device said no at call 1 (f, step 1, call 0)): the dump holds "
            "its calls up to the failure"
        ]  # not taken for a kill


def test_the_runs_own_exception_is_not_masked_by_a_writer_failure(tmp_path, failing_writer):
    with pytest.warns(RuntimeWarning, match="recording failed"), pytest.raises(KeyError, match="from the run"):
        with ak.Recorder(tmp_path / "failed.h5") as rec:
            rec.watch(lambda x: x, "f")(-np.ones(3))
            raise KeyError("from the run")


def test_dates_are_kept_as_text_not_tensors(tmp_path):
    with ak.Recorder(tmp_path / "dates.h5") as rec:
        rec.watch(lambda x, when: x, "f")(np.zeros(2), np.array(["2020-01-01"], dtype="datetime64[D]"))
    with ak.open_dump(tmp_path / "dates.h5") as d:
        assert list(d["f", 0].inputs) == ["x"]
        assert d["f", 0].values()["when"] == ["2020-01-01"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are set on Linux only")
def test_the_writer_thread_alone_runs_at_a_low_priority(tmp_path):
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ak.Recorder(tmp_path / "nice.h5") as rec:
        rec.watch(lambda x: x, "f")(np.zeros(3))
        writers = [t for t in threading.enumerate() if t.name == "alignkit-writer"]
        assert len(writers) == 1
        assert os.getpriority(os.PRIO_PROCESS, writers[0].native_id) == min(19, before + WRITER_NICENESS)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


@pytest.fixture()
def writes(monkeypatch):
    """The seq of each call as it is written; no flush falls due on its own during a test."""
    written = []
    add = CallLayout.add

    def noting(layout, record):
        written.append(record.seq)
        add(layout, record)

    monkeypatch.setattr(CallLayout, "add", noting)
    monkeypatch.setattr(writer, "FLUSH_INTERVAL", 60.0)
    return written


def test_calls_wait_for_the_flush_that_makes_them_durable(tmp_path, writes):
    """Writing a call sooner would make it no safer (a kill keeps the file as of its last
    flush); a run shorter than the flush interval is written when it ends."""
    with ak.Recorder(tmp_path / "batched.h5") as rec:
        f = rec.watch(lambda x: x + 1, "f")
        for step in range(5):
            f(np.full(4, step))
            ak.step()
        time.sleep(0.2)
        assert writes == []
    assert writes == [0, 1, 2, 3, 4]
    with ak.open_dump(tmp_path / "batched.h5") as d:
        np.testing.assert_array_equal(d["f", 4].inputs["x"], np.full(4, 4))


def test_calls_are_written_sooner_when_their_bytes_pile_up(tmp_path, writes):
    with ak.Recorder(tmp_path / "piled.h5", max_pending_bytes=4 << 20) as rec:
        f = rec.watch(lambda x: None, "f")
        for _ in range(8):
            f(np.zeros(128 << 10, np.float32))  # 512 KiB a call: a quarter of the limit is two calls
            ak.step()
        deadline = time.monotonic() + 10
        while len(writes) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(writes) >= 6
    assert writes == list(range(8))


def test_a_tensor_equal_to_the_previous_calls_is_stored_once(tmp_path):
    """Text embeddings fed to the UNet at every step: one row, which each call lists."""
    embeddings = np.random.default_rng(0).standard_normal((2, 77, 16)).astype(np.float32)
    with ak.Recorder(tmp_path / "d.h5") as rec:
        unet = rec.watch(lambda sample, encoder_hidden_states: sample * 2, "unet")
        for step in range(3):
            unet(np.full((2, 4), float(step), np.float32), embeddings)
            ak.step()
    with ak.open_dump(tmp_path / "d.h5") as dump:
        paths = dump.tensors.groupby("name")["path"].agg(set)
        assert (
            len(paths["encoder_hidden_states"]) == 1 and len(paths["sample"]) == 3
        )  # stored once; what changes, three times
        for step in range(3):
            np.testing.assert_array_equal(dump["unet", step].inputs["encoder_hidden_states"], embeddings)


def test_a_kv_cache_that_grows_a_position_a_step_is_stored_as_its_new_positions(tmp_path):
    """A decoder's cache at each step is the previous one and one position more: the dump
    holds the new positions, and reads back every step whole and exact."""
    rng = np.random.default_rng(0)
    caches = [rng.standard_normal((1, 2, 4, 8)).astype(np.float32)]
    for _ in range(3):
        caches.append(np.concatenate([caches[-1], rng.standard_normal((1, 2, 1, 8)).astype(np.float32)], axis=2))
    with ak.Recorder(tmp_path / "d.h5") as rec:
        decoder = rec.watch(lambda past_key_values: past_key_values * 1, "decoder")
        for cache in caches:
            decoder(cache)
            ak.step()
    with ak.open_dump(tmp_path / "d.h5") as dump:
        paths = [split_row(path) for path in dump.tensors.loc[dump.tensors["io"] == "inputs", "path"]]
        with h5py.File(tmp_path / "d.h5") as f:  # plain h5py: each row holds what it added
            assert [f[path][row].shape for path, row in paths] == [
                (1, 2, 4, 8),
                (1, 2, 1, 8),
                (1, 2, 1, 8),
                (1, 2, 1, 8),
            ]
        for step, cache in enumerate(caches):
            np.testing.assert_array_equal(dump["decoder", step].inputs["past_key_values"], cache)
            np.testing.assert_array_equal(dump["decoder", step].outputs["output"], cache)
        assert list(dump.tensors[dump.tensors["io"] == "inputs"]["shape"]) == [c.shape for c in caches]
    assert ak.compare(tmp_path / "d.h5", tmp_path / "d.h5").verdict == "aligned"
