"""Every kind of watched object records the same names, and leaves no trace."""

import inspect
import threading

import numpy as np
import pytest
import torch

import alignkit as ak


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        return (self.lin(sample) + timestep.float(),)


class Engine:
    """An engine object called directly and through a named method."""

    def __call__(self, x):
        return x

    def infer(self, x):
        return x


class EngineOV:
    """Like seed 001's engine: a dict feed with compiler-made names, a bare array back."""

    def __init__(self, model_path):
        self.model_path = model_path

    def __call__(self, args):
        return args["input.1"] * 2 + args["timesteps.1"][:, None]


def test_torch_module_positional_and_keyword_calls_record_the_same(tmp_path):
    net = Net()
    x, t = torch.ones(2, 4), torch.tensor(3)
    with ak.record(tmp_path / "d.h5", net, label="x"):
        net(x, t)
        ak.step()
        net(sample=x, timestep=t)
    assert not net._forward_hooks and not net._forward_pre_hooks
    with ak.open_dump(tmp_path / "d.h5") as d:
        a, b = d["Net", 0], d["Net", 1]
        assert [i.name for i in a.info("inputs")] == [i.name for i in b.info("inputs")] == ["sample", "timestep"]
        assert a.values() == {}  # only what the caller passed; defaults are not invented
        np.testing.assert_array_equal(a.outputs["output.0"], b.outputs["output.0"])
        assert a.tensor("inputs", "timestep").dtype == np.int64


def test_a_compiled_module_records_as_the_module_it_compiles(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, sample, timestep):
            return self.lin(sample) * timestep

    net = Net()
    for path, model in ((tmp_path / "eager.h5", net), (tmp_path / "compiled.h5", torch.compile(net, backend="eager"))):
        with ak.Recorder(path, layers=["Net"]) as rec:
            rec.watch(model)
            model(torch.ones(2), torch.tensor(3.0))
    with ak.open_dump(tmp_path / "eager.h5") as eager, ak.open_dump(tmp_path / "compiled.h5") as compiled:
        assert compiled.submodels == eager.submodels == ["Net"]
        assert list(compiled["Net", 0].inputs) == list(eager["Net", 0].inputs) == ["sample", "timestep"]
        assert list(compiled["Net", 0].layers) == list(eager["Net", 0].layers) == ["lin"]


def test_hooks_are_removed_after_an_exception(tmp_path):
    net = Net()
    forward = net.forward
    with pytest.raises(RuntimeError):
        with ak.record(tmp_path / "d.h5", net):
            net(torch.ones(3, 5), torch.tensor(1))  # wrong shape: raises inside forward
    assert not net._forward_hooks and not net._forward_pre_hooks
    assert net.forward == forward
    with ak.open_dump(tmp_path / "d.h5") as d:
        assert "RuntimeError" in d["Net", 0].error


def test_engine_with_dict_feed_and_class_swap_is_undone(tmp_path):
    engine = EngineOV("./unet/compilation.bmodel")
    feed = {"input.1": np.ones((2, 4), np.float32), "timesteps.1": np.array([999, 999], np.int64)}
    with ak.record(tmp_path / "d.h5") as rec:
        rec.watch(engine, "unet")
        assert isinstance(engine, EngineOV)
        engine(feed)
    assert type(engine) is EngineOV
    with ak.open_dump(tmp_path / "d.h5") as d:
        call = d["unet", 0]
        assert list(call.inputs) == ["input.1", "timesteps.1"]
        assert call.inputs["timesteps.1"].dtype == np.int64
        assert list(call.outputs) == ["output"]


def test_method_and_function_watching(tmp_path):
    class Vae:
        def decode(self, z, return_dict=True):
            return {"sample": z + 1}

    vae = Vae()

    def postprocess(image, scale=2.0):
        return image * scale

    with ak.record(tmp_path / "d.h5") as rec:
        rec.watch(vae, "vae.decode", method="decode")
        assert inspect.signature(vae.decode) == inspect.signature(Vae().decode)
        wrapped = rec.watch(postprocess)
        assert inspect.signature(wrapped) == inspect.signature(postprocess)
        wrapped(vae.decode(np.zeros(3))["sample"])
    assert "decode" not in vae.__dict__
    with ak.open_dump(tmp_path / "d.h5") as d:
        assert d.submodels == ["vae.decode", "postprocess"]
        np.testing.assert_array_equal(d["postprocess", 0].outputs["output"], [2, 2, 2])


