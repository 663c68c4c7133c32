"""The story alignkit comes from, end to end: a diffusers pipeline as the reference, and as the
target a hand-written ONNX Runtime port of it (its three models exported to diffusers' ONNX
layout, the loop written out around a diffusers scheduler), recorded by ``alignkit record``
with no change to the script."""

import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import alignkit as ak
from alignkit.demo.pipeline import generate, tiny_pipeline
from alignkit.recording.cli_run import record_command

STEPS = 5  # linspace timesteps of 5 steps have fractions (999, 749.25, …)

PORT = textwrap.dedent(
    f"""
    import sys
    import numpy as np
    import onnxruntime as ort
    import torch
    from diffusers import EulerDiscreteScheduler
    from alignkit.demo.pipeline import tiny_tokenizer

    folder, bug = sys.argv[1], sys.argv[2]
    session = lambda name: ort.InferenceSession(f"{{folder}}/{{name}}/model.onnx", providers=["CPUExecutionProvider"])
    text_encoder, unet, vae_decoder = session("text_encoder"), session("unet"), session("vae_decoder")
    scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    tokenizer = tiny_tokenizer()

    def encode(text):
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        return text_encoder.run(None, {{"input_ids": ids.astype(np.int64)}})[0]

    embeddings = np.concatenate([encode(""), encode("a red fox in the snow")])
    scheduler.set_timesteps({STEPS})
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sample = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        timestep = np.array(int(t) if bug == "int-timestep" else t, dtype=np.float32)
        feed = {{"sample": sample.numpy(), "timestep": timestep, "encoder_hidden_states": embeddings}}
        noise = torch.from_numpy(unet.run(None, feed)[0])
        uncond, cond = noise.chunk(2)
        latents = scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
    image = vae_decoder.run(None, {{"latent_sample": (latents / 0.18215).numpy()}})[0]
    """
)


class _Unet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


def _export(pipe, folder):
    """The pipeline's models in diffusers' ONNX layout, and its scheduler's config."""
    exports = {
        "text_encoder": (
            _TextEncoder(pipe.text_encoder),
            (torch.zeros(1, 77, dtype=torch.int64),),
            ["input_ids"],
            ["last_hidden_state"],
        ),
        "unet": (
            _Unet(pipe.unet),
            (torch.randn(2, 4, 16, 16), torch.tensor(999.0), torch.randn(2, 77, 16)),
            ["sample", "timestep", "encoder_hidden_states"],
            ["out_sample"],
        ),
        "vae_decoder": (_Decoder(pipe.vae), (torch.randn(1, 4, 16, 16),), ["latent_sample"], ["sample"]),
    }
    with torch.no_grad():
        for name, (module, args, inputs, outputs) in exports.items():
            (folder / name).mkdir(parents=True)
            torch.onnx.export(
                module, args, str(folder / name / "model.onnx"), input_names=inputs, output_names=outputs, dynamo=False
            )
    pipe.scheduler.save_config(folder / "scheduler")


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    """The reference dump, and a function that records the port with a bug (or none)."""
    folder = tmp_path_factory.mktemp("port")
    pipe = tiny_pipeline()
    with ak.record(folder / "ref.h5", pipe, label="torch-fp32"):
        generate(pipe, STEPS)
    _export(pipe, folder / "onnx")
    script = folder / "run_target.py"
    script.write_text(PORT)

    def record_target(bug: str):
        dump = folder / f"{bug}.h5"
        assert record_command(dump, [str(script), str(folder / "onnx"), bug], label=f"ort-{bug}") == 0
        return dump

    return folder / "ref.h5", record_target


def test_a_faithful_onnx_port_records_the_same_steps_and_compares_aligned(port):
    ref, record_target = port
    tgt = record_target("none")
    with ak.open_dump(tgt) as dump:
        assert dump.submodels == ["text_encoder", "unet", "scheduler", "vae_decoder"]
        assert dump.steps("unet") == list(range(STEPS)) and dump.steps("vae_decoder") == [STEPS]
    result = ak.compare(ref, tgt)
    assert result.verdict == "aligned"
    assert set(result.table["submodel"]) == {"text_encoder", "unet", "scheduler", "vae.decode"}
    compared = result.table[result.table["status"] != "ref only"]
    assert (compared["status"] == "ok").all() and len(compared) == 2 * 2 + STEPS * 4 + STEPS * 5 + 2
    assert set(result.table.loc[result.table["status"] == "ref only", "tensor"]) == {"pooler_output"}  # not exported
    assert result.notes == [
        "vae_decoder (target) is compared with vae.decode (reference): the names diffusers' ONNX export "
        "and a torch pipeline give the same VAE half",
        "text_encoder step 0: the target makes these calls in another order; paired by their inputs "
        "(the reference's call 0 with 1, 1 with 0 of the target's)",  # the port encodes the negative prompt first
        "text_encoder output `pooler_output`: only in the reference (2 calls); not compared",
    ]


