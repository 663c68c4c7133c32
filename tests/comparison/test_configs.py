"""A scheduler of another class or config, or a pipeline called with other arguments, is named
where the numbers part ways."""

import json
import shutil

import h5py
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
    with another scheduler class, and with one step fewer."""
    folder = tmp_path_factory.mktemp("schedulers")
    pipe = tiny_pipeline()
    own = pipe.scheduler
    paths = {}
    for name, scheduler, steps in (
        ("ref", own, STEPS),
        ("trailing", EulerDiscreteScheduler.from_config(own.config, timestep_spacing="trailing"), STEPS),
        ("dpm", DPMSolverMultistepScheduler.from_config(own.config), STEPS),
        ("fewer", own, STEPS - 1),
    ):
        pipe.scheduler = scheduler
        with ak.record(folder / f"{name}.h5", pipe, label=name):
            generate(pipe, steps, size=32)
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
    assert fd.message.endswith(
        "scheduler is EulerDiscreteScheduler in the reference, DPMSolverMultistepScheduler in the target"
    )


def test_a_run_of_fewer_steps_is_named_where_its_scheduler_parts_ways(runs):
    result = ak.compare(runs["ref"], runs["fewer"])
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.kind) == ("scheduler", 0, "local error")
    assert fd.message.endswith(
        f"scheduler takes {STEPS} steps in the reference and {STEPS - 1} in the target, so its timesteps and sigmas "
        "differ"
    )
    assert (
        f"vae.decode: the reference has step {STEPS}, the target step {STEPS - 1}; no step is in both; not compared"
        in result.notes
    )


def test_a_run_recorded_at_fewer_steps_is_no_run_of_fewer_steps(runs, tmp_path):
    pipe = tiny_pipeline()
    with ak.record(tmp_path / "first.h5", pipe, steps=[0]):
        generate(pipe, STEPS, size=32)
    result = ak.compare(runs["ref"], tmp_path / "first.h5")
    assert result.aligned and not any("takes" in w for w in result.warnings)
    assert result.notes[0] == "the target was recorded with filters (steps 0)"


def test_a_run_cut_short_by_an_error_is_no_run_of_fewer_steps(runs, tmp_path):
    def out_of_memory(pipe, i, t, kwargs):
        if i == 1:
            raise RuntimeError("CUDA out of memory")
        return kwargs

    pipe = tiny_pipeline()
    with pytest.raises(RuntimeError), ak.record(tmp_path / "cut.h5", pipe):
        pipe(
            "a red fox in the snow",
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            height=32,
            width=32,
            callback_on_step_end=out_of_memory,
        )
    result = ak.compare(runs["ref"], tmp_path / "cut.h5")
    assert result.aligned and not any("takes" in w for w in result.warnings)
    assert result.notes[0] == "the target ended early, with RuntimeError: CUDA out of memory"
    assert "scheduler: the reference has steps 0–2, the target steps 0–1; compared the 2 shared steps" in result.notes


@pytest.mark.parametrize("recorded", ["killed", "no end mark"])
def test_a_run_killed_before_its_recording_ended_is_no_run_of_fewer_steps(runs, tmp_path, recorded):
    """A dump whose end was never written (``complete`` false) was cut short; one that has no such
    mark at all (another tool's, imported) is taken as whole, so its fewer steps are said."""
    cut = tmp_path / "cut.h5"
    shutil.copy(runs["fewer"], cut)
    with h5py.File(cut, "r+") as f:
        if recorded == "killed":
            f.attrs["complete"] = False
        else:
            del f.attrs["complete"]
    result = ak.compare(runs["ref"], cut)
    fd = result.first_divergence
    if recorded == "killed":
        assert "the target was killed before its recording ended" in result.notes[0]
        assert (fd.submodel, fd.step) == ("scheduler", 0) and fd.message.endswith("the port of scheduler itself is off")
    else:
        assert not any("killed" in n for n in result.notes)
        assert (fd.submodel, fd.step) == ("scheduler", 0) and fd.message.endswith("so its timesteps and sigmas differ")


def test_the_same_settings_say_nothing(runs):
    result = ak.compare(runs["ref"], runs["ref"])
    assert result.aligned and not any("configured otherwise" in w or "in the reference," in w for w in result.warnings)


def test_a_key_that_another_library_version_lacks_is_no_setting(runs, tmp_path):
    older = tmp_path / "older.h5"
    shutil.copy(runs["trailing"], older)
    with h5py.File(older, "a") as f:  # as a diffusers version before the key existed writes it
        config = json.loads(f["submodels/scheduler"].attrs["config"])
        del config["final_sigmas_type"]
        f["submodels/scheduler"].attrs["config"] = json.dumps(config)
    with ak.open_dump(runs["ref"]) as ref, ak.open_dump(older) as tgt:
        assert configs.differences(ref, tgt) == {
            "scheduler": 'is configured otherwise: timestep_spacing "linspace" → "trailing"'
        }


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


def _call(pipe, path, **arguments):
    call = {
        "num_inference_steps": STEPS,
        "guidance_scale": 7.5,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
        "height": 32,
        "width": 32,
    }
    with ak.record(path, pipe):
        pipe("a red fox in the snow", **{**call, **arguments})
    return path


def test_a_pipeline_called_with_another_guidance_scale_or_seed_is_named_in_the_glue_mismatch(tmp_path):
    pipe = tiny_pipeline()
    ref = _call(pipe, tmp_path / "ref.h5")
    result = ak.compare(ref, _call(pipe, tmp_path / "guidance.h5", guidance_scale=5.0))
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.kind) == ("scheduler", 0, "input mismatch")
    assert fd.message.endswith("; pipeline is called with other arguments: guidance_scale 7.5 → 5.0")
    assert fd.evidence["config"] == "pipeline is called with other arguments: guidance_scale 7.5 → 5.0"
    assert "pipeline is called with other arguments: guidance_scale 7.5 → 5.0" in result.warnings
    fd = ak.compare(ref, _call(pipe, tmp_path / "seed.h5", generator=torch.Generator().manual_seed(1))).first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == ("unet", 0, "sample", "input mismatch")
    assert fd.message.endswith(
        "; pipeline is called with other arguments: generator <Generator seed=0> → <Generator seed=1>"
    )


