"""Dumps of format version 1 (a group per call) read as they did: tensors, arguments, errors,
bfloat16, hard-linked repeats, grown KV caches, statistics, and a killed run's groups. The
files were written by the version-1 writer (``data/make_v1.py`` says how)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import alignkit as ak
from alignkit.comparison import compare

DATA = Path(__file__).parent / "data"


@pytest.fixture()
def full():
    with ak.open_dump(DATA / "v1_full.h5") as dump:
        yield dump


def test_a_version_1_dump_reads_its_calls_and_tensors(full):
    assert full.metadata["format_version"] == 1
    assert list(full.calls["step"]) == [0, 1, 2, 3] and full.submodels == ["my/model"]
    call = full["my/model", 1]
    np.testing.assert_array_equal(call.inputs["sample"], np.full((2, 3), 1.0, np.float32))  # bfloat16, widened
    assert call.info("inputs")[0].dtype == "bfloat16"
    assert call.source("inputs", "timestep") == "python" and call.inputs["timestep"] == 1.5
    assert call.values("inputs") == {"mode": "fast"}
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(call.inputs["encoder_hidden_states"], emb)  # a hard link to call 0's
    np.testing.assert_array_equal(call.outputs["out/put"], np.full((2, 3), 2.0 + emb.sum(), np.float32))
    assert full["my/model", 2].error == "ValueError: planted" and full["my/model", 1].error is None


def test_a_version_1_grown_cache_reads_whole(full):
    for step in range(4):
        past = full["my/model", step].inputs["past"]
        assert past.shape == (1, 2, step + 1, 3)
        np.testing.assert_array_equal(past[0, 0, :, 0], np.arange(1, step + 2, dtype=np.float32))
    assert not full.is_whole(full["my/model", 3].info("inputs")[3].path)


def test_a_version_1_statistics_dump_compares_with_itself():
    with ak.open_dump(DATA / "v1_stats.h5") as dump:
        path = dump["net", 0].info("layers")[0].path
        assert dump.is_stats(path) and not dump.is_whole(path)
        assert dump.stats(path)["stats_nan"] == 0 and dump["net", 0].info("layers")[0].shape == (5, 256)
    result = compare(DATA / "v1_stats.h5", DATA / "v1_stats.h5")
    assert result.verdict == "aligned" and result.table["estimate"].eq(True).sum() == 12


def test_a_killed_version_1_run_lists_its_calls_from_their_groups():
    with ak.open_dump(DATA / "v1_killed.h5") as dump:
        assert not dump.metadata["complete"] and len(dump) == 3
        np.testing.assert_array_equal(dump["f", 2].outputs["output"], np.full(4, 3.0, np.float32))


def test_a_version_1_dump_compares_with_a_version_2_one(tmp_path):
    """A reference recorded before the layout changed still serves as one: the same run,
    recorded with today's writer, compares with it exactly."""
    spec = importlib.util.spec_from_file_location("make_v1", DATA / "make_v1.py")
    make_v1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_v1)
    make_v1.record_full(tmp_path / "v2.h5", label="v2")
    result = compare(DATA / "v1_full.h5", tmp_path / "v2.h5")
    assert result.verdict == "aligned", result.summary()
    assert (result.table["max_abs"].fillna(0) == 0).all()