def test_onnxruntime_session_records_feed_and_output_names(tmp_path, tiny_onnx):
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), np.float32)
    with ak.record(tmp_path / "d.h5", session):
        (y,) = session.run(None, {"x": x})
    assert "run" not in session.__dict__
    with ak.open_dump(tmp_path / "d.h5") as d:
        call = d["unet", 0]
        np.testing.assert_array_equal(call.inputs["x"], x)
        np.testing.assert_array_equal(call.outputs["y"], y)


class SessionWrapper:
    """The shape of diffusers' OnnxRuntimeModel (deprecated there) and similar wrappers: the
    ONNX Runtime session in ``.model``, called with the feed as keyword arguments."""

    def __init__(self, session):
        self.model = session

    def __call__(self, **feed):
        return self.model.run(None, feed)


def test_a_pipeline_of_onnx_sessions_records_each_under_its_component_name(tmp_path, tiny_onnx):
    import onnxruntime as ort
    from diffusers import DiffusionPipeline

    class OnnxPipeline(DiffusionPipeline):
        def __init__(self, text_encoder, unet):
            super().__init__()
            self.register_modules(text_encoder=text_encoder, unet=unet)

        def __call__(self, x):
            h = self.text_encoder(x=x)[0]  # (2, 3): padded back to the (2, 4) that the model takes
            return self.unet(x=np.concatenate([h, h[:, :1]], axis=1))[0]

    def session():
        return SessionWrapper(ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]))

    pipe = OnnxPipeline(text_encoder=session(), unet=session())
    x = np.ones((2, 4), np.float32)
    with ak.record(tmp_path / "d.h5", pipe):
        y = pipe(x)
    assert "run" not in vars(pipe.unet.model) and "run" not in vars(pipe.text_encoder.model)
    with ak.open_dump(tmp_path / "d.h5") as d:
        assert d.submodels == ["text_encoder", "unet"]  # not both "unet" from unet/model.onnx
        np.testing.assert_array_equal(d["text_encoder", 0].inputs["x"], x)
        np.testing.assert_array_equal(d["unet", 0].outputs["y"], y)
        assert len(d) == 2  # each session once: the wrapper is not recorded beside it


def test_an_object_watched_twice_is_recorded_once(tmp_path):
    from alignkit.demo.pipeline import generate, tiny_pipeline
    from alignkit.errors import UsageError

    pipe = tiny_pipeline()
    with ak.record(tmp_path / "p.h5", pipe, pipe.unet, pipe.scheduler):  # the UNet and scheduler also on their own
        generate(pipe, 2)
    with ak.open_dump(tmp_path / "p.h5") as d:
        assert d.submodels == ["text_encoder", "unet", "scheduler", "vae.decode"]
        assert len(d.calls[d.calls["submodel"] == "unet"]) == 2

    engine = Engine()
    with ak.Recorder(tmp_path / "e.h5") as rec:
        assert rec.watch(engine, "unet") is rec.watch(engine) is rec.watch(engine, "unet") is engine
        with pytest.raises(UsageError, match="this Engine is already watched as 'unet'; it cannot also be 'vae'"):
            rec.watch(engine, "vae")
        rec.watch(engine, method="infer", name="infer")
        rec.watch(engine, method="infer")
        engine(np.ones(2))
        engine.infer(np.ones(2))
    with ak.open_dump(tmp_path / "e.h5") as d:
        assert d.submodels == ["unet", "infer"] and len(d) == 2

    other = Engine()
    with ak.Recorder(tmp_path / "m.h5") as rec:  # a watched method first does not stand for the whole object
        rec.watch(other, method="infer", name="infer")
        rec.watch(other, "engine")
        other(np.ones(2))
        other.infer(np.ones(2))
    with ak.open_dump(tmp_path / "m.h5") as d:
        assert d.submodels == ["engine", "infer"]


