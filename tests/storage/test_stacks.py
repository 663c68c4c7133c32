"""Version 2's stacks: rows written a batch at a time across flushes and growths, read back a
block at a time whatever the order, and tensors placed by size."""

import h5py
import numpy as np
import pytest

import alignkit as ak
from alignkit.storage import layouts, writer
from alignkit.storage.schema import STACK_MAX_BYTES, split_row


def _record_x(path, feeds, **options):
    """``f(x)`` once a step for each of ``feeds``."""
    with ak.Recorder(path, **options) as rec:
        f = rec.watch(lambda x: None, "f")
        for x in feeds:
            f(x)
            ak.step()
    return path


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
    monkeypatch.setattr(layouts, "ROW_CACHE_BYTES", 4096)
    monkeypatch.setattr(layouts, "ROW_BLOCK_BYTES", 1024)
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
    strided = np.ones(STACK_MAX_BYTES // 2, np.float32)[::2]  # exactly STACK_MAX_BYTES, copied (not staged)
    feeds = (
        np.ones(4, np.float32),
        np.ones(5, np.float32),
        big,
        big + 1,
        np.ones(0, np.float32),
        -strided[:-1],
        strided,
    )
    _record_x(tmp_path / "d.h5", feeds)
    with ak.open_dump(tmp_path / "d.h5") as dump:
        paths = list(dump.tensors["path"])
        kinds = ["stacks", "stacks", "data", "data", "data", "stacks", "data"]
        assert [p.split("/")[1].split("#")[0] for p in paths] == kinds
        assert len({split_row(p)[0] for p in paths[:2]}) == 2  # another shape: a stack of its own
        assert dump.is_whole(paths[2]) and not dump.is_whole(paths[0])
        np.testing.assert_array_equal(dump["f", 3].inputs["x"], big + 1)
        assert dump["f", 4].inputs["x"].shape == (0,)
        with pytest.raises(ValueError, match="row 0 of a stack"):
            dump.dataset(paths[0])
    with h5py.File(tmp_path / "d.h5") as f:  # a chunk holds about 4 KiB of small rows
        assert f[split_row(paths[0])[0]].chunks == (256, 4)


def test_large_rows_written_in_one_batch_land_each_in_its_place(tmp_path, monkeypatch):
    """Rows of 64 KiB and more are written one by one, straight from their arrays."""
    monkeypatch.setattr(writer, "FLUSH_INTERVAL", 60.0)  # every call in one batch, at close
    values = [np.full((32, 1024), i, np.float32) for i in range(5)]  # 128 KiB each
    _record_x(tmp_path / "d.h5", values)
    with ak.open_dump(tmp_path / "d.h5") as dump:
        for i, x in enumerate(values):
            np.testing.assert_array_equal(dump["f", i].inputs["x"], x)


def test_the_same_bytes_in_another_shape_are_stored_again(tmp_path):
    """A reshape of the same values is not the previous tensor: it keeps its own shape."""
    flat = np.arange(6, dtype=np.float32)
    with ak.Recorder(tmp_path / "d.h5") as rec:
        f = rec.watch(lambda x: None, "f")
        for shape in ((2, 3), (3, 2), (3, 2)):
            f(flat.reshape(shape))
            ak.step()
    with ak.open_dump(tmp_path / "d.h5") as dump:
        assert [dump["f", i].inputs["x"].shape for i in range(3)] == [(2, 3), (3, 2), (3, 2)]
        assert len(set(dump.tensors["path"])) == 2  # the third is the second's row


def test_a_statistics_sample_equal_to_the_previous_keeps_its_own_figures(tmp_path):
    """Two tensors may differ only where nothing is sampled: each keeps its statistics."""
    first = np.zeros(1000, np.float32)
    second = first.copy()
    second[1] = np.nan  # between two sampled positions
    _record_x(tmp_path / "d.h5", (first, second), mode="stats")
    with ak.open_dump(tmp_path / "d.h5") as dump:
        stats = [dump.stats(dump["f", i].info("inputs")[0].path) for i in range(2)]
        assert [s["stats_nan"] for s in stats] == [0, 1]
        assert stats[0]["stats_checksum"] != stats[1]["stats_checksum"]


def test_non_tensor_arguments_and_results_are_kept_per_side(tmp_path):
    with ak.Recorder(tmp_path / "d.h5") as rec:
        f = rec.watch(lambda x, mode="fast": {"y": x, "note": f"ran {mode}"}, "f")
        f(np.ones(2), mode="slow")
    with ak.open_dump(tmp_path / "d.h5") as dump:
        assert dump["f", 0].values("inputs") == {"mode": "slow"}
        assert dump["f", 0].values("outputs") == {"note": "ran slow"}


def test_a_tensor_with_its_own_spread_is_never_shared(tmp_path):
    """``record --repeat`` keeps each tensor's spread in its row: equal values of two calls
    still carry their own."""
    from alignkit.storage.records import CallRecord, Tensor
    from alignkit.storage.writer import DumpWriter

    writer_ = DumpWriter(tmp_path / "d.h5", {"repeat": "{}"})
    for seq, spread in enumerate((0.01, 0.02)):
        x = Tensor(
            "x", np.ones(3, np.float32), "float32", "torch", spread={"spread_rel_l1": spread, "spread_cos_dist": 0.0}
        )
        writer_.put(CallRecord(seq, "f", seq, 0, seq, inputs=[x]))
    writer_.close()
    with ak.open_dump(tmp_path / "d.h5") as dump:
        spreads = [dump.tensor_attrs(dump["f", i].info("inputs")[0].path)["spread_rel_l1"] for i in range(2)]
        assert spreads == [0.01, 0.02]
