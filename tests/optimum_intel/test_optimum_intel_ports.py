"""Ports made with optimum-intel, as users make them: ``OVStableDiffusionPipeline`` exported
from a tiny pipeline with seeded random weights, each run recorded with ``alignkit record`` in a
fresh process, compared with no ``--map``. optimum-intel holds transformers and
huggingface_hub back: ``nox -s optimum_intel`` gives it an environment of its own."""

import os
import subprocess
import sys
import textwrap

import pytest

import alignkit as ak
from tests.conftest import ROOT

SCRIPT = """
import sys

from alignkit.demo.pipeline import generate, tiny_pipeline

if sys.argv[1] == "torch":
    pipe = tiny_pipeline()
else:
    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    config = {"INFERENCE_PRECISION_HINT": sys.argv[3]} if sys.argv[3] != "default" else {}
    extra = {
        "int8": {"quantization_config": OVWeightQuantizationConfig(bits=8)},
        "lazy": {"compile": False},  # each part compiles on its first call
    }.get(sys.argv[4] if len(sys.argv) > 4 else "", {})
    pipe = OVStableDiffusionPipeline.from_pretrained(sys.argv[2], ov_config=config, **extra)
    pipe.set_progress_bar_config(disable=True)
generate(pipe, steps=3)
"""


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD pipeline saved, optimum-intel's export of it, and a recording of each run."""
    from optimum.intel import OVStableDiffusionPipeline

    from alignkit.demo.pipeline import tiny_pipeline

    folder = tmp_path_factory.mktemp("sd")
    tiny_pipeline().save_pretrained(folder / "torch")
    OVStableDiffusionPipeline.from_pretrained(str(folder / "torch"), export=True).save_pretrained(folder / "ov")
    (folder / "run.py").write_text(textwrap.dedent(SCRIPT))
    dumps = {}
    runs = {"torch": [], "f32": [folder / "ov", "f32"], "default": [folder / "ov", "default"]}
    runs["int8"] = [folder / "torch", "f32", "int8"]  # weights compressed to int8 as the pipeline loads
    runs["lazy"] = [folder / "ov", "f32", "lazy"]
    for run, args in runs.items():
        dumps[run] = folder / f"{run}.h5"
        command = [
            sys.executable,
            "-m",
            "alignkit",
            "record",
            "-o",
            str(dumps[run]),
            "--",
            "run.py",
            "torch" if run == "torch" else "ov",
            *map(str, args),
        ]
        proc = subprocess.run(
            command,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return dumps


def test_each_ov_model_is_recorded_once_under_its_component_name(sd):
    with ak.open_dump(sd["torch"]) as ref, ak.open_dump(sd["f32"]) as tgt:
        assert len(tgt) == len(ref) == 9  # the engines, not the wrappers around them too
        assert tgt.submodels == ["text_encoder", "unet", "scheduler", "vae_decoder"]
        unet = tgt.descriptions["unet"]
        assert (unet["engine"], unet["precision"]) == ("openvino", "fp32")
        assert list(tgt["unet", 0].inputs) == ["sample", "timestep", "encoder_hidden_states"]


def test_parts_that_compile_on_their_first_call_are_recorded_as_their_engines(sd):
    with ak.open_dump(sd["lazy"]) as lazy:
        assert lazy.submodels == ["text_encoder", "unet", "scheduler", "vae_decoder"] and len(lazy) == 9
        assert lazy.descriptions["unet"]["engine"] == "openvino"
    assert ak.compare(sd["f32"], sd["lazy"]).verdict == "aligned"


def test_the_int64_timestep_of_optimum_intels_unet_is_the_first_divergence(sd):
    """The demo's scheduler gives a fractional timestep (499.5) at step 1: the UNet export
    declares ``timestep`` int64, and OpenVINO computes with 499."""
    result = ak.compare(sd["torch"], sd["f32"])
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == ("unet", 1, "timestep", "input mismatch")
    assert "reference float32 499.5, target int64 499" in fd.message
    assert "unet's OpenVINO model declares `timestep` int64, and OpenVINO converts the float32" in fd.message
    compared = result.table.groupby("submodel")["step"].nunique().to_dict()
    assert compared == {"text_encoder": 1, "unet": 3, "scheduler": 3, "vae.decode": 1}  # every submodel, no --map


def test_int8_weights_are_named_and_the_timestep_is_still_the_first_divergence(sd):
    with ak.open_dump(sd["int8"]) as dump:
        described = dump.descriptions
        assert {s: described[s]["precision"] for s in ("text_encoder", "unet", "vae_decoder")} == dict.fromkeys(
            ("text_encoder", "unet", "vae_decoder"), "int8"
        )
    result = ak.compare(sd["torch"], sd["int8"])
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.tensor) == ("unet", 1, "timestep")
    assert "computes in int8" not in fd.message  # no precision explains a control input that differs
    assert any(w.startswith("unet computes in int8, OpenVINO runs ") for w in result.warnings)


def test_the_default_precision_is_named_for_each_component_as_the_table_shows_it(sd):
    with ak.open_dump(sd["default"]) as dump:
        precision = dump.descriptions["unet"]["precision"]  # bf16 on a CPU that computes in it, else fp32
    result = ak.compare(sd["torch"], sd["default"])
    if precision == "fp32":
        assert not any("computes in" in w for w in result.warnings)
        return
    named = [w for w in result.warnings if " computes in bf16, OpenVINO's inference precision: " in w]
    assert {w.split(" ", 1)[0] for w in named} == {"text_encoder", "unet", "vae.decode"}
    assert "nondeterministic" not in str(result.first_divergence)  # bf16 rounding is not a random op


LLM_SCRIPT = """
import sys

import torch

PROMPT = torch.tensor([[5, 17, 3, 42, 8]])
if sys.argv[1] == "torch":
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(sys.argv[2]).eval()
else:
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(sys.argv[2], ov_config={"INFERENCE_PRECISION_HINT": "f32"})
model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=4, do_sample=False, pad_token_id=0)
"""


def test_a_stateful_ov_decoder_is_recorded_through_its_async_requests_and_compared_in_tokens(tmp_path):
    """OVModelForCausalLM runs its request with ``start_async`` and ``wait``, its KV cache kept
    inside the model: its calls are recorded as ``decoder``, and the port agrees in tokens."""
    import torch
    from optimum.intel import OVModelForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "torch")
    OVModelForCausalLM.from_pretrained(str(tmp_path / "torch"), export=True).save_pretrained(tmp_path / "ov")
    (tmp_path / "run.py").write_text(textwrap.dedent(LLM_SCRIPT))
    dumps = {}
    for run in ("torch", "ov"):
        dumps[run] = tmp_path / f"{run}.h5"
        command = [sys.executable, "-m", "alignkit", "record", "-o", str(dumps[run]), "--", "run.py", run]
        proc = subprocess.run(
            [*command, str(tmp_path / run)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    with ak.open_dump(dumps["ov"]) as dump:
        assert dump.submodels == ["decoder"] and len(dump) == 4  # the prefill and three decode steps
        assert dump["decoder", 0].outputs["logits"].shape == (1, 5, 100)
    result = ak.compare(dumps["torch"], dumps["ov"])
    assert result.verdict == "aligned", result.first_divergence
    assert (result.tokens["submodel"], result.tokens["identical"], result.tokens["steps"]) == ("decoder", 4, 4)
