"""Replay and layer drill-down on tiny models built in-process."""

import numpy as np
import pytest
import torch

import alignkit as ak
from alignkit.errors import ReplayError


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Linear(8, 8)
        self.act = torch.nn.SiLU()
        self.out = torch.nn.Linear(8, 8)

    def forward(self, sample, timestep):
        return self.out(self.act(self.conv(sample) + timestep.float()))


def record_calls(path, model, name="unet", steps=3, layers=()):
    with ak.Recorder(path, layers=layers) as rec, torch.no_grad():
        rec.watch(model, name)
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
        for step in range(steps):
            x = model(x, torch.tensor(step))
            ak.step()
    return path


def test_onnx_export_replays_within_float32_noise(tmp_path):
    model = Block().eval()
    ref = record_calls(tmp_path / "ref.h5", model)
    onnx_path = tmp_path / "unet.onnx"
    torch.onnx.export(
        model,
        (torch.ones(2, 8), torch.tensor(0)),
        str(onnx_path),
        dynamo=False,
        input_names=["sample", "timestep"],
        output_names=["output"],
    )
    result = ak.replay(ref, submodel="unet", target=onnx_path, out=tmp_path / "replay.h5")
    assert result.verdict == "aligned", result.summary()
    outputs = result.table[result.table["io"] == "outputs"]
    assert len(outputs) == 3 and (outputs["cos"] > 0.999999).all()


def test_replay_is_flat_while_the_pipeline_drifts(demo_dumps, tmp_path, monkeypatch):
    """The timestep bug lives in the glue: the UNet replayed on reference inputs is aligned,
    and the report's error curves draw it beside the pipeline's drift."""
    from alignkit.demo.pipeline import tiny_pipeline
    from alignkit.reporting import plots

    ref, tgt = demo_dumps["timestep"]
    unet = tiny_pipeline().unet  # the target's UNet is the same port
    replayed = ak.replay(ref, submodel="unet", target=unet, out=tmp_path / "replay.h5")
    assert replayed.verdict == "aligned"
    pipeline = ak.compare(ref, tgt, replay=replayed)
    assert pipeline.verdict == "diverged" and pipeline.replay is replayed
    html = pipeline.to_html(tmp_path / "both.html").read_text()
    assert "Blue: the replay" in html

    figures = []
    monkeypatch.setattr(plots, "_data_uri", lambda fig: figures.append(fig) or "data:")
    assert plots.error_curves(pipeline) == "data:"
    [l1_axes] = [ax for ax in figures[0].axes if ax.get_title() == "unet: L1 (mean |t − r|)"]
    drawn = {line.get_label(): dict(zip(line.get_xdata(), line.get_ydata())) for line in l1_axes.get_lines()}

    def per_step(result):
        outs = result.table[(result.table["submodel"] == "unet") & (result.table["io"] == "outputs")]
        return outs.groupby("step")["l1"].max().clip(lower=plots._TINY).to_dict()

    assert drawn["pipeline (accumulated)"] == pytest.approx(per_step(pipeline))
    assert drawn["replay (local error)"] == pytest.approx(per_step(replayed))
    last = max(drawn["pipeline (accumulated)"])
    assert max(drawn["replay (local error)"].values()) < drawn["pipeline (accumulated)"][last] / 100


def test_replay_into_a_bf16_module_casts_what_it_computes_with_but_not_the_timestep(demo_dumps, tmp_path):
    from alignkit.demo.pipeline import tiny_pipeline

    ref, _ = demo_dumps["none"]
    unet = tiny_pipeline().unet.to(torch.bfloat16)
    result = ak.replay(ref, submodel="unet", target=unet, out=tmp_path / "replay.h5")
    casts = [w for w in result.warnings if w.startswith("replay cast")]
    assert casts == [
        "replay cast input `sample` from float32 (recorded) to bfloat16 (the module's parameters)",
        "replay cast input `encoder_hidden_states` from float32 (recorded) to bfloat16 (the module's parameters)",
    ]
    outputs = result.table[result.table["io"] == "outputs"]
    assert set(outputs["tgt_dtype"]) == {"bfloat16"}
    assert outputs["rel_l1"].max() < 0.1  # bf16 noise; a bf16 timestep (999 → 1000) gave 0.5


