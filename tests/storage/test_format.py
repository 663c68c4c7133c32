"""The dump is readable with plain h5py following docs/format.md; foreign files are refused."""

import json

import h5py
import numpy as np
import pytest
import torch

import alignkit as ak
from alignkit.errors import CallNotFoundError, FormatVersionError, NotADumpError


@pytest.fixture()
def dump_path(tmp_path):
    path = tmp_path / "run.h5"
    with ak.Recorder(path, label="ref") as rec:
        fn = rec.watch(lambda sample, timestep, mode="x": {"out/put": sample * 2}, "my/model")
        for step in range(3):
            fn(torch.full((2, 2), float(step)).to(torch.bfloat16), torch.tensor(step, dtype=torch.int64), mode="fast")
            ak.step()
    return path


def test_plain_h5py_reads_the_documented_layout(dump_path):
    text = lambda column: [s.decode() if isinstance(s, bytes) else s for s in column]  # noqa: E731
    with h5py.File(dump_path, "r") as f:
        assert f.attrs["format"] == "alignkit-dump" and f.attrs["format_version"] == 2
        assert f.attrs["label"] == "ref" and f.attrs["complete"]
        assert f.attrs["step_source"] == "explicit"
        assert "torch" in json.loads(f.attrs["versions"])
        assert json.loads(f.attrs["calls_run"]) == {"my/model": 3}
        assert "filters" not in f.attrs and "error" not in f.attrs
        index = f["index"][()]
        assert text(index["submodel"]) == ["my/model"] * 3
        assert list(index["step"]) == [0, 1, 2] and list(index["call"]) == [0, 0, 0]
        assert text(index["error"]) == ["", "", ""]
        assert json.loads(json.loads(text(index["inputs_values"])[2])["mode"]) == "fast"
        tensors = f["tensors"][()]
        assert len(tensors) == 3 * 3 and list(tensors["seq"][:3]) == [0, 0, 0]
        assert text(tensors["io"][:3]) == ["inputs", "inputs", "outputs"]
        assert text(tensors["name"][:3]) == ["sample", "timestep", "out/put"]
        assert text(tensors["dtype"][:3]) == ["bfloat16", "int64", "bfloat16"]
        assert [list(s) for s in tensors["shape"][:3]] == [[2, 2], [], [2, 2]]
        assert text(tensors["stored"]) == ["whole"] * 9
        last = {
            name: (path, row) for name, path, row in zip(text(tensors["name"]), text(tensors["path"]), tensors["row"])
        }
        path, row = last["sample"]  # the third call's: a row of the stack of every call's sample
        sample = f[path]
        assert sample.attrs["dtype"] == "bfloat16" and sample.dtype == np.uint16 and sample.shape == (3, 2, 2)
        widened = (sample[row].astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(widened, np.full((2, 2), 2.0))
        path, row = last["timestep"]
        assert f[path].dtype == np.int64 and f[path][row] == 2
        assert text(tensors["source"][:3]) == ["torch"] * 3 and text(tensors["device"][:3]) == ["cpu"] * 3


def test_a_run_ended_by_an_exception_keeps_it_and_counts_the_calls_its_filters_left_out(tmp_path):
    path = tmp_path / "run.h5"
    with pytest.raises(MemoryError), ak.Recorder(path, steps=[0, 1, 3], include="model") as rec:
        fn = rec.watch(lambda x: x + 1, "model")
        for step in range(5):
            fn(np.zeros(2))
            ak.step()
        raise MemoryError("out of device memory\nwhile allocating 2 GiB")
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and f.attrs["error"] == "MemoryError: out of device memory"
        assert json.loads(f.attrs["calls_run"]) == {"model": 5} and f.attrs["num_calls"] == 3
        assert json.loads(f.attrs["filters"]) == {"include": "model", "steps": [0, 1, 3]}


def test_each_submodel_is_described_by_its_class_and_its_diffusers_config(tmp_path):
    from diffusers import EulerDiscreteScheduler

    def negate(x):
        return -x

    scheduler = EulerDiscreteScheduler(timestep_spacing="trailing")
    with ak.Recorder(tmp_path / "run.h5") as rec:
        rec.watch(scheduler)
        rec.watch(torch.nn.Linear(2, 2), "proj")
        rec.watch(negate)(np.ones(2))
    with h5py.File(tmp_path / "run.h5", "r") as f:  # plain h5py, as docs/format.md says
        described = f["submodels"]
        assert list(described) == ["scheduler", "proj", "negate"]
        assert (
            described["scheduler"].attrs["class"]
            == "diffusers.schedulers.scheduling_euler_discrete.EulerDiscreteScheduler"
        )
        assert json.loads(described["scheduler"].attrs["config"])["timestep_spacing"] == "trailing"
        assert (
            described["proj"].attrs["class"] == "torch.nn.modules.linear.Linear"
            and "config" not in described["proj"].attrs
        )
        assert (
            described["negate"]
            .attrs["class"]
            .endswith(
                "test_format.test_each_submodel_is_described_by_its_class_and_its_diffusers_config.<locals>.negate"
            )
        )
    with ak.open_dump(tmp_path / "run.h5") as d:
        assert d.descriptions["scheduler"]["config"]["timestep_spacing"] == "trailing"
        assert d.descriptions["proj"] == {"class": "torch.nn.modules.linear.Linear"}


def test_each_pipeline_call_keeps_its_arguments(tmp_path):
    from alignkit.demo.pipeline import generate, tiny_pipeline

    pipe = tiny_pipeline()
    with ak.record(tmp_path / "run.h5", pipe):
        generate(pipe, 1, seed=5, size=32)
    with h5py.File(tmp_path / "run.h5", "r") as f:  # plain h5py, as docs/format.md says
        call = f["pipeline_calls/0"]
        assert (
            call.attrs["class"]
            == "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline"
        )
        assert call.attrs["seq"] == 0
        arguments = json.loads(call.attrs["arguments"])
        assert (arguments["num_inference_steps"], arguments["generator"], arguments["negative_prompt"]) == (
            1,
            "<Generator seed=5>",
            None,
        )
    with ak.Recorder(tmp_path / "plain.h5") as rec:
        rec.watch(torch.nn.Linear(2, 2), "proj")
    with h5py.File(tmp_path / "plain.h5", "r") as f, ak.open_dump(tmp_path / "plain.h5") as d:
        assert "pipeline_calls" not in f and d.pipeline_calls == []


def test_reader_index_and_keyed_access(dump_path):
    with ak.open_dump(dump_path) as d:
        assert list(d.calls.columns[:4]) == ["seq", "submodel", "step", "call"]
        assert set(d.tensors["io"]) == {"inputs", "outputs"}
        assert d["my/model", 1].inputs["timestep"] == 1
        assert d["my/model@step2"].seq == 2 and d["my/model:0"].step == 0
        with pytest.raises(CallNotFoundError, match="my/model has 3 steps: 0–2"):
            d["my/model", 7]
        with pytest.raises(CallNotFoundError, match="the dump has: my/model"):
            d["unet", 0]
        with pytest.raises(CallNotFoundError, match="my/model has 1 call at step 1: 0–0"):
            d["my/model", 1, 3]
        for bad in (("my/model", "1"), ("my/model", True), ("my/model", 1.5)):
            with pytest.raises(CallNotFoundError, match="as a call: use \\(submodel, step\\[, call\\]\\)"):
                d[bad]
        assert d["my/model", np.int64(1)].step == 1  # numpy integers, as from a DataFrame, are steps


def test_foreign_and_future_files_are_refused(tmp_path, dump_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(NotADumpError, match="not an alignkit dump"):
        ak.open_dump(plain)
    with h5py.File(dump_path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(FormatVersionError, match="version 99 is newer"):
        ak.open_dump(dump_path)


def test_tensor_names_and_dtypes_round_trip_whatever_hdf5_makes_of_them(tmp_path):
    """Names HDF5 could not hold as links (``/``, ``%``, ``.``) and bool, float16 and bfloat16
    values come back as recorded, layers included."""
    path = tmp_path / "run.h5"
    with ak.Recorder(path, layers=["net"]) as rec:
        net = rec.watch(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()), "net")
        engine = rec.watch(lambda feed: {"out/put": feed["input.1"] > 0}, "engine")
        for step in range(2):
            net(torch.ones(2, 3).to(torch.bfloat16).float())
            engine({"input.1": np.full(4, step - 0.5), "%": 1.5, ".": np.float16(2)})
            ak.step()
    with ak.open_dump(path) as dump:
        frame = dump.tensors
        assert set(frame["io"]) == {"inputs", "outputs", "layers"}
        assert {"input.1", "%", ".", "out/put"} <= set(frame["name"])
        assert frame.loc[frame["name"] == "out/put", "dtype"].tolist() == ["bool", "bool"]
        call = dump["engine", 1]
        np.testing.assert_array_equal(call.outputs["out/put"], np.full(4, True))
        assert call.inputs["%"] == 1.5 and call.source("inputs", "%") == "python"
        assert call.inputs["."].dtype == np.float16 and call.inputs["."] == 2
        assert list(dump["net", 0].layers) == ["0", "1"]
