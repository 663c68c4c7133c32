"""A scheduler of another class or config is named where the numbers part ways."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

import alignkit as ak
from alignkit.comparison import configs
from alignkit.demo.pipeline import generate, tiny_pipeline

STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo pipeline recorded with its own scheduler, with ``timestep_spacing`` changed,
    and with another scheduler class."""
    folder = tmp_path_factory.mktemp("schedulers")
    pipe = tiny_pipeline()
    own = pipe.scheduler
    paths = {}
    for name, scheduler in (
        ("ref", own),
        ("trailing", EulerDiscreteScheduler.from_config(own.config, timestep_spacing="trailing")),
        ("dpm", DPMSolverMultistepScheduler.from_config(own.config)),
    ):
        pipe.scheduler = scheduler
        with ak.record(folder / f"{name}.h5", pipe, label=name):
            generate(pipe, STEPS, size=32)
        paths[name] = folder / f"{name}.h5"
    return paths


def test_a_scheduler_configured_otherwise_is_named_in_its_local_error(runs):
    result = ak.compare(runs["ref"], runs["trailing"])
    fd = result.first_divergence
    assert (fd.submodel, fd.kind) == ("scheduler", "local error")
    assert 'scheduler is configured otherwise: timestep_spacing "linspace" → "trailing"' in fd.message
    assert fd.evidence["config"] == 'scheduler is configured otherwise: timestep_spacing "linspace" → "trailing"'
    assert 'scheduler is configured otherwise: timestep_spacing "linspace" → "trailing"' in result.warnings


def test_a_scheduler_of_another_class_is_named_in_the_glue_mismatch_it_makes(runs):
    result = ak.compare(runs["ref"], runs["dpm"])
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.kind) == ("unet", 0, "input mismatch")
    assert fd.message.endswith("scheduler is EulerDiscreteScheduler in the reference, DPMSolverMultistepScheduler in the target")


def test_the_same_settings_say_nothing(runs):
    result = ak.compare(runs["ref"], runs["ref"])
    assert result.aligned and not any("configured otherwise" in w or "in the reference," in w for w in result.warnings)


def test_where_a_model_was_loaded_from_and_in_which_dtype_are_no_setting(tmp_path):
    """A port loads the same weights from elsewhere, in float16: its config's private keys and
    dtype differ, which say nothing the dtype warnings do not."""
    pipe = tiny_pipeline()
    with ak.record(tmp_path / "fp32.h5", pipe):
        pass
    pipe.text_encoder.config.dtype = torch.float16  # as from_pretrained(..., dtype=torch.float16) leaves it
    pipe.text_encoder.config._name_or_path = "/models/port/text_encoder"
    with ak.record(tmp_path / "fp16.h5", pipe):
        pass
    with ak.open_dump(tmp_path / "fp32.h5") as ref, ak.open_dump(tmp_path / "fp16.h5") as tgt:
        assert ref.descriptions["text_encoder"]["config"] != tgt.descriptions["text_encoder"]["config"]
        assert configs.differences(ref, tgt) == {}
    pipe.text_encoder.config.projection_dim = 7
    with ak.record(tmp_path / "other.h5", pipe):
        pass
    with ak.open_dump(tmp_path / "fp32.h5") as ref, ak.open_dump(tmp_path / "other.h5") as tgt:
        assert configs.differences(ref, tgt)["text_encoder"].startswith("is configured otherwise: projection_dim")
