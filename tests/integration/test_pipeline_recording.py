"""End to end on a tiny real diffusers StableDiffusionPipeline."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import alignkit as ak
from alignkit.demo.pipeline import generate, tiny_pipeline
from tests.conftest import ROOT

STEPS = 4


def test_records_every_step_with_the_exact_timesteps_and_leaves_no_trace(tmp_path):
    pipe = tiny_pipeline()
    unwatched = generate(pipe, STEPS)
    with ak.record(tmp_path / "ref.h5", pipe, label="torch-fp32") as rec:
        watched = generate(pipe, STEPS)
    np.testing.assert_array_equal(watched, unwatched)  # recording changes nothing
    assert not rec.hooks
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks
    assert "decode" not in vars(pipe.vae) and "step" not in vars(pipe.scheduler)
    assert type(pipe) is StableDiffusionPipeline
    expected_timesteps = pipe.scheduler.timesteps.numpy()
    with ak.open_dump(tmp_path / "ref.h5") as d:
        assert d.submodels == ["text_encoder", "unet", "scheduler", "vae.decode"]
        assert d.steps("unet") == list(range(STEPS))
        got = [d["unet", s].inputs["timestep"] for s in range(STEPS)]
        np.testing.assert_array_equal(np.array(got), expected_timesteps)
        assert d["unet", 0].inputs["timestep"].dtype == expected_timesteps.dtype
        assert len(d.calls[d.calls["submodel"] == "text_encoder"]) == 2  # prompt and negative prompt
        assert d.steps("vae.decode") == [STEPS]
        np.testing.assert_array_equal(d["scheduler", 0].inputs["model_output"].shape, (1, 4, 16, 16))


def test_watched_run_that_raises_removes_every_hook(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError), ak.record(tmp_path / "ref.h5", pipe):
        pipe("x", num_inference_steps=2, height=31, width=31)  # not divisible by 8: raises
    assert not pipe.unet._forward_hooks and not pipe.text_encoder._forward_pre_hooks
    assert "step" not in vars(pipe.scheduler) and type(pipe) is StableDiffusionPipeline


def test_each_pipeline_call_notes_its_arguments_with_the_defaults_filled_in(tmp_path):
    pipe = tiny_pipeline()
    latents, width = torch.randn(1, 4, 4, 4), pipe.unet.config.cross_attention_dim
    with ak.record(tmp_path / "ref.h5", pipe):
        generate(pipe, 2, seed=3, size=32)
        pipe(
            prompt_embeds=torch.zeros(1, 77, width),
            negative_prompt_embeds=torch.ones(1, 77, width),
            num_inference_steps=1,
            latents=latents,
            height=32,
            width=32,
            output_type="latent",
        )
    with ak.open_dump(tmp_path / "ref.h5") as d:
        first, second = d.pipeline_calls
        calls = d.calls
    assert (
        first["class"]
        == second["class"]
        == "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline"
    )
    assert first["seq"] == 0 and second["seq"] == len(calls[calls["seq"] < second["seq"]]) > 0  # where each began
    assert (
        calls.loc[calls["seq"] == second["seq"], "submodel"].item() == "unet"
    )  # no text encoder: embeddings were given
    assert {
        k: first["arguments"][k] for k in ("prompt", "num_inference_steps", "guidance_scale", "generator", "eta")
    } == {
        "prompt": "a red fox in the snow",
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
        "generator": "<Generator seed=3>",
        "eta": 0.0,
    }
    assert second["arguments"]["prompt"] is None and second["arguments"]["guidance_scale"] == 7.5  # left to its default
    assert second["arguments"]["latents"] == "<tensor float32 [1, 4, 4, 4]>"
    assert second["arguments"]["prompt_embeds"] == f"<tensor float32 [1, 77, {width}]>"


SCRIPT = textwrap.dedent(
    f"""
    from alignkit.demo.pipeline import generate, tiny_pipeline
    generate(tiny_pipeline(), {STEPS})
    """
)


def test_record_cli_on_an_unmodified_script_matches_the_api(tmp_path):
    script = tmp_path / "run_ref.py"
    script.write_text(SCRIPT)
    cli_dump, api_dump = tmp_path / "cli.h5", tmp_path / "api.h5"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit",
            "record",
            "-o",
            str(cli_dump),
            "--label",
            "cli",
            "--",
            "python",
            str(script),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    pipe = tiny_pipeline()
    with ak.record(api_dump, pipe):
        generate(pipe, STEPS)
    with ak.open_dump(cli_dump) as c, ak.open_dump(api_dump) as a:
        assert c.metadata["label"] == "cli"
        assert c.pipeline_calls == a.pipeline_calls and len(a.pipeline_calls) == 1
        assert c.calls[["submodel", "step", "call"]].equals(a.calls[["submodel", "step", "call"]])
        for cc, ac in zip(c, a):
            for io in ("inputs", "outputs"):
                assert list(getattr(cc, io)) == list(getattr(ac, io))
                for name, value in getattr(ac, io).items():
                    np.testing.assert_array_equal(getattr(cc, io)[name], value)
    assert ak.compare(cli_dump, api_dump).verdict == "aligned"


def test_record_cli_filters_steps_and_layers(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    dump = tmp_path / "layers.h5"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit",
            "record",
            "-o",
            str(dump),
            "--layers",
            "unet",
            "--layer-filter",
            "^conv",
            "--steps",
            "1",
            "--",
            str(script),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    with ak.open_dump(dump) as d:
        assert set(d.calls["step"]) == {1}
        assert [t.name for t in d["unet", 1].info("layers")] == ["conv_in", "conv_norm_out", "conv_act", "conv_out"]


def test_prompt_embeds_without_a_tokenizer(tmp_path):
    """Fed ``prompt_embeds`` (no tokenizer, no text encoder call), the steps still come from the
    scheduler, and the embeddings reach the UNet exactly."""
    import torch

    pipe = tiny_pipeline()
    pipe.tokenizer = None
    embeds = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad():
            return pipe(
                prompt_embeds=embeds,
                negative_prompt_embeds=-embeds,
                num_inference_steps=STEPS,
                height=32,
                width=32,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images

    unwatched = run()
    with ak.record(tmp_path / "embeds.h5", pipe):
        watched = run()
    np.testing.assert_array_equal(watched, unwatched)
    with ak.open_dump(tmp_path / "embeds.h5") as d:
        assert d.submodels == ["unet", "scheduler", "vae.decode"]
        assert d.steps("unet") == list(range(STEPS)) and d.steps("vae.decode") == [STEPS]
        got = np.array([d["unet", s].inputs["timestep"] for s in range(STEPS)])
        np.testing.assert_array_equal(got, pipe.scheduler.timesteps.numpy())
        hidden = d["unet", 0].inputs["encoder_hidden_states"]
        np.testing.assert_array_equal(hidden, torch.cat([-embeds, embeds]).numpy())  # classifier-free guidance batch


def test_a_controlnet_pipeline_records_the_residuals_that_reach_the_unet(tmp_path):
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny_pipeline()
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8)).eval()
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = StableDiffusionControlNetPipeline(
        **parts, controlnet=controlnet, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    hint = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    _record_unchanged(pipe, tmp_path / "cn.h5", image=hint, num_inference_steps=3, height=32, width=32)
    with ak.open_dump(tmp_path / "cn.h5") as d:
        assert d.submodels == ["text_encoder", "controlnet", "unet", "scheduler", "vae.decode"]
        assert d.steps("controlnet") == d.steps("unet") == [0, 1, 2]
        for step in range(3):
            control, unet = d["controlnet", step], d["unet", step]
            assert control.inputs["controlnet_cond"].shape == (2, 3, 32, 32)  # the hint, for both guidance halves
            residuals = [name for name in unet.inputs if name.startswith("down_block_additional_residuals.")]
            assert len(residuals) == 4
            for i, name in enumerate(residuals):  # the glue between the two submodels, exactly
                np.testing.assert_array_equal(unet.inputs[name], control.outputs[f"output.0.{i}"])
            np.testing.assert_array_equal(unet.inputs["mid_block_additional_residual"], control.outputs["output.1"])


def test_an_img2img_pipeline_records_what_the_vae_encoder_returns(tmp_path):
    """``vae.encode`` returns a latent distribution, not a tensor: its parameters (the
    encoder's output, mean and log-variance) are recorded, where before the call had none."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    _record_unchanged(pipe, tmp_path / "i2i.h5", image=image, strength=0.75, num_inference_steps=4)
    with ak.open_dump(tmp_path / "i2i.h5") as d:
        assert d.submodels == ["text_encoder", "vae.encode", "unet", "scheduler", "vae.decode"]
        encoded = d["vae.encode", 0]
        with torch.no_grad():
            expected = pipe.vae.encode(torch.from_numpy(encoded.inputs["x"])).latent_dist.parameters.numpy()
        assert list(encoded.outputs) == ["latent_dist.parameters"]
        np.testing.assert_array_equal(encoded.outputs["latent_dist.parameters"], expected)


def _record_unchanged(pipe, path, **call):
    """Record one call of ``pipe`` ("a fox", seeded) into ``path``; its images are those of
    an unwatched call, bit for bit."""
    import torch

    def run():
        with torch.no_grad():
            return pipe("a fox", generator=torch.Generator().manual_seed(0), output_type="np", **call).images

    unwatched = run()
    with ak.record(path, pipe):
        watched = run()
    np.testing.assert_array_equal(watched, unwatched)
