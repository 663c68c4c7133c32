"""The process-wide patches of ``alignkit record``: ``--hook`` and ``--step-on``."""

import sys
import types

import numpy as np
import pytest
import torch

import alignkit as ak
from alignkit.errors import UsageError
from alignkit.recording.auto import AutoWatch


class Engine:
    def __call__(self, feed):
        return {"out": feed["x"] * 2}


class Net(torch.nn.Module):
    def forward(self, sample, timestep):
        return sample * timestep


class Tokenizer:
    def encode(self, text):
        return [len(text)]


@pytest.fixture
def engines(monkeypatch):
    module = types.ModuleType("engines")
    module.Engine, module.Net, module.Tokenizer = Engine, Net, Tokenizer
    monkeypatch.setitem(sys.modules, "engines", module)
    return module


def test_a_class_named_alone_records_its_instances_calls_not_its_constructor(tmp_path, engines):
    originals = Engine.__dict__["__call__"], Net.__dict__["forward"]
    with ak.Recorder(tmp_path / "x.h5") as rec:
        auto = AutoWatch(rec, hooks=["engines:Engine", "engines:Net"])
        auto.install()
        try:
            assert engines.Engine is Engine  # the class stays itself: isinstance still works
            engines.Engine()({"x": np.ones(3, np.float32)})
            engines.Net()(torch.ones(2), timestep=3)
        finally:
            auto.remove()
    assert (Engine.__dict__["__call__"], Net.__dict__["forward"]) == originals  # and no trace is left
    with ak.open_dump(tmp_path / "x.h5") as dump:
        assert dump.submodels == ["Engine", "Net"]
        assert {name: d["class"] for name, d in dump.descriptions.items()} == {
            "Engine": f"{__name__}.Engine",
            "Net": f"{__name__}.Net",
        }
        assert list(dump["Net", 0].inputs) == ["sample", "timestep"]  # bound to forward's parameters
        np.testing.assert_array_equal(dump["Engine", 0].outputs["out"], np.full(3, 2, np.float32))


def test_a_class_whose_instances_cannot_be_called_asks_for_the_method(tmp_path, engines):
    with ak.Recorder(tmp_path / "x.h5") as rec:
        with pytest.raises(
            UsageError, match=r"Tokenizer instances are not callable; name the method .* engines:Tokenizer\.infer"
        ):
            AutoWatch(rec, hooks=["engines:Tokenizer"]).install()


def test_a_hand_written_loops_diffusers_scheduler_is_recorded_and_ends_each_step(tmp_path, engines):
    """A port that drives a diffusers scheduler itself, around an engine, gets the same steps
    and the same ``scheduler`` glue as a pipeline would give it."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(3)
    with ak.Recorder(tmp_path / "loop.h5") as rec:
        auto = AutoWatch(rec, hooks=["engines:Engine"])
        auto.install()
        try:
            engine, latents = engines.Engine(), torch.ones(1, 4, 2, 2)
            for t in scheduler.timesteps:
                noise = torch.from_numpy(engine({"x": latents.numpy()})["out"])
                latents = scheduler.step(noise, t, latents).prev_sample
        finally:
            auto.remove()
    assert not hasattr(EulerDiscreteScheduler.step, "__alignkit__") and "step" not in vars(scheduler)  # no trace left
    with ak.open_dump(tmp_path / "loop.h5") as dump:
        assert dump.metadata["step_source"] == "scheduler"
        assert dump.submodels == ["Engine", "scheduler"]
        assert list(dump.calls["step"]) == [0, 0, 1, 1, 2, 2]  # each engine call with its step's scheduler call
        first = dump["scheduler", 0]
        assert list(first.inputs) == ["model_output", "timestep", "sample"]
        assert float(first.inputs["timestep"]) == float(scheduler.timesteps[0])


def test_a_scripts_session_runs_through_an_io_binding_are_recorded(tmp_path, tiny_onnx):
    import onnxruntime as ort

    originals = {m: vars(ort.InferenceSession).get(m) for m in ("run", "run_with_iobinding", "run_with_ort_values")}
    binding_methods = dict(vars(ort.IOBinding))
    with ak.Recorder(tmp_path / "x.h5") as rec:
        auto = AutoWatch(rec)
        auto.install()
        try:
            session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
            binding = session.io_binding()
            binding.bind_output("y")
            for step in range(3):
                binding.bind_cpu_input("x", np.full((2, 4), step, np.float32))
                session.run_with_iobinding(binding)
        finally:
            auto.remove()
    assert {m: vars(ort.InferenceSession).get(m) for m in originals} == originals
    assert dict(vars(ort.IOBinding)) == binding_methods
    with ak.open_dump(tmp_path / "x.h5") as dump:
        assert dump.submodels == ["unet"] and dump.steps("unet") == [0, 1, 2]
        assert dump.descriptions == {
            "unet": {
                "class": "onnxruntime.capi.onnxruntime_inference_collection.InferenceSession",
                "engine": "onnxruntime",
                "device": "CPUExecutionProvider",
                "precision": "fp32",  # read from the graph: no float16 weights or casts, no quantized operators
            }
        }
        assert [float(dump["unet", s].inputs["x"].mean()) for s in range(3)] == [0.0, 1.0, 2.0]
        assert list(dump["unet", 2].outputs) == ["y"]


def test_a_scheduler_a_pipeline_copies_and_steps_inside_its_call_is_its_own_business(tmp_path):
    """LTX-2 steps a deep copy of its scheduler for the audio: not a second clock."""
    import copy

    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    class AudioVideoPipeline(DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

        def __call__(self, steps):
            self.scheduler.set_timesteps(steps)
            audio_scheduler = copy.deepcopy(self.scheduler)
            video = audio = torch.ones(1, 4, 2, 2)
            for t in self.scheduler.timesteps:
                video = self.scheduler.step(video * 0.5, t, video).prev_sample
                audio = audio_scheduler.step(audio * 0.25, t, audio).prev_sample
            return video, audio

    pipe = AudioVideoPipeline(EulerDiscreteScheduler())
    unwatched = pipe(3)
    with ak.Recorder(tmp_path / "av.h5") as rec:
        auto = AutoWatch(rec)
        auto.install()
        try:
            watched = pipe(3)
        finally:
            auto.remove()
    for a, b in zip(watched, unwatched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the audio scheduler stepped itself
    with ak.open_dump(tmp_path / "av.h5") as dump:
        assert dump.submodels == ["scheduler"] and dump.steps("scheduler") == [0, 1, 2]


def test_two_patches_of_one_base_both_reach_a_subclass_made_later():
    """diffusers imports its pipeline classes lazily: a pipeline class made after the patches
    must get both ``__call__`` and ``__init__`` wrapped (a later patch once replaced the
    earlier one's hook, and a fresh process recorded an engine swapped into a pipeline under
    the engine's own name instead of the component's)."""
    from alignkit.recording.auto import _wrap_subclasses

    class Base:
        def __init__(self):
            self.made = True

        def __call__(self):
            return "called"

    seen = []

    def around(tag):
        def wrap(original):
            def replacement(self, *args, **kwargs):
                seen.append(tag)
                return original(self, *args, **kwargs)

            return replacement

        return wrap

    first, second = (
        _wrap_subclasses(Base, "__call__", around("call")),
        _wrap_subclasses(Base, "__init__", around("init")),
    )

    class Later(Base):
        def __init__(self):
            super().__init__()

        def __call__(self):
            return "later"

    assert Later()() == "later" and seen == ["init", "call"]
    second.remove(), first.remove()
    seen.clear()
    assert Later()() == "later" and seen == [] and "__init_subclass__" not in Base.__dict__
