"""A dump moves from one flush to the next as a whole: a kill at any write leaves one that opens."""

import os

import numpy as np
import pytest

import alignkit as ak
from alignkit.storage import journal, writer
from alignkit.storage.journal import JournaledFile, finish_killed, journal_path


def test_bytes_over_the_committed_file_wait_for_commit_and_read_back_at_once(tmp_path):
    path = tmp_path / "f.bin"
    disk = JournaledFile(path)
    disk.seek(0)
    disk.write(b"A" * 100)
    disk.commit()
    disk.seek(50)
    disk.write(b"B" * 60)  # 50 bytes over the committed file, 10 past its end
    disk.seek(40)
    assert disk.read(30) == b"A" * 10 + b"B" * 20  # what HDF5 wrote is what it reads back
    assert path.read_bytes() == b"A" * 100 + b"B" * 10  # only the fresh bytes are in the file
    disk.commit()
    assert path.read_bytes() == b"A" * 50 + b"B" * 60
    assert journal_path(path).stat().st_size == 0  # emptied once the commit is in the dump
    disk.close()
    assert not journal_path(path).exists()


def test_a_second_recorder_to_the_same_dump_is_refused_in_one_line(tmp_path):
    path = tmp_path / "busy.h5"
    with ak.Recorder(path):
        with pytest.raises(
            ak.UsageError, match="is being written by another recording: give this one another file name"
        ):
            with ak.Recorder(path):
                pass
    with ak.open_dump(path) as d:
        assert d.metadata["complete"]


KINDS = {
    "small": [(4, 3), (2,)],
    "staged": [(512, 1024), (2,)],  # 2 MiB: written into the dump at call time and linked into its call later
}


def _value(shape, step, call):
    return np.full(shape, float(step) * (1 if call == 0 else -1), np.float32)


def _record(path, steps, kind="small"):
    if kind == "layers":
        import torch

        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        with ak.Recorder(path, layers=["net"]) as rec, torch.no_grad():
            rec.watch(net, "net")
            for step in range(steps):
                net(torch.from_numpy(_value((4, 3), step, 0)))
                net(torch.from_numpy(_value((2, 3), step, 1)))
                ak.step()
        return
    with ak.Recorder(path) as rec:
        double = rec.watch(lambda x: x * 2, "double")
        for step in range(steps):
            for call, shape in enumerate(KINDS[kind]):
                double(_value(shape, step, call))
            ak.step()


