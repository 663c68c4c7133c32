"""``record --mode stats``: statistics and a sample per tensor; a stats comparison finds the
same first divergence as the full one, and ``--full-at`` zooms in."""

import numpy as np
import pytest
import torch

import alignkit as ak
from alignkit.demo import record_demo_pair
from alignkit.recording.stats import SAMPLE, capture_stats


def test_statistics_of_numpy_and_torch_tensors_agree_and_sample_the_same_positions():
    x = np.random.default_rng(0).standard_normal((4, 1000)).astype(np.float32)
    x[0, 0], x[1, 1] = np.nan, np.inf
    a, b = capture_stats("x", x), capture_stats("x", torch.from_numpy(x))
    assert a.full_shape == b.full_shape == (4, 1000) and a.data.shape == b.data.shape == (SAMPLE,)
    np.testing.assert_array_equal(a.data, b.data)
    assert capture_stats("small", np.ones(8, np.float32)).stats is None  # no larger than a sample: kept whole
    assert a.stats["stats_checksum"] == b.stats["stats_checksum"]  # the same bits, on either side
    assert (a.stats["stats_nan"], a.stats["stats_inf"]) == (1, 1)
    finite = x[np.isfinite(x)].astype(np.float64)
    assert a.stats["stats_max"] == pytest.approx(finite.max()) and b.stats["stats_mean"] == pytest.approx(finite.mean())
    y = x.copy()
    y[3, 999] += 1
    assert capture_stats("y", y).stats["stats_checksum"] != a.stats["stats_checksum"]


def test_statistics_of_values_whose_squares_pass_float32s_range_are_finite():
    x = np.full(2000, 1e20, np.float32)  # finite, but 1e40 overflows float32
    x[5] = -3e20
    for value in (x, torch.from_numpy(x)):
        stats = capture_stats("x", value).stats
        want = np.sqrt(np.square(x.astype(np.float64)).sum())
        assert (stats["stats_nan"], stats["stats_inf"]) == (0, 0)
        assert stats["stats_l2"] == pytest.approx(want, rel=1e-6) and np.isfinite(stats["stats_std"])


@pytest.mark.parametrize("bug", ["timestep", "weights", "none"])
def test_a_stats_comparison_finds_the_same_first_divergence_as_the_full_one(tmp_path, bug):
    full = ak.compare(*record_demo_pair(bug, 6, tmp_path / "full"))
    stats_pair = record_demo_pair(bug, 6, tmp_path / "stats", mode="stats")
    stats = ak.compare(*stats_pair)
    assert stats.verdict == full.verdict
    if bug != "none":
        f, s = full.first_divergence, stats.first_divergence
        assert (s.submodel, s.step, s.kind) == (f.submodel, f.step, f.kind)
        assert stats.table["estimate"].eq(True).any()
        assert f'--full-at "{s.submodel}:{s.step}"' in stats.summary()
    full_bytes = sum(p.stat().st_size for p in (tmp_path / "full").glob("*.h5"))
    stats_bytes = sum(p.stat().st_size for p in stats_pair)
    assert stats_bytes < full_bytes


def test_full_at_records_the_named_calls_in_full_and_compares_them_exactly(tmp_path):
    ref, tgt = record_demo_pair("timestep", 6, tmp_path, mode="stats", full_at="unet:1-2")
    with ak.open_dump(ref) as dump:
        unet = dump.tensors[(dump.tensors["submodel"] == "unet") & (dump.tensors["name"] == "sample")]
        stats_steps = [int(s) for s, p in zip(unet["step"], unet["path"]) if dump.is_stats(p)]
        assert stats_steps == [0, 3, 4, 5]
    result = ak.compare(ref, tgt)
    rows = result.table[(result.table["submodel"] == "unet") & (result.table["step"] == 1)]
    assert not rows["estimate"].fillna(False).any()  # the zoomed-in calls: full figures
    assert result.first_divergence.step == 1 and result.first_divergence.tensor == "timestep"


def test_against_a_reference_keeps_full_tensors_only_where_the_runs_part(tmp_path):
    ref, _ = record_demo_pair("none", 6, tmp_path / "ref")
    _, tgt = record_demo_pair("timestep", 6, tmp_path / "tgt", against=ref)
    with ak.open_dump(tgt) as dump:
        assert dump.metadata["mode"] == "stats" and dump.metadata["against"]["full_calls"] > 0
        steps_in_full = sorted({int(row.step) for row in dump.tensors.itertuples() if not dump.is_stats(row.path)})
        stats_steps = sorted({int(row.step) for row in dump.tensors.itertuples() if dump.is_stats(row.path)})
        assert 0 in stats_steps  # step 0 agrees with the reference: statistics only
    result = ak.compare(ref, tgt)
    full = ak.compare(*record_demo_pair("timestep", 6, tmp_path / "full"))
    fd, want = result.first_divergence, full.first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == (want.submodel, want.step, want.tensor, want.kind)
    assert want.step in steps_in_full  # where they part, the full tensors


def test_options_that_would_do_nothing_are_refused(tmp_path):
    from alignkit.errors import UsageError

    with pytest.raises(UsageError, match="give --mode stats too"):
        ak.Recorder(tmp_path / "x.h5", full_at="unet:1")
    with pytest.raises(UsageError, match="--layer-depth limits --layers"):
        ak.Recorder(tmp_path / "x.h5", layer_depth=2)
