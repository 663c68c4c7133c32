"""The glue between submodels: an input made of earlier outputs is explained by how."""

import numpy as np

import alignkit as ak

MEAN = np.array([0.3, -0.2, 0.1, 0.5], np.float32).reshape(1, 4, 1, 1)
STD = np.array([1.5, 0.8, 2.0, 1.1], np.float32).reshape(1, 4, 1, 1)


def _record(path, *, dtype=np.float32, scale=5.0, swap=False, steps=3):
    """A guided denoising loop: a UNet on the guidance batch, the scheduler fed
    ``u + scale·(c − u)``, a VAE fed the latents normalised per channel. ``dtype`` is what
    the UNet and the scheduler compute in; the VAE stays in float32, as diffusers keeps it."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 4)).astype(np.float32) * 0.5

    def unet(sample):
        out = np.tanh(np.einsum("oc,bchw->bohw", weights.astype(dtype), sample.astype(dtype)))
        return out.astype(dtype)

    def scheduler(model_output, sample):
        return (sample - np.asarray(0.1, dtype) * model_output).astype(dtype)

    def vae(z):
        return np.tanh(z.astype(np.float32)) * 2

    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with ak.Recorder(path) as rec:
        unet, scheduler, vae = rec.watch(unet, "unet"), rec.watch(scheduler, "scheduler"), rec.watch(vae, "vae.decode")
        x = latents.astype(dtype)
        for _ in range(steps):
            both = unet(np.concatenate([x, x * np.asarray(1.01, dtype)]))
            u, c = (both[1], both[0]) if swap else (both[0], both[1])
            x = scheduler((u + np.asarray(scale, dtype) * (c - u))[None].astype(dtype), x)
            ak.step()
        vae(x.astype(np.float32) / STD + MEAN)
    return path


def test_another_guidance_scale_is_named_with_both_scales(tmp_path):
    result = ak.compare(_record(tmp_path / "ref.h5"), _record(tmp_path / "tgt.h5", scale=7.5))
    first = result.first_divergence
    assert (first.submodel, first.step, first.tensor, first.kind) == ("scheduler", 0, "model_output", "input mismatch")
    assert first.message.startswith("scheduler step 0: input mismatch — `model_output` differs: rel_l1 ")
    assert (
        "-4·unet `output`[0] + 5·unet `output`[1] (classifier-free guidance at scale 5) in the reference"
        in first.message
    )
    assert "(classifier-free guidance at scale 7.5) in the target" in first.message
    assert "with other weights" in first.message


def test_swapped_guidance_halves_are_named(tmp_path):
    result = ak.compare(_record(tmp_path / "ref.h5"), _record(tmp_path / "tgt.h5", swap=True))
    assert "the batch halves are swapped" in result.first_divergence.message


def test_a_lower_precision_run_amplified_by_the_glue_is_precision_loss_not_a_divergence(tmp_path):
    """A float16 UNet within its noise floor, times a guidance scale of 5 in float16, is past
    the scheduler input's floor: the same glue in both runs, so expected loss, and said so;
    the float32 VAE fed latents that carry it is measured against float16's floor."""
    ref, tgt = _record(tmp_path / "ref.h5"), _record(tmp_path / "tgt.h5", dtype=np.float16)
    result = ak.compare(ref, tgt)
    assert result.verdict == "aligned", result.summary()
    table = result.table
    guided = table[(table["submodel"] == "scheduler") & (table["tensor"] == "model_output")]
    assert (guided["floor_ratio"] > 10).any()  # past the floor, and still not a divergence
    assert set(guided.loc[guided["floor_ratio"] > 10, "glue"]) == {
        "-4·unet `output`[0] + 5·unet `output`[1] (classifier-free guidance at scale 5)"
    }
    assert any(
        "scheduler input `model_output` is past 10× its noise floor" in w and "amplified by the glue" in w
        for w in result.warnings
    )
    z = table[(table["submodel"] == "vae.decode") & (table["io"] == "inputs")].iloc[0]
    assert (z["ref_dtype"], z["tgt_dtype"], z["floor_dtype"]) == (
        "float32",
        "float32",
        "float16",
    )  # carried from the float16 run
    assert z["status"] in ("ok", "precision")


def test_a_glue_that_differs_in_a_lower_precision_run_is_still_a_divergence(tmp_path):
    result = ak.compare(_record(tmp_path / "ref.h5"), _record(tmp_path / "tgt.h5", dtype=np.float16, scale=7.5))
    assert result.verdict == "diverged"
    assert "(classifier-free guidance at scale 7.5) in the target" in result.first_divergence.message


