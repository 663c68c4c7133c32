"""The sentences the diagnosis writes, pinned word for word: they are what the user reads."""

import pandas as pd
import pytest

from alignkit.comparison.diagnosis import _independent_draws, _values_text, growth_text, nonfinite_text


@pytest.mark.parametrize(
    ("evidence", "text"),
    [
        (
            {"numel": 1000, "nan_tgt": 10, "inf_tgt": 2, "nan_ref": 0, "inf_ref": 5, "rel_l1": 0.5, "cos": 0.9},
            "1% NaN in the target, 0.2% Inf in the target, 0.5% Inf in the reference; over the rest rel_l1 0.5, "
            "cos 0.900000000",
        ),
        ({"numel": 8, "nan_ref": 8, "rel_l1": 0.25}, "100% NaN in the reference; over the rest rel_l1 0.25, cos nan"),
        ({"nan_tgt": 3, "inf_ref": 4, "rel_l1": float("nan")}, "n/a: 3 NaN in the target, 4 Inf in the reference"),
        ({"numel": 0, "inf_tgt": 1}, "n/a: 1 Inf in the target"),
        ({}, "n/a: NaN/Inf on one side"),
    ],
    ids=["shares", "one-side", "counts-without-numel", "empty-tensor", "no-counts"],
)
def test_nonfinite_text_gives_shares_of_the_tensor_and_the_metrics_of_the_rest(evidence, text):
    assert nonfinite_text(evidence) == text


FINAL_VAE = {"submodel": "vae", "step": 4, "l1": 0.2, "rel_l1": 0.05, "cos": 0.99}


@pytest.mark.parametrize(
    ("growth", "text"),
    [
        (
            {
                "submodel": "scheduler",
                "steps": [1, 2, 3, 4],
                "l1": [0.1, 0.5, 0.4, 0.3],
                "factor": 5.0,
                "final": FINAL_VAE,
            },
            "scheduler output L1 0.1 at step 1 → 0.3 at step 4 (peak 0.5 at step 2), ×5 the first divergent step's; "
            "the final output (vae, step 4) has rel_l1 0.05, cos 0.990000",
        ),
        (
            {"submodel": "scheduler", "steps": [1, 2, 3], "l1": [0.1, 0.31, 0.3], "factor": 1.5},
            "scheduler output L1 0.1 at step 1 → 0.3 at step 3, ×1.5 the first divergent step's",
        ),
        (
            {
                "submodel": "scheduler",
                "steps": [1, 2],
                "l1": [0.1, 0.104],
                "factor": 1.04,
                "final": {"submodel": "scheduler", "step": 2, "l1": 0.104, "rel_l1": 0.01, "cos": 0.999},
            },
            "scheduler output L1 0.1 at step 1 → 0.104 at step 2",
        ),
        (
            {
                "submodel": "scheduler",
                "steps": [1, 2, 3, 4],
                "l1": [0.1, 0.5, 0.49, 0.45],
                "factor": 1.05,
                "final": {"submodel": "scheduler", "step": 4, "l1": 0.45, "rel_l1": 0.1, "cos": 0.9},
            },
            "scheduler output L1 0.1 at step 1 → 0.45 at step 4 (peak 0.5 at step 2)",
        ),
        (
            {"submodel": "scheduler", "steps": [1, 2, 3], "l1": [0.1, 0.5, 0.3], "factor": 5.0},
            "scheduler output L1 0.1 at step 1 → 0.3 at step 3 (peak 0.5 at step 2), ×5 the first divergent step's",
        ),
        ({"submodel": "scheduler", "steps": [3], "l1": [0.2], "factor": 1.0}, "scheduler output L1 0.2 at step 3"),
        (
            {"submodel": "scheduler", "steps": [1, 2], "l1": [0.0, 0.0], "final": {**FINAL_VAE, "step": 2, "l1": 0.0}},
            "none — every output from there on matches exactly (L1 0)",
        ),
        (
            {"submodel": "scheduler", "steps": [1, 2], "l1": [0.0, 0.0], "final": {**FINAL_VAE, "step": 2}},
            "scheduler output L1 0 at step 1 → 0 at step 2; the final output (vae, step 2) has rel_l1 0.05, "
            "cos 0.990000",
        ),
        ({"nonfinite_from": {"submodel": "unet", "step": 3}}, "NaN/Inf in the target from step 3 on (unet)"),
        (
            {
                "submodel": "scheduler",
                "steps": [1, 2],
                "l1": [0.1, 0.3],
                "factor": float("inf"),
                "nonfinite_from": {"submodel": "unet", "step": 2},
                "final": {"submodel": "scheduler", "step": 5, "l1": 0.3, "rel_l1": 0.2, "cos": 0.5},
            },
            "scheduler output L1 0.1 at step 1 → 0.3 at step 2; the final output (scheduler, step 5) has rel_l1 0.2, "
            "cos 0.500000; NaN/Inf in the target from step 2 on (unet)",
        ),
    ],
    ids=[
        "peak-and-final",
        "no-peak-within-5%",
        "no-factor-under-5%",
        "peak-past-5%-of-the-last",
        "peak-before-the-last",
        "one-step",
        "exact",
        "exact-but-final",
        "nan",
        "all",
    ],
)
def test_growth_text_follows_the_drift_to_the_final_output(growth, text):
    assert growth_text(growth) == text


@pytest.mark.parametrize(
    ("evidence", "text"),
    [
        (
            {"status": "shape", "ref_shape": "[2, 4, 8, 8]", "tgt_shape": "[1, 4, 8, 8]"},
            "`sample`: reference shape [2, 4, 8, 8], target [1, 4, 8, 8]",
        ),
        (
            {
                "status": "mismatch",
                "ref_dtype": "float32",
                "tgt_dtype": "int64",
                "ref_value": "981.5",
                "tgt_value": "981",
            },
            "`sample`: reference float32 981.5, target int64 981",
        ),
        (
            {
                "status": "mismatch",
                "ref_dtype": "float32",
                "tgt_dtype": "float16",
                "rel_l1": 0.5,
                "cos": 0.9,
                "max_abs": 2.0,
            },
            "`sample` differs (float32 vs float16): rel_l1 0.5, cos 0.900000000, max_abs 2",
        ),
        (
            {"status": "mismatch", "ref_dtype": "float32", "tgt_dtype": "float32", "rel_l1": 1.0, "cos": 0.5},
            "`sample` differs: rel_l1 1, cos 0.500000000",
        ),
    ],
    ids=["shape", "values", "metrics", "metrics-same-dtype"],
)
def test_an_input_that_differs_is_said_by_shape_value_or_metrics(evidence, text):
    assert _values_text("sample", evidence) == text


@pytest.mark.parametrize(
    ("numel", "cos", "rel_l1", "draws"),
    [
        (256, 0.1, 1.2, True),  # every bound is inclusive
        (256, -0.1, 1.7, True),
        (255, 0.0, 1.41, False),  # too few elements for the figures to settle
        (4096, 0.5, 1.41, False),  # correlated: one is made from the other
        (4096, 0.0, 1.0, False),  # uncorrelated, but not alike in size
        (4096, 0.0, 1.71, False),
    ],
)
def test_two_draws_of_noise_are_uncorrelated_and_alike_in_size(numel, cos, rel_l1, draws):
    row = pd.Series({"numel": numel})
    assert _independent_draws(row, {"status": "mismatch", "cos": cos, "rel_l1": rel_l1}) is draws