def test_models_loaded_one_after_another_are_each_recorded_under_their_own_name(tmp_path):
    import gc

    ids = []
    with ak.Recorder(tmp_path / "x.h5") as rec:
        for i in range(30):  # load, run, free: a freed model's id goes to the next one
            model = torch.nn.Linear(4, 4)
            ids.append(id(model))
            rec.watch(model, f"model{i}")
            model(torch.ones(1, 4))
            del model
            gc.collect()
    assert len(set(ids)) < len(ids)  # ids were reused, so the case was met
    with ak.open_dump(tmp_path / "x.h5") as dump:
        assert dump.submodels == [f"model{i}" for i in range(30)]


def test_filters_that_match_nothing_are_warned_about(tmp_path):
    def run(**filters):
        with pytest.warns(RuntimeWarning) as caught:
            with ak.Recorder(tmp_path / "d.h5", **filters) as rec:
                f = rec.watch(lambda x: x, "unet")
                for _ in range(3):
                    f(np.ones(2))
                    ak.step()
        return [str(w.message) for w in caught]

    assert run(include="unett") == [
        "alignkit: include 'unett' matched none of the watched submodels (unet), so none was recorded"
    ]
    assert run(layers=["vae"]) == [
        "alignkit: layers: 'vae' is not a watched submodel (unet), so no layers were recorded for it"
    ]
    assert run(steps=[7]) == [
        "alignkit: steps: none of the steps asked for ran (the run had steps 0–3), so no calls were recorded"
    ]


@pytest.mark.parametrize("first_stopped", ["outer", "inner"])
def test_two_recorders_on_one_object_stop_in_either_order_without_a_trace(tmp_path, first_stopped):
    engine = Engine()
    outer, inner = ak.Recorder(tmp_path / "outer.h5").start(), ak.Recorder(tmp_path / "inner.h5").start()
    for rec in (outer, inner):
        rec.watch(engine, "engine")
        rec.watch(engine, method="infer", name="infer")
    engine(np.ones(1)), engine.infer(np.ones(1))
    (outer if first_stopped == "outer" else inner).stop()
    engine(np.ones(1)), engine.infer(np.ones(1))  # the other still records
    (inner if first_stopped == "outer" else outer).stop()
    engine(np.ones(1)), engine.infer(np.ones(1))
    assert type(engine) is Engine and "infer" not in vars(engine)  # no trace of either
    counts = {"outer": 2 if first_stopped == "outer" else 4, "inner": 4 if first_stopped == "outer" else 2}
    for name, n in counts.items():
        with ak.open_dump(tmp_path / f"{name}.h5") as d:
            assert len(d) == n, name


def test_an_object_of_a_built_in_class_is_recorded_through_the_wrapper_returned(tmp_path):
    import functools

    scaled = functools.partial(np.multiply, 2.0)  # its class cannot take a recording subclass
    with ak.Recorder(tmp_path / "d.h5") as rec:
        watched = rec.watch(scaled, "scaled")
        assert watched is not scaled
        np.testing.assert_array_equal(watched(np.ones(2)), [2.0, 2.0])
    with ak.open_dump(tmp_path / "d.h5") as d:
        np.testing.assert_array_equal(d["scaled", 0].outputs["output"], [2.0, 2.0])
    with pytest.warns(
        RuntimeWarning, match="'scaled' could not be watched in place .* never called: call that instead"
    ):
        with ak.Recorder(tmp_path / "unused.h5") as rec:
            rec.watch(scaled, "scaled")
            scaled(np.ones(2))  # the original, not the wrapper: nothing is recorded, and that is said


def test_calls_from_several_threads_are_all_recorded(tmp_path):
    net = Net()
    with ak.record(tmp_path / "d.h5", net):

        def work(i):
            for _ in range(10):
                net(torch.full((1, 4), float(i)), torch.tensor(i))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with ak.open_dump(tmp_path / "d.h5") as d:
        assert len(d) == 40
        for call in d:
            i = int(call.inputs["timestep"])
            np.testing.assert_array_equal(call.inputs["sample"], np.full((1, 4), float(i)))