def test_calls_of_one_step_replay_as_calls_of_that_step(demo_dumps, tmp_path):
    from alignkit.demo.pipeline import tiny_pipeline

    ref, _ = demo_dumps["none"]  # the prompt and the negative prompt: two text encoder calls at step 0
    result = ak.replay(ref, submodel="text_encoder", target=tiny_pipeline().text_encoder, out=tmp_path / "replay.h5")
    assert result.verdict == "aligned" and not result.notes
    assert sorted(set(zip(result.table["step"], result.table["call"]))) == [(0, 0), (0, 1)]


def test_replay_into_an_engine_fed_one_dict(tmp_path):
    model = Block().eval()
    ref = record_calls(tmp_path / "ref.h5", model)

    def engine(feed):  # EngineOV's shape: one dict in, one dict out
        with torch.no_grad():
            return {"out": model(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"])).numpy()}

    result = ak.replay(ref, submodel="unet", target=engine, out=tmp_path / "replay.h5")
    assert result.verdict == "aligned" and len(result.table[result.table["io"] == "outputs"]) == 3


def test_recorded_values_a_callable_does_not_take_are_left_out_and_said(demo_dumps):
    ref, _ = demo_dumps["none"]
    result = ak.replay(
        ref, submodel="unet", target=lambda sample, timestep, encoder_hidden_states: sample * 0, steps=[0]
    )
    assert result.warnings[0] == (
        "replay left out the recorded `timestep_cond`, `cross_attention_kwargs`, `added_cond_kwargs`, `return_dict`: "
        "not parameters of the target"
    )
    assert result.verdict == "diverged"  # it ran, and its zeros are compared


def test_a_target_that_raises_is_named_with_its_call_in_one_line(tmp_path):
    ref = record_calls(tmp_path / "ref.h5", Block().eval())

    def broken(sample, timestep):
        if int(timestep) == 1:
            raise RuntimeError("mat1 and mat2 must have the same dtype")
        return sample

    with pytest.raises(
        ReplayError,
        match=r"^unet step 1 call 0: the target raised RuntimeError: mat1 and mat2 must have the same dtype$",
    ):
        ak.replay(ref, submodel="unet", target=broken, out=tmp_path / "replay.h5")


def test_replay_reports_dtype_adaptation(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["timestep"], ["t"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["sample", "t"], ["output"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("timestep", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    with ak.Recorder(tmp_path / "ref.h5") as rec:
        f = rec.watch(lambda sample, timestep: sample + timestep, "unet")
        f(np.ones((2, 8), np.float32), np.array(3, np.int64))
    result = ak.replay(tmp_path / "ref.h5", submodel="unet", target=tmp_path / "m.onnx")
    assert any("cast input `timestep` from int64" in w for w in result.warnings)
    assert result.verdict == "aligned", result.first_divergence  # 3 cast to float is still 3


def test_an_sdxl_exports_flat_inputs_are_fed_from_diffusers_nested_ones_in_any_order(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(  # sample + text_embeds + time_ids * timestep, its inputs in the export's own order
        [
            helper.make_node("Add", ["sample", "text_embeds"], ["a"]),
            helper.make_node("Mul", ["time_ids", "timestep"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["output"]),
        ],
        "g",
        [value("sample", [2, 6]), value("time_ids", [2, 6]), value("text_embeds", [2, 6]), value("timestep", [])],
        [value("output", [2, 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "unet.onnx")

    def unet(sample, timestep, added_cond_kwargs):
        return sample + added_cond_kwargs["text_embeds"] + added_cond_kwargs["time_ids"] * timestep

    rng = np.random.default_rng(0)
    with ak.Recorder(tmp_path / "ref.h5") as rec:
        watched = rec.watch(unet, "unet")
        for step, t in enumerate((999.0, 800.5)):
            conditioning = {
                "text_embeds": rng.standard_normal((2, 6), dtype=np.float32),
                "time_ids": np.float32([[64, 64, 0, 0, 64, 64]] * 2),
            }
            watched(rng.standard_normal((2, 6), dtype=np.float32), np.float32(t), added_cond_kwargs=conditioning)
            ak.step()
    result = ak.replay(tmp_path / "ref.h5", submodel="unet", target=tmp_path / "unet.onnx")
    assert result.verdict == "aligned", result.summary()
    inputs = result.table[(result.table["io"] == "inputs") & (result.table["step"] == 1)].set_index("tensor")
    assert inputs.loc["added_cond_kwargs.time_ids", ["tgt_tensor", "status"]].tolist() == ["time_ids", "ok"]
    assert len(result.table[result.table["io"] == "outputs"]) == 2


def test_an_onnx_decoder_gets_an_empty_cache_at_the_prefill(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # present.0.key = concat(past, input_ids broadcast to (batch, 2 heads, seq, 4)) along positions
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [2], [1, 3])),
        helper.make_node("Unsqueeze", ["ids", "axes"], ["ids4"]),
        helper.make_node(
            "Constant", [], ["heads"], value=helper.make_tensor("heads", TensorProto.INT64, [4], [1, 2, 1, 4])
        ),
        helper.make_node("Expand", ["ids4", "heads"], ["new"]),
        helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 4]),
        ],
        [helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 2, "total", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "decoder.onnx")

    def decoder(input_ids, past_key_values=None):
        new = np.broadcast_to(
            input_ids.astype(np.float32)[:, None, :, None], (input_ids.shape[0], 2, input_ids.shape[1], 4)
        )
        past = past_key_values["0.key"] if past_key_values else np.zeros((input_ids.shape[0], 2, 0, 4), np.float32)
        return {"present.0.key": np.concatenate([past, new], axis=2)}

    with ak.Recorder(tmp_path / "ref.h5") as rec:
        watched = rec.watch(decoder, "decoder")
        out = watched(np.array([[5, 6, 7]]))  # the prefill: no cache yet
        for token in (8, 9):
            out = watched(np.array([[token]]), past_key_values={"0.key": out["present.0.key"]})
    with ak.open_dump(tmp_path / "ref.h5") as dump:
        assert "past_key_values.0.key" not in dump["decoder", 0].inputs
    result = ak.replay(tmp_path / "ref.h5", submodel="decoder", target=tmp_path / "decoder.onnx")
    assert (
        "replay fed an empty KV cache (no positions) where the reference recorded none: the prefill" in result.warnings
    )
    outputs = result.table[result.table["io"] == "outputs"]
    assert list(outputs["step"]) == [0, 1, 2] and set(outputs["status"]) == {"ok"}


class Overflowing(torch.nn.Module):
    """A norm computed as sqrt(sum(x²)): fine in fp32, inf in fp16 for large activations."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Linear(16, 16)
        self.square = Square()
        self.reduce = SumLast()
        self.root = Sqrt()

    def forward(self, x):
        return self.root(self.reduce(self.square(self.scale(x))))


class Square(torch.nn.Module):
    def forward(self, x):
        return x * x


class SumLast(torch.nn.Module):
    def forward(self, x):
        return x.sum(-1)


class Sqrt(torch.nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


def test_drill_down_names_the_first_layer_where_inf_appears_in_fp16(tmp_path):
    torch.manual_seed(0)
    ref_model = Overflowing()
    with torch.no_grad():
        ref_model.scale.weight.copy_(torch.eye(16) + 0.01 * torch.randn(16, 16))
        ref_model.scale.bias.zero_()
    tgt_model = Overflowing()
    tgt_model.load_state_dict(ref_model.state_dict())
    tgt_model = tgt_model.half()
    x = torch.full((2, 16), 100.0)  # squares ~1e4 fit fp16; their sum ~1.6e5 does not
    for path, model, value in ((tmp_path / "ref.h5", ref_model, x), (tmp_path / "tgt.h5", tgt_model, x.half())):
        with ak.Recorder(path, layers=["model"]) as rec, torch.no_grad():
            rec.watch(model, "model")
            model(value)
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.first_divergence.kind == "local error"
    assert result.layers["first_nonfinite_tgt"] == "reduce"
    assert "reduce" in result.layers["keep_fp32"]


def test_drill_down_names_a_planted_layer_error(tmp_path):
    ref_model = Block().eval()
    tgt_model = Block().eval()
    with torch.no_grad():
        tgt_model.out.weight.mul_(1.05)
    record_calls(tmp_path / "ref.h5", ref_model, layers=["unet"])
    record_calls(tmp_path / "tgt.h5", tgt_model, layers=["unet"])
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert (result.first_divergence.kind, result.first_divergence.step) == ("local error", 0)
    assert result.layers["first_layer"] == "out"
    assert "keep_fp32" not in result.layers  # both run in fp32: keeping a layer in it fixes nothing


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_port_layers_are_matched_to_torch_modules_and_drilled_down(tmp_path, dynamo):
    """A planted error in one layer of an ONNX port: replay with layers names that layer,
    whichever of torch's exporters made the port (they keep module scopes differently)."""
    import onnx
    from onnx import numpy_helper

    model = Block().eval()
    ref = record_calls(tmp_path / "ref.h5", model, layers=["unet"])
    path = tmp_path / "unet.onnx"
    torch.onnx.export(
        model,
        (torch.ones(2, 8), torch.tensor(0)),
        str(path),
        dynamo=dynamo,
        input_names=["sample", "timestep"],
        output_names=["output"],
    )
    proto = onnx.load(path)
    for init in proto.graph.initializer:
        if init.name == "conv.weight":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.02, init.name))
    onnx.save(proto, path)
    result = ak.replay(ref, submodel="unet", target=path, layers=True)
    layers = result.table[result.table["io"] == "layers"]
    assert set(layers["tensor"]) == {"conv", "act", "out"} and set(layers["matched_by"]) == {"name"}
    assert (result.first_divergence.kind, result.first_divergence.step) == ("local error", 0)
    assert result.layers["first_layer"] == "conv"
    assert "keep_fp32" not in result.layers


def test_onnx_session_layers_are_recorded(tmp_path):
    import onnxruntime as ort

    model = Block().eval()
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    torch.onnx.export(
        model,
        (torch.ones(2, 8), torch.tensor(0)),
        str(path),
        dynamo=False,
        input_names=["sample", "timestep"],
        output_names=["output"],
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with ak.Recorder(tmp_path / "d.h5", layers=["unet"]) as rec:
        rec.watch(session)
        (y,) = session.run(None, {"sample": np.ones((2, 8), np.float32), "timestep": np.array(1, np.int64)})
    with ak.open_dump(tmp_path / "d.h5") as d:
        call = d["unet", 0]
        assert list(call.layers) == ["conv", "act", "out"]
        np.testing.assert_allclose(call.layers["out"], y)


def test_torch_replay_with_layers(tmp_path):
    model = Block().eval()
    ref = record_calls(tmp_path / "ref.h5", model, layers=["unet"])
    result = ak.replay(ref, submodel="unet", target=model, layers=True)
    assert result.verdict == "aligned"
    assert set(result.table.loc[result.table["io"] == "layers", "tensor"]) == {"conv", "act", "out"}


class Twice(torch.nn.Module):
    """A module called twice in one forward, inside a block with code of its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1))
        self.act = torch.nn.LeakyReLU(0.2)

    def forward(self, sample, timestep):
        return self.act(self.block(self.act(sample)) * 2 + timestep)


def test_onnx_layers_map_to_torch_modules_at_every_depth_repeated_modules_included(tmp_path):
    model = Twice().eval()
    ref = tmp_path / "ref.h5"
    with ak.Recorder(ref, layers=["unet"]) as rec, torch.no_grad():
        rec.watch(model, "unet")(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor(1))
    path = tmp_path / "twice.onnx"
    torch.onnx.export(model, (torch.ones(2, 3, 4, 4), torch.tensor(0)), str(path), dynamo=False,
                      input_names=["sample", "timestep"], output_names=["output"])  # fmt: skip
    result = ak.replay(ref, submodel="unet", target=path, layers=True)
    layers = result.table[result.table["io"] == "layers"]
    assert {"act", "act#2", "block.0", "block"} <= set(layers["tensor"])  # the exporter's act_1 is act#2
    assert set(layers[layers["tensor"].isin(["act", "act#2", "block"])]["matched_by"]) == {"name"}
    assert (layers["status"] != "tgt only").all()  # no scope made up from a name with dots in it
    assert result.verdict == "aligned" and (layers["status"] == "ok").all(), result.first_divergence