def test_a_port_that_truncates_the_timestep_is_an_input_mismatch_at_the_first_fractional_one(port):
    ref, record_target = port
    result = ak.compare(ref, record_target("int-timestep"))
    first = result.first_divergence
    assert result.verdict == "diverged"
    assert (first.submodel, first.io, first.tensor, first.kind) == ("unet", "inputs", "timestep", "input mismatch")
    with ak.open_dump(ref) as dump:
        fractional = [s for s in range(STEPS) if float(dump["unet", s].inputs["timestep"]) % 1]
    assert first.step == fractional[0]


def _converted_port(port, folder, convert) -> Path:
    """The port's dump with its UNet's ONNX model passed through ``convert`` (a real converter)."""
    ref, _ = port
    shutil.copytree(ref.parent / "onnx", folder / "onnx")
    convert(folder / "onnx" / "unet" / "model.onnx")
    dump = folder / "converted.h5"
    assert record_command(dump, [str(ref.parent / "run_target.py"), str(folder / "onnx"), "none"]) == 0
    return dump


def _to_fp16(path: Path) -> None:
    """ONNX Runtime's float16 converter, float32 I/O kept (the usual advice)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(path), keep_io_types=True), path)


def _to_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(path.with_name("int8.onnx")), weight_type=QuantType.QInt8)
    path.with_name("int8.onnx").replace(path)


def test_an_fp16_unet_behind_float32_io_is_judged_against_the_fp16_floor(port, tmp_path):
    ref, _ = port
    tgt = _converted_port(port, tmp_path, _to_fp16)
    with ak.open_dump(tgt) as dump:
        assert dump.descriptions["unet"]["precision"] == "fp16"
        assert set(dump.tensors["dtype"]) <= {"float32", "int64"}  # the dtypes say nothing of float16
    result = ak.compare(ref, tgt)
    assert result.verdict == "aligned", result.first_divergence
    assert result.warnings[0].startswith(
        "unet computes in fp16, read from its ONNX graph: its outputs' error is up to "
    )
    assert result.warnings[0].endswith("× the fp16 floor, expected precision loss")
    declared_elsewhere = ak.compare(ref, tgt, target_precision={"unet": "fp32"})  # the user knows better
    assert declared_elsewhere.verdict == "diverged" and "computes in" not in declared_elsewhere.first_divergence.message


def test_an_int8_unet_names_the_quantized_graph(port, tmp_path):
    ref, _ = port
    result = ak.compare(ref, _converted_port(port, tmp_path, _to_int8))
    assert result.verdict == "aligned", result.first_divergence
    assert result.warnings[0].startswith(
        "unet computes in int8, read from its ONNX graph (the graph is quantized: its floor is an estimate, an int8 "
        "rounding of each output): its outputs' error is up to "
    )


def test_fix_precision_on_the_tiny_unets_fp32_export_gives_a_verified_answer(port, tmp_path):
    """The UNet's fp32 export through onnxconverter-common's float16 converter: a verified keep
    list and a fixed model, or the plain answer that ONNX Runtime's fp16 build already aligns."""
    import onnx

    from alignkit.fixing import fix_precision

    ref, _ = port
    unet = ref.parent / "onnx" / "unet" / "model.onnx"
    result = fix_precision(ref, submodel="unet", dtype="fp16", out=tmp_path / "unet_fp16.onnx", onnx=unet, max_builds=6)
    assert result.aligned, result.message
    if not result.keep:
        assert "already aligns on ONNX Runtime on this CPU" in result.message
    fixed = onnx.load(tmp_path / "unet_fp16.onnx")
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fixed.graph.initializer)
    assert ak.replay(ref, submodel="unet", target=tmp_path / "unet_fp16.onnx").aligned