@pytest.fixture()
def kill_points(monkeypatch, tmp_path):
    """The dump and its journal as a kill would leave them after each write to disk once the
    dump is created, and in the middle of each journal write: each state kept as files in
    ``states/`` (a dump of 2 MiB tensors, copied hundreds of times, does not fit in memory)."""
    folder = tmp_path / "states"
    folder.mkdir()
    states = []
    monkeypatch.setattr(writer, "FLUSH_INTERVAL", 0.0)  # a flush at every step
    pwrite = JournaledFile._pwrite

    def keep(journal_bytes):
        n = len(states)
        (folder / f"{n}.h5").write_bytes(states_source[0].read_bytes())
        if journal_bytes is not None:
            (folder / f"{n}.journal").write_bytes(journal_bytes)
        states.append((folder / f"{n}.h5", folder / f"{n}.journal" if journal_bytes is not None else None))

    states_source = []

    def spy(self, fd, data, offset):
        if not self._committed:  # creating the file: a kill here leaves no calls to keep
            return pwrite(self, fd, data, offset)
        states_source[:] = [self.path]
        if fd == self._journal_fd:
            keep(bytes(data)[: len(data) // 2])
        pwrite(self, fd, data, offset)
        kept = journal_path(self.path)
        keep(kept.read_bytes() if kept.exists() else None)

    monkeypatch.setattr(JournaledFile, "_pwrite", spy)
    return states


@pytest.mark.parametrize("kind", ["small", "staged", "layers"])
def test_a_kill_at_any_write_leaves_a_dump_that_opens_with_its_flushed_calls(tmp_path, kill_points, kind):
    steps = 5 if kind == "small" else 3
    _record(tmp_path / "full.h5", steps, kind)
    full = ak.open_dump(tmp_path / "full.h5")
    assert len(kill_points) > 20
    dump, kept = tmp_path / "killed.h5", journal_path(tmp_path / "killed.h5")
    counts, finished, layers_read = [], 0, 0
    for data, journal_file in kill_points:
        dump.write_bytes(data.read_bytes())
        kept.unlink(missing_ok=True)
        if journal_file is not None:
            kept.write_bytes(journal_file.read_bytes())
        before = dump.read_bytes()
        with ak.open_dump(dump) as d:
            finished += dump.read_bytes() != before
            assert not kept.exists()
            counts.append(len(d))
            for row in d.calls.itertuples():  # by seq: a step boundary not yet flushed keys calls by count
                same = full.calls.set_index("seq").loc[row.seq]
                got, want = d[row.submodel, row.step, row.call], full[same.submodel, same.step, same.call]
                for io in ("inputs", "outputs", "layers"):
                    have = getattr(got, io)
                    assert set(have) <= set(getattr(want, io))
                    for name, value in have.items():  # a call that reads back holds the values it was written with
                        np.testing.assert_array_equal(value, getattr(want, io)[name])
                    layers_read += len(have) if io == "layers" else 0
                if kind != "layers":
                    assert set(got.inputs) == {"x"}
    assert counts == sorted(counts) and counts[-1] == len(full) == 2 * steps  # never fewer calls for a later kill
    assert finished > 0  # some kills fell between a whole journal and the end of its commit
    if kind == "layers":  # the killed dumps' layer groups were read back, not only their calls
        assert len(next(iter(full)).layers) >= 3 and layers_read > 0


def test_the_journal_of_a_live_recording_is_left_to_it(tmp_path):
    path = tmp_path / "live.h5"
    with ak.Recorder(path) as rec:
        rec.watch(lambda x: x, "f")(np.zeros(2))
        journal_path(path).write_bytes(b"not yet whole")
        assert finish_killed(path) is False
        assert journal_path(path).exists()
        with pytest.raises(ak.NotADumpError, match="is open for writing"):  # HDF5 readers meet the recorder's lock
            ak.open_dump(path)
    assert not journal_path(path).exists()


def test_a_whole_journal_finishes_the_commit_and_a_torn_one_does_not(tmp_path):
    path = tmp_path / "f.bin"
    disk = JournaledFile(path)
    disk.write(b"A" * 20)
    disk.commit()
    disk.seek(5)
    disk.write(b"B" * 5)
    disk._write_journal()  # a kill here: the journal is whole, the dump not yet changed
    whole = journal_path(path).read_bytes()
    disk.close()
    assert path.read_bytes() == b"A" * 20
    journal_path(path).write_bytes(whole[:-1])
    assert finish_killed(path) is False and path.read_bytes() == b"A" * 20
    journal_path(path).write_bytes(whole)
    assert finish_killed(path) is True
    assert path.read_bytes() == b"A" * 5 + b"B" * 5 + b"A" * 10
    assert not journal_path(path).exists()


def test_a_killed_dump_that_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "ro.h5"
    _record(path, steps=1)
    journal_path(path).write_bytes(b"whatever a killed recording left")

    class OsThatRefusesToOpen:
        """The journal's own ``os``, whose ``open`` refuses (a read-only folder, without being
        root); the rest of the process keeps the real one."""

        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def open(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(journal, "os", OsThatRefusesToOpen())
    with pytest.raises(
        ak.DumpCorruptError, match=r"killed while it flushed.*remove ro\.h5\.journal \(Permission denied\)"
    ):
        ak.open_dump(path)
