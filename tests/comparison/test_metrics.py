"""Each metric against an independent float64 computation, plus properties."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from alignkit.comparison.metrics import BLOCK_ELEMENTS, array_metrics, iter_blocks


def reference_metrics(r, t):
    r, t = np.asarray(r, np.float64).ravel(), np.asarray(t, np.float64).ravel()
    d = t - r
    cos = float(np.dot(r, t) / (np.linalg.norm(r) * np.linalg.norm(t)))
    return {
        "l1": float(np.mean(np.abs(d))),
        "rel_l1": float(np.abs(d).sum() / np.abs(r).sum()),
        "max_abs": float(np.abs(d).max()),
        "cos": cos,
        "rmse": float(np.sqrt(np.mean(d * d))),
        "sqnr_db": float(10 * np.log10(np.sum(r * r) / np.sum(d * d))),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metrics_match_an_independent_float64_computation(dtype):
    rng = np.random.default_rng(0)
    r = rng.standard_normal(BLOCK_ELEMENTS * 2 + 17).astype(dtype)  # spans several blocks
    t = (r + rng.standard_normal(r.size).astype(dtype) * 0.01).astype(dtype)
    got, want = array_metrics(r, t), reference_metrics(r, t)
    # float32 tensors are computed in float32 blocks (float64 sums): six significant digits, float32's own
    rel = 1e-6 if dtype == np.float32 else 1e-12
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel), key


def test_float32_blocks_keep_the_cosine_of_nearly_equal_tensors():
    """A float32 target a few ulps from its reference: the norm gap is summed as Σ(t − r)(t + r),
    so 1 − cos keeps its digits where Σt² − Σr², each summed in float32, would have none."""
    rng = np.random.default_rng(5)
    r = rng.standard_normal(BLOCK_ELEMENTS + 3).astype(np.float32)
    t = (r * np.float32(1 + 2**-20)).astype(np.float32)  # scaled: the same direction, cos_dist near 0
    r64, t64 = r.astype(np.float64), t.astype(np.float64)
    d = t64 - r64
    nr, nt = np.linalg.norm(r64), np.linalg.norm(t64)
    want = (np.dot(d, d) - (nt - nr) ** 2) / (2 * nr * nt)
    assert abs(array_metrics(r, t)["cos_dist"] - want) < 1e-13
    noisy = (r + rng.standard_normal(r.size).astype(np.float32) * np.float32(1e-4)).astype(np.float32)
    assert array_metrics(r, noisy)["cos_dist"] == pytest.approx(
        array_metrics(r64, noisy.astype(np.float64))["cos_dist"], rel=1e-4
    )


def test_a_block_with_nan_or_float32_overflow_is_widened():
    r = np.full(1000, 3e38, np.float32)
    t = (-r).astype(np.float32)  # t − r overflows float32; in float64 it is finite
    m = array_metrics(r, t)
    assert m["max_abs"] == pytest.approx(6e38, rel=1e-6) and m["cos"] == pytest.approx(-1.0)
    r2 = np.ones(10, np.float32)
    t2 = r2.copy()
    t2[3] = np.nan
    m2 = array_metrics(r2, t2)
    assert m2["nan_tgt"] == 1 and m2["nonfinite_mismatch"] == 1 and m2["l1"] == 0.0


def test_cos_resolves_nearly_identical_tensors():
    rng = np.random.default_rng(1)
    r = rng.standard_normal(100_000)
    t = r * (1 + 1e-9 * rng.standard_normal(r.size))
    got = array_metrics(r, t)["cos_dist"]
    d = t - r  # 1 − cos = ‖d‖²/(2‖r‖‖t‖) − (‖r‖−‖t‖)²/(2‖r‖‖t‖), evaluated in high precision
    nr, nt = np.linalg.norm(r), np.linalg.norm(t)
    want = (np.dot(d, d) - (nr - nt) ** 2) / (2 * nr * nt)
    assert got > 0
    assert got == pytest.approx(want, rel=1e-3)
    naive = 1 - float(
        np.dot(r.astype(np.float32), t.astype(np.float32))
        / (np.linalg.norm(r.astype(np.float32)) * np.linalg.norm(t.astype(np.float32)))
    )
    assert abs(naive - want) > abs(got - want)  # the float32 textbook formula is far off


def test_zero_and_nan_cases_are_defined():
    z = np.zeros(10)
    assert array_metrics(z, z)["cos"] == 1.0 and array_metrics(z, z)["rel_l1"] == 0.0
    assert array_metrics(z, np.ones(10))["cos"] == 0.0
    assert array_metrics(z, np.ones(10))["rel_l1"] == math.inf
    r = np.array([1.0, np.nan, 3.0, np.inf])
    t = np.array([1.0, np.nan, np.nan, np.inf])
    m = array_metrics(r, t)
    assert (m["nan_ref"], m["nan_tgt"], m["inf_ref"], m["inf_tgt"]) == (1, 2, 1, 1)
    assert m["nonfinite_mismatch"] == 1 and m["l1"] == 0.0


def test_noise_floor_of_a_lower_precision_target():
    rng = np.random.default_rng(2)
    r = rng.standard_normal(4096).astype(np.float32)
    m = array_metrics(r, r.astype(np.float16).astype(np.float32), floor_dtype="float16")
    assert m["rel_l1"] == pytest.approx(m["floor_rel_l1"])
    mb = array_metrics(r, r, floor_dtype="bfloat16")
    bf16 = (r.view(np.uint32) + 0x7FFF + ((r.view(np.uint32) >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    expected = np.abs(bf16.view(np.float32).astype(np.float64) - r).sum() / np.abs(r.astype(np.float64)).sum()
    assert mb["floor_rel_l1"] == pytest.approx(expected, rel=1e-6)  # float32 blocks, float64 sums


def _cos_dist(r, t):
    """1 − cos in float64, in the difference form that keeps its digits near cos = 1."""
    r, t = np.asarray(r, np.float64).ravel(), np.asarray(t, np.float64).ravel()
    nr, nt = np.linalg.norm(r), np.linalg.norm(t)
    return (np.dot(t - r, t - r) - (nt - nr) ** 2) / (2 * nr * nt)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sums_over_many_blocks_match_float64(dtype):
    """Each block's sums add to the whole tensor's: the norm gap (which 1 − cos of a scaled
    target rests on) and the dot product (which cos far from 1 rests on) included."""
    rng = np.random.default_rng(7)
    r = rng.standard_normal(BLOCK_ELEMENTS * 2 + 5).astype(dtype)
    scaled = (r * 1.01 + rng.standard_normal(r.size) * 1e-3).astype(dtype)
    assert array_metrics(r, scaled)["cos_dist"] == pytest.approx(_cos_dist(r, scaled), rel=1e-4)
    other = (rng.standard_normal(r.size) - r).astype(dtype)  # cos near −0.7: the dot-product form
    want = np.dot(r.astype(np.float64), other) / (np.linalg.norm(r.astype(np.float64)) * np.linalg.norm(other))
    # float32 blocks keep about six digits of the dot product, float32's own
    assert array_metrics(r, other)["cos"] == pytest.approx(want, abs=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("floor", ["float16", "bfloat16"])
def test_the_noise_floor_over_many_blocks_matches_float64(floor):
    """The floor is the reference against itself rounded to the target's dtype, over every
    block; a value beyond float16's range is kept (its overflow is no rounding noise)."""
    import torch

    rng = np.random.default_rng(8)
    r = rng.standard_normal(BLOCK_ELEMENTS * 2 + 5).astype(np.float32) * 3
    if floor == "float16":
        r[:: BLOCK_ELEMENTS // 2] = 1e5  # past float16's 65504, in every block
    q = torch.from_numpy(r).to(getattr(torch, floor)).double().numpy()  # float16 overflows to inf
    q = np.where(np.isfinite(q), q, r)
    m = array_metrics(r, r, floor_dtype=floor)
    r64 = r.astype(np.float64)
    assert m["floor_rel_l1"] == pytest.approx(np.abs(q - r64).sum() / np.abs(r64).sum(), rel=1e-6)
    assert m["floor_cos_dist"] == pytest.approx(_cos_dist(r64, q), rel=1e-4)


def test_the_noise_floor_is_undefined_only_where_nothing_is_finite_on_both_sides():
    r = np.linspace(1, 2, 8, dtype=np.float32)
    none = array_metrics(r, np.full(8, np.nan, np.float32), floor_dtype="float16")
    assert math.isnan(none["floor_rel_l1"]) and math.isnan(none["floor_cos_dist"])
    t = np.full(8, np.nan, np.float32)
    t[3] = r[3]
    one = array_metrics(r, t, floor_dtype="float16")  # one element finite on both sides: measured
    q = np.float64(np.float16(r[3]))
    assert one["floor_rel_l1"] == pytest.approx(abs(q - r[3]) / r[3]) and one["floor_cos_dist"] == 0.0


def test_nothing_finite_on_both_sides_measures_nothing_and_keeps_the_counts():
    r = np.linspace(1, 2, 8, dtype=np.float32)
    m = array_metrics(r, np.full(8, np.inf, np.float32))
    assert all(math.isnan(m[k]) for k in ("l1", "rel_l1", "max_abs", "cos", "cos_dist", "rmse", "sqnr_db"))
    assert (m["nan_ref"], m["nan_tgt"], m["inf_ref"], m["inf_tgt"], m["nonfinite_mismatch"]) == (0, 0, 0, 8, 8)
    empty = array_metrics(np.zeros(0, np.float32), np.zeros(0, np.float32))  # nothing to measure, nothing off
    assert (empty["l1"], empty["rmse"], empty["max_abs"], empty["cos"]) == (0.0, 0.0, 0.0, 1.0)


def test_large_float32_blocks_widen_nan_and_float32_overflow_without_warnings():
    """Blocks past the small path: a NaN on the reference's side only, and values whose squares
    overflow float32 although they are equal, are summed in float64 instead, silently."""
    r = np.linspace(-1, 1, 5000, dtype=np.float32)
    t = r.copy()
    r[7] = np.nan
    huge = np.full(5000, 3e38, np.float32)
    both_inf = r.copy()
    both_inf[7] = np.inf  # inf − inf in the block's difference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m, h, o = array_metrics(r, t), array_metrics(huge, huge.copy()), array_metrics(huge, -huge)
        i = array_metrics(both_inf, both_inf.copy())
    assert m["nan_ref"] == 1 and m["nonfinite_mismatch"] == 1 and m["l1"] == 0.0 and m["cos"] == 1.0
    assert h["cos"] == 1.0 and h["rel_l1"] == 0.0 and h["sqnr_db"] == math.inf
    assert o["max_abs"] == pytest.approx(6e38, rel=1e-6) and o["cos"] == -1.0  # t − r overflows float32
    assert i["inf_ref"] == i["inf_tgt"] == 1 and i["nonfinite_mismatch"] == 0 and i["l1"] == 0.0


# Tensors reach alignkit as float32 or narrower: their squares stay normal in float64.
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=200, deadline=None)
@example(
    np.array([382.97772216796875]), np.array([2.0**-23])
)  # norms 1e9 apart: the difference form of 1 − cos cancels
@given(arrays(np.float64, st.integers(1, 50), elements=finite), arrays(np.float64, st.integers(1, 50), elements=finite))
def test_properties(a, b):
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    ab, ba, aa = array_metrics(a, b), array_metrics(b, a), array_metrics(a, a)
    assert ab["cos"] == pytest.approx(ba["cos"], abs=1e-12)
    assert ab["l1"] == pytest.approx(ba["l1"]) and ab["max_abs"] == ba["max_abs"]
    assert aa["l1"] == 0.0 and aa["cos"] == 1.0
    assert -1e-12 <= ab["cos_dist"] <= 2 + 1e-12
    scaled = array_metrics(a * 4.0, b * 4.0)
    assert scaled["cos"] == pytest.approx(ab["cos"], abs=1e-9)
    assert scaled["l1"] == pytest.approx(4 * ab["l1"])
    if np.abs(a).sum() > 0:
        assert scaled["rel_l1"] == pytest.approx(ab["rel_l1"])