def test_a_per_channel_normalisation_is_recognised_and_checked(tmp_path):
    from alignkit.comparison import glue
    from alignkit.comparison.matching import NameMap, match_calls

    ref, tgt = _record(tmp_path / "ref.h5"), _record(tmp_path / "tgt.h5", dtype=np.float16)
    table = ak.compare(ref, tgt).table
    with ak.open_dump(ref) as r, ak.open_dump(tgt) as t:
        calls, _ = match_calls(r, t, NameMap.build())
        z = table[(table["submodel"] == "vae.decode") & (table["io"] == "inputs")].iloc[0]
        found = glue.Explainer(r, t, calls, table)(z)
    assert found is not None and found.same
    assert (
        found.formula
        == "scheduler step 2 `output` scaled and shifted per channel (scales 0.5 to 1.25, shifts -0.2 to 0.5)"
    )


def test_latents_laid_out_otherwise_are_named_as_a_layout_not_as_other_noise(tmp_path):
    """A reshape where a permute was meant scrambles the latents: uncorrelated with the
    reference's, as other noise would be, but the same values."""
    from alignkit.demo.pipeline import generate, tiny_pipeline

    pipe = tiny_pipeline()
    with ak.record(tmp_path / "ref.h5", pipe):
        generate(pipe, 2, size=32)
    scale = pipe.scheduler.scale_model_input

    def nhwc_read_as_nchw(sample, timestep=None):
        out = scale(sample, timestep)
        return out.permute(0, 2, 3, 1).reshape(out.shape)

    pipe.scheduler.scale_model_input = nhwc_read_as_nchw
    with ak.record(tmp_path / "tgt.h5", pipe):
        generate(pipe, 2, size=32)
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == ("unet", 0, "sample", "input mismatch")
    assert "`sample` holds the reference's values in another order (sorted, they agree to rel_l1 0)" in fd.message
    assert "noise" not in fd.message


def test_a_timestep_computed_in_bfloat16_is_named_as_rounding_and_a_wrong_one_is_not(tmp_path):
    """Flux's pipeline divides a bfloat16 timestep by 1000: 750 becomes 752, then 0.7539."""
    import torch

    def record(path, timesteps, dtype):
        with ak.Recorder(path) as rec:
            transformer = rec.watch(lambda hidden_states, timestep: hidden_states * 2, "transformer")
            for t in timesteps:
                transformer(torch.ones(1, 16, 4, dtype=dtype), torch.tensor([t], dtype=dtype) / 1000)
                ak.step()

    record(tmp_path / "ref.h5", [1000.0, 750.0], torch.float32)
    record(tmp_path / "bf16.h5", [1000.0, 750.0], torch.bfloat16)
    record(tmp_path / "wrong.h5", [1000.0, 700.0], torch.bfloat16)
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "bf16.h5").first_divergence
    assert (fd.step, fd.tensor, fd.kind) == (1, "timestep", "input mismatch")
    assert (
        "no more than bfloat16 rounding (2 units in the last place)" in fd.message
        and "keep it in float32" in fd.message
    )
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "wrong.h5").first_divergence
    assert (fd.step, fd.tensor) == (1, "timestep") and "rounding" not in fd.message


def test_calls_that_carry_a_scalar_or_no_tensor_at_all_leave_the_diagnosis_to_the_rest(tmp_path):
    """A counter that returns a 0-d tensor and a hook called with nothing come before the UNet
    call whose input the glue got wrong: neither is taken for a divergence, and the glue
    that made the input is still worked out from the UNet's earlier output."""
    import torch

    for path, bump in ((tmp_path / "ref.h5", 0.0), (tmp_path / "tgt.h5", 1.0)):
        with ak.Recorder(path) as rec:
            count, tick = rec.watch(lambda n: n * 2, "counter"), rec.watch(lambda: None, "tick")
            unet = rec.watch(lambda sample: sample * 2, "unet")
            for step in range(2):
                count(torch.tensor(3.0))
                tick()
                unet(torch.ones(300) + (bump if step else 0.0))
                ak.step()
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    kinds = dict(zip(zip(result.calls["submodel"], result.calls["step"]), result.calls["kind"]))
    assert kinds == {(s, i): "" for s in ("counter", "tick", "unet") for i in (0, 1)} | {("unet", 1): "input mismatch"}
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.tensor) == ("unet", 1, "sample")
    assert "unet step 0 `output` passed on unchanged in the target" in fd.message
