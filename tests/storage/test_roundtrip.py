"""Fuzzing: whatever is recorded reads back with the same names, dtypes, shapes and bytes."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import alignkit as ak

DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int32, np.uint8, np.bool_]
names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)
tensors = st.sampled_from(DTYPES).flatmap(
    lambda dt: arrays(dt, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(names, tensors, min_size=1, max_size=5))
def test_dump_round_trip(tmp_path, feed):
    path = tmp_path / "rt.h5"
    with ak.Recorder(path) as rec:
        rec.watch(lambda args: None, "engine")(feed)
    with ak.open_dump(path) as d:
        call = next(iter(d))
        got = call.inputs
        assert list(got) == list(feed)
        for name, value in feed.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape
            assert got[name].tobytes() == np.ascontiguousarray(value).tobytes()


def test_bfloat16_and_odd_tensors_round_trip(tmp_path):
    x = torch.tensor([1.5, -2.25, float("nan"), float("inf")], dtype=torch.bfloat16)
    empty = np.zeros((0, 3), np.float32)
    with ak.Recorder(tmp_path / "odd.h5") as rec:
        rec.watch(lambda a, b, c: None, "m")(x, empty, np.float32(3))
    with ak.open_dump(tmp_path / "odd.h5") as d:
        call = next(iter(d))
        np.testing.assert_array_equal(call.inputs["a"], x.float().numpy())
        assert call.inputs["b"].shape == (0, 3) and call.inputs["c"].shape == ()


def test_zero_size_and_nonfinite_tensors_compare(tmp_path):
    for path, bad in ((tmp_path / "r.h5", 1.0), (tmp_path / "t.h5", np.nan)):
        with ak.Recorder(path) as rec:
            rec.watch(lambda a, b: {"y": b}, "m")(np.zeros((0, 4), np.float32), np.array([1.0, bad, np.inf]))
    result = ak.compare(tmp_path / "r.h5", tmp_path / "t.h5")
    rows = result.table.set_index(["io", "tensor"])
    assert rows.loc[("inputs", "a"), "status"] == "ok"
    assert rows.loc[("outputs", "y"), "status"] == "nonfinite"
    assert result.first_divergence.kind == "input mismatch"
    assert any("NaN/Inf first appear in the target only" in w for w in result.warnings)
