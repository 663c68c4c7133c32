"""An OpenVINO port as seed 002 deploys one: a hand-written engine around a compiled model,
put in the pipeline in place of the UNet, recorded with no code change."""

import os
import subprocess
import sys
import textwrap

import pytest

import alignkit as ak
from alignkit.recording.cli_run import record_command
from tests.conftest import ROOT

SCRIPT = """
import sys

import numpy as np
import openvino as ov
import torch

from alignkit.demo.pipeline import generate, tiny_pipeline


class EngineOV:
    def __init__(self, unet, hint):
        example = {"sample": torch.zeros(2, 4, 16, 16), "timestep": torch.tensor(999.0),
                   "encoder_hidden_states": torch.zeros(2, 77, 16)}
        model = ov.convert_model(unet, example_input=example)
        if hint == "int8":  # NNCF's post-training quantization, calibrated on a few denoising inputs
            import nncf

            rng = np.random.default_rng(0)
            calibration = [
                {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32), "timestep": np.float32(t),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 16), dtype=np.float32)}
                for t in (999, 666, 333)
            ]
            model, hint = nncf.quantize(model, nncf.Dataset(calibration), subset_size=3), "f32"
        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint} if hint else {})
        self.config, self.dtype, self.device = unet.config, unet.dtype, unet.device

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        feed = {"sample": sample.numpy(), "timestep": np.asarray(timestep, np.float32),
                "encoder_hidden_states": encoder_hidden_states.numpy()}
        return (torch.from_numpy(self.compiled(feed)[0]),)


pipe = tiny_pipeline()
if sys.argv[1] != "torch":
    pipe.unet = EngineOV(pipe.unet, sys.argv[1] if sys.argv[1] != "default" else None)
generate(pipe, steps=3)
"""


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Each run recorded as a user records it: `alignkit record` in a fresh process (a process
    that has imported diffusers before differs: its pipeline classes already exist)."""
    folder = tmp_path_factory.mktemp("openvino")
    (folder / "run.py").write_text(textwrap.dedent(SCRIPT))
    out = {}
    for run in ("torch", "f32", "bf16", "int8"):
        out[run] = folder / f"{run}.h5"
        proc = subprocess.run(
            [sys.executable, "-m", "alignkit", "record", "-o", str(out[run]), "--", str(folder / "run.py"), run],
            capture_output=True,
            text=True,
            cwd=folder,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_an_openvino_unet_in_f32_records_zero_code_and_compares_aligned(dumps):
    with ak.open_dump(dumps["f32"]) as dump:
        assert dump.submodels == ["text_encoder", "unet", "scheduler", "vae.decode"]  # named after the component
        unet = dump.descriptions["unet"]
        assert (unet["engine"], unet["device"], unet["inference_precision"], unet["precision"]) == (
            "openvino",
            "CPU",
            "f32",
            "fp32",
        )
        assert list(dump["unet", 0].inputs) == ["sample", "timestep", "encoder_hidden_states"]
    result = ak.compare(dumps["torch"], dumps["f32"])
    assert result.verdict == "aligned" and result.exit_code == 0, result.first_divergence
    compared = result.table.groupby("submodel")["step"].nunique().to_dict()
    assert compared == {"text_encoder": 1, "unet": 3, "scheduler": 3, "vae.decode": 1}


def test_an_openvino_unet_in_bf16_behind_float32_io_is_judged_against_the_bf16_floor(dumps):
    with ak.open_dump(dumps["bf16"]) as dump:
        recorded = dump.descriptions["unet"]["precision"]  # bf16 where the CPU computes in it, else f32
    declared = {} if recorded == "bf16" else {"unet": "bf16"}
    result = ak.compare(dumps["torch"], dumps["bf16"], target_precision=declared)
    where = "OpenVINO's inference precision" if recorded == "bf16" else "as declared"
    assert result.warnings[0].startswith(f"unet computes in bf16, {where}: its outputs' error is up to ")
    fd = result.first_divergence
    if recorded == "bf16" and fd is not None:  # the tiny UNet's timestep embedding (weights ×30) suffers in bf16
        assert (fd.submodel, fd.kind) == ("unet", "local error")
        assert fd.message.endswith("× the bf16 floor is more than that precision loses")
        assert "unet computes in bf16 (OpenVINO's inference precision)" in fd.message
    else:  # within the bf16 floor (a CPU without bf16 computes in f32): expected precision loss
        assert result.verdict == "aligned", fd
        assert result.warnings[0].endswith("expected precision loss")


def test_an_nncf_int8_unet_is_named_int8_and_its_calibration_is_not_recorded(dumps):
    with ak.open_dump(dumps["int8"]) as dump:
        # NNCF runs the model on its calibration set through compiled models of its own: none is recorded
        assert dump.submodels == ["text_encoder", "unet", "scheduler", "vae.decode"]
        assert len(dump) == 9
        unet = dump.descriptions["unet"]
        assert (unet["inference_precision"], unet["precision"]) == ("f32", "int8") and int(unet["quantized_layers"]) > 0
    result = ak.compare(dumps["torch"], dumps["int8"])
    assert result.warnings[0].startswith(
        f"unet computes in int8, OpenVINO runs {unet['quantized_layers']} of its convolutions and matrix products on "
        "8-bit integers (the graph is quantized: its floor is an estimate"
    )
    fd = result.first_divergence
    if fd is not None:  # calibrated on three noise samples, the tiny UNet may lose more than int8's floor
        assert (fd.submodel, fd.kind) == ("unet", "local error")
        assert "unet computes in int8 (OpenVINO runs" in fd.message and "× the int8 floor" in fd.message


LINEAR_REQUEST = """
import numpy as np
import openvino as ov
import torch

