"""Options that could not do what they were asked say so, at the end of ``record`` and in the
dump; ``--hook`` imports as the script does; engines are named after what the script calls them."""

import sys
import textwrap

import numpy as np
from rich.console import Console

import alignkit as ak
from alignkit.recording.cli_run import record_command

ENGINE = """
import numpy as np
import torch


class EngineOV:
    def __call__(self, feed):
        return {"out": feed["x"] * 2}


class Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 4)
        self.act = torch.nn.GELU()

    def forward(self, sample):
        return self.act(self.proj(sample))
"""

SCRIPT = """
import numpy as np
import torch
from engine import Denoiser, EngineOV

controlnet = EngineOV()
denoiser = Denoiser()
for step in range(2):
    controlnet({"x": np.ones(3, np.float32)})
    denoiser(torch.ones(1, 4))
"""


def record(tmp_path, script: str, **options):
    """Run ``script`` from a folder of its own (never on sys.path), as ``alignkit record`` does."""
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    (folder / "engine.py").write_text(ENGINE)
    sys.modules.pop("engine", None)  # each test's own, imported from its folder
    (folder / "run.py").write_text(textwrap.dedent(script))
    console = Console(record=True, width=400)
    code = record_command(tmp_path / "d.h5", [str(folder / "run.py")], console=console, **options)
    return code, console.export_text()


def test_hook_imports_a_module_beside_the_script_and_names_engines_as_the_script_does(tmp_path):
    code, text = record(tmp_path, SCRIPT, hooks=["engine:EngineOV", "engine:Denoiser"])
    assert code == 0, text
    with ak.open_dump(tmp_path / "d.h5") as dump:
        assert dump.submodels == ["controlnet", "denoiser"]  # not EngineOV, Denoiser
        assert len(dump.calls[dump.calls["submodel"] == "controlnet"]) == 2


def test_layers_of_a_hooked_torch_module_are_recorded(tmp_path):
    code, text = record(tmp_path, SCRIPT, hooks=["engine:Denoiser"], layers=["denoiser"])
    assert code == 0 and "warning" not in text, text
    with ak.open_dump(tmp_path / "d.h5") as dump:
        assert list(dump["denoiser", 0].layers) == ["proj", "act"]


def test_layers_of_a_zero_code_onnx_session_are_recorded(tmp_path, tiny_onnx):
    script = f"""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession({str(tiny_onnx)!r})
    session.run(None, {{"x": np.ones((2, 4), np.float32)}})
    """
    code, text = record(tmp_path, script, layers=["unet"])
    assert code == 0 and "warning" not in text, text
    with ak.open_dump(tmp_path / "d.h5") as dump:
        layers = dump["unet", 0].layers
        assert list(layers) == ["h", "y"]  # MatMul's output, then the Add's
        np.testing.assert_allclose(layers["y"], dump["unet", 0].outputs["y"])


def test_filters_that_matched_nothing_are_warned_and_kept_in_the_dump(tmp_path):
    code, text = record(
        tmp_path, SCRIPT, hooks=["engine:EngineOV"], tensors="^nothing_has_this_name$", exclude="^typo$"
    )
    assert code == 0
    assert "warning: tensors '^nothing_has_this_name$' matched no tensor of any recorded call" in text
    assert "warning: exclude '^typo$' matched none of the watched submodels (controlnet)" in text
    with ak.open_dump(tmp_path / "d.h5") as dump:
        assert any("matched no tensor" in note for note in dump.metadata["filter_notes"])


def test_layers_asked_of_an_engine_that_has_none_say_so(tmp_path):
    code, text = record(tmp_path, SCRIPT, hooks=["engine:EngineOV"], layers=["controlnet"])
    assert code == 0
    assert "warning: layers: controlnet ran 2 times but no layer output was recorded" in text
    with ak.open_dump(tmp_path / "d.h5") as dump:
        assert any(note.startswith("layers: controlnet") for note in dump.metadata["filter_notes"])


LOOP = """
import torch

from alignkit.demo.pipeline import tiny_pipeline

pipe = tiny_pipeline()
with torch.no_grad():
    embeddings = pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long))[0]  # before any pipeline call
    pipe.scheduler.set_timesteps(2)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for t in pipe.scheduler.timesteps:  # a hand-written loop: the pipeline itself is never called
        noise = pipe.unet(pipe.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=embeddings).sample
        latents = pipe.scheduler.step(noise, t, latents).prev_sample
    pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
"""


def test_a_pipelines_components_are_recorded_before_and_without_a_pipeline_call(tmp_path):
    code, text = record(tmp_path, LOOP, layers=["vae.decode"])
    assert code == 0 and "warning" not in text, text
    with ak.open_dump(tmp_path / "d.h5") as dump:
        assert dump.submodels == ["text_encoder", "unet", "scheduler", "vae.decode"]
        assert dump.steps("unet") == [0, 1] and dump.metadata["step_source"] == "scheduler"
        assert "decoder.conv_out" in dump["vae.decode", 2].layers  # the module vae.decode runs


def test_layers_asked_of_a_submodel_watched_through_its_methods_name_the_methods(tmp_path):
    code, text = record(tmp_path, LOOP, layers=["vae"])
    assert "warning: layers: 'vae' is recorded through its methods, as vae.decode, vae.encode: ask for those" in text


SPREAD_ENGINE = """
import numpy as np


class Kernel:
    '''A model whose kernels are not bit-deterministic: each run adds its own rounding noise.'''

    def __init__(self, noise):
        rng = np.random.default_rng(0)
        self.w = rng.standard_normal((64, 64)).astype(np.float32) / 8
        self.noise = noise

    def __call__(self, sample):
        out = sample @ self.w
        return out + self.noise * np.random.default_rng().standard_normal(out.shape).astype(np.float32) * out.std()
"""

SPREAD_SCRIPT = """
import sys

import numpy as np
from noisy_kernels import Kernel

unet = Kernel(float(sys.argv[1]))
x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
for step in range(2):
    x = unet(x)
"""


def test_repeat_keeps_the_references_run_to_run_spread_and_compare_takes_it_as_its_floor(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "noisy_kernels.py").write_text(SPREAD_ENGINE)
    (folder / "run.py").write_text(SPREAD_SCRIPT)
    ref, tgt = tmp_path / "ref.h5", tmp_path / "tgt.h5"
    console = Console(record=True, width=400)
    hooks = ["noisy_kernels:Kernel"]
    assert record_command(ref, [str(folder / "run.py"), "0.002"], hooks=hooks, console=console, repeat=2) == 0
    assert not list(tmp_path.glob(".ref.h5.run*"))  # the scratch runs are gone
    assert record_command(tgt, [str(folder / "run.py"), "0.002"], hooks=hooks, console=console) == 0
    with ak.open_dump(ref) as dump:
        assert dump.metadata["repeat"]["runs"] == 2 and dump.metadata["repeat"]["measured"] > 0
    without = ak.compare(tmp_path / "tgt.h5", tmp_path / "tgt.h5")  # sanity: a run against itself
    assert without.verdict == "aligned"
    result = ak.compare(ref, tgt)
    assert result.verdict == "aligned", (result.first_divergence.message, result.first_divergence.evidence)
    assert any("within 10× the reference's own run-to-run spread" in w for w in result.warnings), result.warnings
    worse = tmp_path / "worse.h5"
    assert record_command(worse, [str(folder / "run.py"), "0.2"], hooks=hooks, console=console) == 0
    fd = ak.compare(ref, worse).first_divergence
    assert fd.kind == "local error" and "× the reference's run-to-run spread" in fd.message
