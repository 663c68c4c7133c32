"""Version 2's stacks: rows written a batch at a time across flushes and growths, read back a
block at a time whatever the order, and tensors placed by size."""

import h5py
import numpy as np
import pytest

import alignkit as ak
from alignkit.storage import reader, writer
from alignkit.storage.schema import STACK_MAX_BYTES, split_row


def test_rows_written_over_many_flushes_and_growths_read_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "FLUSH_INTERVAL", 0.0)  # a flush at every step: rows come one batch at a time
    values = [np.full((3, 5), i, np.float32) for i in range(300)]
    with ak.Recorder(tmp_path / "d.h5") as rec:
        f = rec.watch(lambda x, t: x * 2, "f")
        for i, x in enumerate(values):
            f(x, float(i))
            ak.step()
    with ak.open_dump(tmp_path / "d.h5") as dump:
        for i in (0, 1, 77, 128, 299):
            call = dump["f", i]
            np.testing.assert_array_equal(call.inputs["x"], values[i])
            np.testing.assert_array_equal(call.outputs["output"], values[i] * 2)
            assert call.inputs["t"] == float(i) and call.inputs["t"].shape == ()
        stacks = {split_row(p)[0] for p in dump.tensors["path"]}
    with h5py.File(tmp_path / "d.h5") as f:
        assert {f[s].shape[0] for s in stacks} == {300}  # grown as needed, cut to its rows at the end


def test_rows_read_in_any_order_from_many_stacks_with_little_room(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "ROW_CACHE_BYTES", 4096)
    monkeypatch.setattr(reader, "ROW_BLOCK_BYTES", 1024)
    rng = np.random.default_rng(0)
    calls = [{f"t{j}": rng.standard_normal(40).astype(np.float32) for j in range(6)} for _ in range(50)]
    with ak.Recorder(tmp_path / "d.h5") as rec:
        f = rec.watch(lambda **tensors: None, "f")
        for tensors in calls:
            f(**tensors)
            ak.step()
    order = [(i, j) for i in range(50) for j in range(6)]
    rng.shuffle(order)
    with ak.open_dump(tmp_path / "d.h5") as dump:
        for i, j in order + order[::-1]:
            np.testing.assert_array_equal(dump["f", i].tensor("inputs", f"t{j}"), calls[i][f"t{j}"])


def test_tensors_are_placed_by_size_and_shape(tmp_path):
    big = np.zeros(STACK_MAX_BYTES // 4, np.float32)
    with ak.Recorder(tmp_path / "d.h5") as rec:
        f = rec.watch(lambda x: None, "f")
        for x in (np.ones(4, np.float32), np.ones(5, np.float32), big, big + 1, np.ones(0, np.float32)):
            f(x)
            ak.step()
    with ak.open_dump(tmp_path / "d.h5") as dump:
        paths = list(dump.tensors["path"])
        assert [p.split("/")[1].split("#")[0] for p in paths] == ["stacks", "stacks", "data", "data", "data"]
        assert len({split_row(p)[0] for p in paths[:2]}) == 2  # another shape: a stack of its own
        assert dump.is_whole(paths[2]) and not dump.is_whole(paths[0])
        np.testing.assert_array_equal(dump["f", 3].inputs["x"], big + 1)
        assert dump["f", 4].inputs["x"].shape == (0,)
        with pytest.raises(ValueError, match="row 0 of a stack"):
            dump.dataset(paths[0])