model = ov.convert_model(torch.nn.Linear(4, 3), example_input=torch.ones(2, 4))
decoder = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
request = decoder.create_infer_request()
"""  # an infer request of an unnamed model, for the script that uses it to go on


def test_an_infer_request_records_under_the_name_the_script_gives_it(tmp_path):
    script = (
        LINEAR_REQUEST
        + """for _ in range(2):
    request.infer({0: np.ones((2, 4), np.float32)})
"""
    )
    (tmp_path / "run.py").write_text(script)
    assert record_command(tmp_path / "ov.h5", [str(tmp_path / "run.py")], layers=["openvino"]) == 0
    with ak.open_dump(tmp_path / "ov.h5") as dump:
        assert len(dump.calls) == 2 and dump.submodels == ["openvino"]  # a request of an unnamed model
        assert dump.descriptions["openvino"]["precision"] == "fp32"
        assert any("OpenVINO model, whose layers alignkit cannot record" in n for n in dump.metadata["filter_notes"])


def test_a_float_fed_to_an_input_declared_int64_is_recorded_as_openvino_computes_with_it(tmp_path):
    """optimum-intel exports a UNet's ``timestep`` as int64: OpenVINO truncates the float it is
    fed. The recording holds what the engine computed with, and compare names the conversion."""
    script = """
import sys

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch

t = ops.parameter([1], ov.Type.i64 if sys.argv[1] == "int64" else ov.Type.f32, name="timestep")
x = ops.parameter([4], ov.Type.f32, name="sample")
out = ops.multiply(x, ops.convert(t, ov.Type.f32))
unet = ov.Core().compile_model(ov.Model([out], [x, t], "unet"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
for step, timestep in enumerate((3.0, 2.5)):
    unet({"sample": np.ones(4, np.float32), "timestep": torch.tensor([timestep])})
"""
    (tmp_path / "run.py").write_text(script)
    for run in ("float32", "int64"):
        assert record_command(tmp_path / f"{run}.h5", [str(tmp_path / "run.py"), run]) == 0
    with ak.open_dump(tmp_path / "int64.h5") as dump:
        assert dump.submodels == ["unet"]
        assert [int(dump["unet", s].inputs["timestep"][0]) for s in (0, 1)] == [3, 2]  # 2.5 truncated, as OpenVINO does
        assert dump["unet", 1].inputs["timestep"].dtype == "int64"
    result = ak.compare(tmp_path / "float32.h5", tmp_path / "int64.h5")
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == ("unet", 1, "timestep", "input mismatch")
    assert "unet's OpenVINO model declares `timestep` int64, and OpenVINO converts the float32 it is fed" in fd.message
    assert "glue code" not in fd.message


def test_an_infer_request_run_with_start_async_and_wait_is_recorded_with_its_outputs(tmp_path):
    script = (
        LINEAR_REQUEST
        + """for i in range(3):
    request.start_async({0: ov.Tensor(np.full((2, 4), float(i), np.float32))})
    request.wait()
    out = request.get_output_tensor(0).data.copy()
"""
    )
    (tmp_path / "run.py").write_text(script)
    assert record_command(tmp_path / "ov.h5", [str(tmp_path / "run.py")]) == 0
    with ak.open_dump(tmp_path / "ov.h5") as dump:
        assert len(dump) == 3
        third = dump["openvino", 2]
        value, result = next(iter(third.inputs.values())), next(iter(third.outputs.values()))
        assert value.tolist() == [[2.0] * 4] * 2 and result.shape == (2, 3)


def test_ports_that_share_a_name_are_named_by_position():
    """OpenVINO's CPU plugin gives an SDXL text encoder's ``last_hidden_state`` the name of
    ``hidden_states.5``: neither name can be trusted, so both ports are named by place."""
    from alignkit.recording.openvino import port_names

    class Port:
        def __init__(self, name):
            self.name = name

        def get_any_name(self):
            if self.name is None:
                raise RuntimeError("no name")
            return self.name

    names = ["text_embeds", "hidden_states.5", "hidden_states.0", None, "hidden_states.5"]
    assert port_names([Port(n) for n in names]) == [
        "text_embeds",
        "output.1",
        "hidden_states.0",
        "output.3",
        "output.4",
    ]