def test_blocks_cover_the_dataset_in_order(tmp_path):
    import h5py

    data = np.arange(2 * 3 * 50_000, dtype=np.float32).reshape(2, 3, 50_000)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        ds = f.create_dataset("x", data=data)
        blocks = [b.copy() for b in iter_blocks(ds, max_elements=40_000)]  # each block is valid until the next
        assert all(b.size <= 50_000 for b in blocks)
        np.testing.assert_array_equal(np.concatenate([b.ravel() for b in blocks]), data.ravel())


def test_complex_tensors_compare_both_parts():
    rng = np.random.default_rng(5)
    r = (rng.standard_normal(50) + 1j * rng.standard_normal(50)).astype(np.complex64)
    conj = array_metrics(r, np.conj(r))  # equal real parts, opposite imaginary parts
    assert conj["max_abs"] == pytest.approx(2 * np.abs(r.imag).max(), rel=1e-6) and conj["cos"] < 0.5
    want = reference_metrics(np.stack([r.real, r.imag], -1), np.stack([r.real * 1.01, r.imag * 1.01], -1))
    got = array_metrics(r, r * np.float32(1.01))
    for key in ("l1", "rel_l1", "max_abs", "cos", "rmse"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert array_metrics(r.real.astype(np.complex64), r.real)["max_abs"] == 0  # a real side has an imaginary part of 0
    for ref, tgt in ((r, r.real), (r.real, r)):  # one side complex: the other's imaginary part of 0 is compared
        dropped = array_metrics(ref, tgt)
        assert dropped["max_abs"] == pytest.approx(np.abs(r.imag).max(), rel=1e-6) and dropped["cos"] < 0.9


def test_same_size_other_shape_and_split_parts_stream_to_the_same_metrics(tmp_path):
    """``[1, N]`` against ``[N]`` (an export that drops a batch axis), and a batch split into
    parts, streamed as flat blocks of unequal cut: the same figures as in memory."""
    import h5py

    from alignkit.comparison.metrics import BLOCK_ELEMENTS, array_metrics, dataset_metrics

    rng = np.random.default_rng(3)
    n = 3 * BLOCK_ELEMENTS + 17
    r = rng.standard_normal((2, n)).astype(np.float32)
    t = (r + 1e-3 * rng.standard_normal(r.shape)).astype(np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["r"], f["t_flat"] = r, t.reshape(-1)
        f["t0"], f["t1"] = t[:1], t[1:]
        f["r3"] = r.reshape(2, 1, n)
        want = array_metrics(r, t, "bfloat16")
        for got in (
            dataset_metrics(f["r"], f["t_flat"], "bfloat16"),
            dataset_metrics(f["r3"], f["t_flat"], "bfloat16"),
            dataset_metrics(f["r"], [f["t0"], f["t1"]], "bfloat16"),
        ):
            for key in ("l1", "rel_l1", "max_abs", "cos_dist", "rmse", "floor_rel_l1"):
                assert got[key] == pytest.approx(want[key], rel=1e-6), key  # cut otherwise: float32's digits


def test_nan_and_inf_counts_add_up_over_streamed_blocks(tmp_path):
    """Counts are summed block by block, not taken from the last block."""
    import h5py

    from alignkit.comparison.metrics import BLOCK_ELEMENTS, dataset_metrics

    r = np.ones(3 * BLOCK_ELEMENTS, np.float32)
    t = r.copy()
    for block in range(3):  # a NaN and an Inf on each side, in every block
        r[block * BLOCK_ELEMENTS] = np.nan
        t[block * BLOCK_ELEMENTS + 1] = np.nan
        t[block * BLOCK_ELEMENTS + 2] = np.inf
        r[block * BLOCK_ELEMENTS + 3] = -np.inf
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["r"], f["t"] = r, t
        m = dataset_metrics(f["r"], f["t"], None)
    assert (m["nan_ref"], m["nan_tgt"], m["inf_ref"], m["inf_tgt"]) == (3, 3, 3, 3)
    assert m["nonfinite_mismatch"] == 12