def test_how_a_pipeline_hands_back_its_result_is_no_setting(tmp_path):
    pipe = tiny_pipeline()
    ref = _call(pipe, tmp_path / "ref.h5")
    result = ak.compare(ref, _call(pipe, tmp_path / "pt.h5", output_type="pt", return_dict=False))
    assert result.aligned and not any(w.startswith("pipeline") for w in result.warnings)


def test_each_pipeline_call_is_paired_with_the_other_runs_in_order(tmp_path):
    pipe = tiny_pipeline()
    with ak.record(tmp_path / "ref.h5", pipe):
        for prompt in ("a red fox", "a blue jay"):
            pipe(prompt, num_inference_steps=1, height=32, width=32, output_type="np")
    with ak.record(tmp_path / "tgt.h5", pipe):
        for prompt in (
            "a red fox",
            "a blue jay in a long prompt that goes on well past what a warning should show of it",
        ):
            pipe(prompt, num_inference_steps=1, height=32, width=32, output_type="np")
        pipe("a third", num_inference_steps=1, height=32, width=32, output_type="np")
    with ak.open_dump(tmp_path / "ref.h5") as ref, ak.open_dump(tmp_path / "tgt.h5") as tgt:
        text = configs.differences(ref, tgt)["pipeline"]
    assert text == (
        'call 1 is given other arguments: prompt "a blue jay" → "a blue jay in a long prompt that goes on well past '
        "what a …; "
        "is called 2 times in the reference and 3 in the target"
    )


def _upsampled(path, modes):
    """A hand-written loop whose ``upsample`` is given an interpolation mode per step."""

    def upsample(x, mode):
        return torch.nn.functional.interpolate(x, scale_factor=2, mode=mode)

    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    with ak.Recorder(path) as rec:
        up = rec.watch(upsample, "upsample")
        for mode in modes:
            up(x, mode)
            ak.step()
    return path


@pytest.mark.parametrize(
    ("modes", "step", "said"),
    [
        (
            ["bilinear", "bilinear"],
            0,
            'upsample is called with other arguments: mode "nearest" → "bilinear"',
        ),  # a warning too
        (
            ["nearest", "bilinear"],
            1,
            'upsample is called with other arguments here: mode "nearest" → "bilinear"',
        ),  # where it changes
    ],
    ids=["from-the-first-call", "later"],
)
def test_a_call_given_another_mode_is_named_in_its_local_error(tmp_path, modes, step, said):
    ref = _upsampled(tmp_path / "ref.h5", ["nearest", "nearest"])
    result = ak.compare(ref, _upsampled(tmp_path / "tgt.h5", modes))
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.kind) == ("upsample", step, "local error")
    assert fd.message.endswith(f"; {said}")
    assert [w for w in result.warnings if w.startswith("upsample")] == ([said] if step == 0 else [])


def test_the_same_call_arguments_say_nothing(tmp_path):
    ref = _upsampled(tmp_path / "ref.h5", ["nearest", "nearest"])
    result = ak.compare(ref, _upsampled(tmp_path / "same.h5", ["nearest", "nearest"]))
    assert result.aligned and not result.warnings


def test_a_scheduler_step_given_no_generator_is_named_where_its_noise_differs(tmp_path):
    """An ancestral sampler adds fresh noise at every step: a port that does not hand it the
    pipeline's generator draws other noise, from the same latents and the same UNet."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = tiny_pipeline()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = _call(pipe, tmp_path / "ref.h5", latents=latents)
    torch.manual_seed(1)
    result = ak.compare(ref, _call(pipe, tmp_path / "tgt.h5", latents=latents, generator=None))
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.kind) == ("scheduler", 0, "local error")
    assert fd.message.endswith("; scheduler is called with other arguments: generator <Generator> → null")


def test_an_argument_another_writer_left_as_bare_text_is_compared_as_that_text(tmp_path):
    ref = _upsampled(tmp_path / "ref.h5", ["nearest", "nearest"])
    tgt = _upsampled(tmp_path / "tgt.h5", ["bilinear", "bilinear"])
    with h5py.File(tgt, "r+") as f:
        row = f["index"][0]
        row["inputs_values"] = json.dumps({"mode": "bilinear"})  # the value not JSON text
        f["index"][0] = row
    with ak.open_dump(tgt) as d:
        assert d["upsample", 0].values() == {"mode": "bilinear"}
    assert ak.compare(ref, tgt).first_divergence.message.endswith(
        '; upsample is called with other arguments: mode "nearest" → "bilinear"'
    )