def test_filters_by_submodel_tensor_and_step(tmp_path):
    a, b = Net(), Net()
    with ak.record(tmp_path / "d.h5", include="^keep", tensors="sample|output", steps=[1]) as rec:
        rec.watch(a, "keep")
        rec.watch(b, "drop")
        for _ in range(3):
            a(torch.ones(1, 4), torch.tensor(0))
            b(torch.ones(1, 4), torch.tensor(0))
            ak.step()
    with ak.open_dump(tmp_path / "d.h5") as d:
        assert d.submodels == ["keep"] and list(d.calls["step"]) == [1]
        assert [i.name for i in d["keep", 1].info("inputs")] == ["sample"]


def test_without_a_step_source_each_call_is_a_step(tmp_path):
    net = Net()
    with ak.record(tmp_path / "d.h5", net):
        for _ in range(3):
            net(torch.ones(1, 4), torch.tensor(0))
    with ak.open_dump(tmp_path / "d.h5") as d:
        assert d.steps("Net") == [0, 1, 2]


def test_a_diffusers_scheduler_is_watched_on_its_step_which_ends_each_step(tmp_path):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    unet = torch.nn.Identity()
    with ak.record(tmp_path / "s.h5", unet, scheduler) as rec:
        assert rec.watch(scheduler) is scheduler  # watched once, under its first name
        latents = torch.zeros(1, 4, 2, 2)
        for t in scheduler.timesteps:
            latents = scheduler.step(unet(latents), t, latents).prev_sample
    assert "step" not in vars(scheduler)
    with ak.open_dump(tmp_path / "s.h5") as dump:
        assert dump.submodels == ["Identity", "scheduler"]
        assert dump.metadata["step_source"] == "scheduler"
        assert list(dump.calls.loc[dump.calls["submodel"] == "Identity", "step"]) == [0, 1, 2, 3]
        assert [int(dump["scheduler", s].inputs["timestep"]) for s in range(4)] == [int(t) for t in scheduler.timesteps]


def test_a_deep_copy_of_a_watched_object_runs_its_own_methods_unwatched(tmp_path):
    """LTX-2's pipelines make their audio scheduler as ``copy.deepcopy(self.scheduler)``: the
    copy must step itself, not the scheduler it was copied from."""
    import copy

    from diffusers import EulerDiscreteScheduler

    class Vae(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def decode(self, z):
            return z * self.scale

    scheduler, vae = EulerDiscreteScheduler(), Vae()
    scheduler.set_timesteps(3)
    x = torch.ones(1, 4, 2, 2)
    with ak.Recorder(tmp_path / "c.h5") as rec:
        rec.watch(scheduler)
        rec.watch(vae, method="decode")
        audio, vae_copy = copy.deepcopy(scheduler), copy.deepcopy(vae)
        audio.step(x, audio.timesteps[0], x)
        with torch.no_grad():
            vae_copy.scale.fill_(3.0)
            assert float(vae_copy.decode(x).mean()) == 3.0 and float(vae.decode(x).mean()) == 1.0
    assert (audio.step_index, scheduler.step_index) == (1, None)  # the copy stepped, the original did not
    with ak.open_dump(tmp_path / "c.h5") as dump:
        assert list(dump.calls["submodel"]) == ["Vae.decode"]  # the original's call only


def test_a_deep_copy_of_a_watched_module_is_not_recorded_under_its_name(tmp_path):
    import copy

    unet = torch.nn.Linear(2, 2)
    with ak.record(tmp_path / "m.h5", unet):
        twin = copy.deepcopy(unet)  # torch copies the forward hooks along
        with torch.no_grad():
            twin(torch.ones(2)), unet(torch.ones(2)), twin(torch.ones(2))
    with ak.open_dump(tmp_path / "m.h5") as dump:
        assert len(dump) == 1


def test_a_deep_copys_layers_do_not_join_the_watched_modules_call(tmp_path):
    import copy

    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with ak.record(tmp_path / "l.h5", layers=["Sequential"]) as rec:
        rec.watch(seq)
        twin = copy.deepcopy(seq)
        seq.register_forward_pre_hook(lambda mod, args: twin(args[0]))  # the copy runs inside the watched call
        with torch.no_grad():
            seq(torch.ones(2))
    with ak.open_dump(tmp_path / "l.h5") as dump:
        assert list(dump["Sequential", 0].layers) == ["0", "1"]  # not "0#2", "1#2" from the copy
