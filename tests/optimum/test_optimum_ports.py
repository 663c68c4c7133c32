"""Ports made with optimum, as users make them: ``ORTStableDiffusionPipeline`` and
``ORTModelForCausalLM`` exported from tiny models with seeded random weights, recorded with no
``--hook`` and compared with no ``--map``. Needs the ``optimum`` extra (``nox -s ecosystem``)."""

import subprocess
import sys
import textwrap

import pytest

import alignkit as ak
from alignkit.recording.cli_run import record_command

SD_SCRIPT = """
import sys

from alignkit.demo.pipeline import generate, tiny_pipeline

if sys.argv[1] == "torch":
    pipe = tiny_pipeline()
else:
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    from optimum.onnxruntime.modeling_diffusion import ORTUnet

    if sys.argv[1] == "cast":  # a wrapper that truncates the timestep before the session
        forward = ORTUnet.forward
        ORTUnet.forward = lambda self, sample, timestep, *a, **k: forward(self, sample, timestep.long(), *a, **k)
    pipe = ORTStableDiffusionPipeline.from_pretrained(sys.argv[2])
    pipe.set_progress_bar_config(disable=True)
generate(pipe, steps=3)
"""

LLM_SCRIPT = """
import sys

import torch

PROMPT = torch.tensor([[5, 17, 3, 42, 8]])
if sys.argv[1] == "torch":
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(sys.argv[2]).eval()
else:
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(sys.argv[2])
model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=4, do_sample=False, pad_token_id=0)
"""


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD pipeline saved, and optimum's export of it."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from alignkit.demo.pipeline import tiny_pipeline

    folder = tmp_path_factory.mktemp("sd")
    tiny_pipeline().save_pretrained(folder / "torch")
    ORTStableDiffusionPipeline.from_pretrained(str(folder / "torch"), export=True).save_pretrained(folder / "onnx")
    (folder / "run.py").write_text(textwrap.dedent(SD_SCRIPT))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama saved, and ``optimum-cli export onnx`` of it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(folder / "torch")
    export = [sys.executable, "-m", "optimum.exporters.onnx", "--model", str(folder / "torch")]
    subprocess.run([*export, "--task", "text-generation-with-past", str(folder / "onnx")], check=True, timeout=300)
    (folder / "run.py").write_text(textwrap.dedent(LLM_SCRIPT))
    return folder


def record(folder, run: str, *args, out=None):
    dump = out or folder / f"{run}.h5"
    assert record_command(dump, [str(folder / "run.py"), run, *map(str, args)]) == 0
    return dump


def steps_compared(result) -> dict[str, int]:
    return result.table.groupby("submodel")["step"].nunique().to_dict()


def test_a_faithful_optimum_sd_port_compares_aligned_with_every_submodel_compared(sd):
    ref, tgt = record(sd, "torch"), record(sd, "onnx", sd / "onnx")
    with ak.open_dump(tgt) as dump:
        assert dump.submodels == ["text_encoder", "unet", "scheduler", "vae.decode"]  # the wrappers are not recorded
        assert list(dump["unet", 0].inputs) == ["sample", "timestep", "encoder_hidden_states"]  # the session's feed
        assert dump.descriptions["unet"]["precision"] == "fp32"
    result = ak.compare(ref, tgt)
    assert result.verdict == "aligned" and result.exit_code == 0, result.first_divergence
    assert steps_compared(result) == {"text_encoder": 1, "unet": 3, "scheduler": 3, "vae.decode": 1}
    encoder_calls = result.table[(result.table["submodel"] == "text_encoder")]["call"].nunique()
    assert encoder_calls == 2  # the prompt and the negative prompt


def test_the_python_api_records_what_record_does(sd, tmp_path):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from alignkit.demo.pipeline import generate

    pipe = ORTStableDiffusionPipeline.from_pretrained(str(sd / "onnx"))
    pipe.set_progress_bar_config(disable=True)
    with ak.record(tmp_path / "api.h5", pipe):
        generate(pipe, steps=3)
    with ak.open_dump(tmp_path / "api.h5") as dump:
        assert dump.submodels == ["text_encoder", "unet", "scheduler", "vae.decode"]


def test_a_timestep_cast_inside_optimums_wrapper_is_an_input_mismatch_of_timestep(sd):
    result = ak.compare(record(sd, "torch"), record(sd, "cast", sd / "onnx"))
    fd = result.first_divergence
    assert result.exit_code == 1
    assert (fd.submodel, fd.io, fd.tensor, fd.kind) == ("unet", "inputs", "timestep", "input mismatch"), fd.message


def test_a_faithful_optimum_llama_port_compares_aligned_at_every_token(llama):
    ref, tgt = record(llama, "torch", llama / "torch"), record(llama, "onnx", llama / "onnx")
    with ak.open_dump(tgt) as dump:
        assert dump.submodels == ["decoder"]  # the session inside ORTModelForCausalLM, named as the reference is
    result = ak.compare(ref, tgt)
    assert result.verdict == "aligned" and result.exit_code == 0, result.first_divergence
    assert steps_compared(result) == {"decoder": 4}  # the prefill, then a step a token
    assert any(
        "`logits`: reference shape [1,1,100], target [1,5,100]: compared on the last 1" in w for w in result.warnings
    )


def test_a_quantize_dynamic_int8_decoder_is_judged_in_int8_and_in_tokens(llama, tmp_path):
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(llama / "onnx", tmp_path / "int8")
    quantize_dynamic(
        str(llama / "onnx" / "model.onnx"), str(tmp_path / "int8" / "model.onnx"), weight_type=QuantType.QInt8
    )
    ref, tgt = (
        record(llama, "torch", llama / "torch"),
        record(llama, "onnx", tmp_path / "int8", out=tmp_path / "int8.h5"),
    )
    result = ak.compare(ref, tgt)
    assert result.verdict == "aligned", result.first_divergence
    assert result.warnings[0].startswith("decoder computes in int8, read from its ONNX graph (the graph is quantized")
    assert result.tokens["identical"] == result.tokens["steps"] == 4  # the tokens an int8 port would generate
