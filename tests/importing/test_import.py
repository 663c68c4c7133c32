"""Other tools' dumps in: each imports as a regular dump that compares, and a planted
difference is found at the right step and tensor; bad files get one line and exit 2."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import alignkit as ak
from alignkit.cli import main
from alignkit.importing import import_dump


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, args)))
    out, err = capsys.readouterr()
    return exit_info.value.code, out + err


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act = torch.nn.ReLU()

    def forward(self, image):
        return self.act(self.conv(image))


def test_polygraphy_run_results_compare_with_alignkits_recording_of_the_same_inputs(tmp_path):
    """``polygraphy run model.onnx --onnxrt --save-outputs``, for real, against the torch model
    recorded on the inputs Polygraphy generated and saved."""
    model = Block().eval()
    torch.onnx.export(model, (torch.ones(1, 3, 8, 8),), str(tmp_path / "m.onnx"), input_names=["image"],
                      output_names=["output"], dynamo=False)  # fmt: skip
    broken = tmp_path / "broken.onnx"
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(tmp_path / "m.onnx")
    for init in proto.graph.initializer:
        if init.name.endswith("weight"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.05, init.name))
    onnx.save(proto, broken)
    for name in ("m", "broken"):
        polygraphy = str(Path(sys.executable).parent / "polygraphy")  # the real tool, as its users run it
        subprocess.run(
            [polygraphy, "run", str(tmp_path / f"{name}.onnx"), "--onnxrt", "--iterations", "2",
             "--save-outputs", str(tmp_path / f"{name}.json"), "--save-inputs", str(tmp_path / "in.json")],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        import_dump("polygraphy", tmp_path / f"{name}.json", tmp_path / f"{name}.h5", submodel="block",
                    inputs=str(tmp_path / "in.json"))  # fmt: skip
    feeds = json.loads((tmp_path / "in.json").read_text())
    with ak.Recorder(tmp_path / "ref.h5") as rec, torch.no_grad():
        block = rec.watch(model, "block")
        for feed in feeds:
            image = np.load(io.BytesIO(base64.b64decode(feed["image"]["array"])), allow_pickle=False)
            block(torch.from_numpy(image))
            ak.step()
    with ak.open_dump(tmp_path / "m.h5") as dump:
        assert dump.submodels == ["block"] and dump.steps("block") == [0, 1]
        assert dump.metadata["imported_from"]["format"] == "polygraphy"
    assert ak.compare(tmp_path / "ref.h5", tmp_path / "m.h5").verdict == "aligned"
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "broken.h5").first_divergence
    assert (fd.submodel, fd.step, fd.io, fd.tensor, fd.kind) == ("block", 0, "outputs", "output", "local error")

    # every tensor of the graph (--onnx-outputs '*'): the model's output stays an output, the rest are layers
    subprocess.run(
        [polygraphy, "run", str(tmp_path / "m.onnx"), "--onnxrt", "--onnx-outputs", "*",
         "--save-outputs", str(tmp_path / "all.json"), "--load-inputs", str(tmp_path / "in.json")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    import_dump("polygraphy", tmp_path / "all.json", tmp_path / "all.h5", submodel="block", outputs="output")
    with ak.open_dump(tmp_path / "all.h5") as dump:
        call = dump["block", 0]
        assert list(call.outputs) == ["output"] and len(call.layers) >= 1  # the convolution's output, at least


def _seed_001_folder(folder, bug_step=None):
    """A hand-written UNet loop saving its inputs and outputs as ``bins/<name>-<i>.npy``."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    (folder / "bins").mkdir(parents=True)
    for i in range(4):
        noise = np.tanh(latent * (i + 1)).astype(np.float32)
        if i == bug_step:
            noise = noise * 1.1
        np.save(folder / "bins" / f"latent-{i}.npy", latent)
        np.save(folder / "bins" / f"noise_pred-{i}.npy", noise)
        latent = latent - 0.1 * noise
    return folder


def test_an_np_save_folder_of_a_unet_loop_imports_with_a_pattern_and_compares_per_step(tmp_path, capsys):
    ref, tgt = _seed_001_folder(tmp_path / "ref"), _seed_001_folder(tmp_path / "tgt", bug_step=2)
    for folder in (ref, tgt):
        pattern = ("--pattern", "bins/{tensor}-{step}.npy", "--submodel", "unet", "--inputs", "latent")
        code, out = run_cli(capsys, "import", "npy-dir", folder, "-o", folder.with_suffix(".h5"), *pattern)
        assert code == 0 and "imported 4 calls (8 tensors) of unet" in out
    with ak.open_dump(ref.with_suffix(".h5")) as dump:
        assert dump.steps("unet") == [0, 1, 2, 3]
        assert list(dump["unet", 1].inputs) == ["latent"] and list(dump["unet", 1].outputs) == ["noise_pred"]
    fd = ak.compare(ref.with_suffix(".h5"), tgt.with_suffix(".h5")).first_divergence
    assert (fd.submodel, fd.step, fd.io, fd.tensor, fd.kind) == ("unet", 2, "outputs", "noise_pred", "local error")


def test_a_tpu_mlir_npz_with_bf16_as_uint16_imports_as_bfloat16(tmp_path):
    rng = np.random.default_rng(0)
    ops = {name: rng.standard_normal((2, 16)).astype(np.float32) for name in ("conv1", "relu1", "sum", "rsqrt")}
    np.savez(tmp_path / "net_top_outputs.npz", **ops)
    bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in ops.items()}  # bf16, truncated
    bits["sum"] = ((ops["sum"] * 4).view(np.uint32) >> 16).astype(np.uint16)  # the planted overflow-like error
    np.savez(tmp_path / "net_tpu_outputs.npz", **bits)
    import_dump("npz", tmp_path / "net_top_outputs.npz", tmp_path / "top.h5")
    import_dump("npz", tmp_path / "net_tpu_outputs.npz", tmp_path / "tpu.h5", bf16="all")
    with ak.open_dump(tmp_path / "tpu.h5") as dump:
        assert dump.submodels == ["net"]
        assert set(dump.tensors["dtype"]) == {"bfloat16"}
        np.testing.assert_allclose(dump["net", 0].outputs["conv1"].astype(np.float32), ops["conv1"], rtol=1e-2)
    fd = ak.compare(tmp_path / "top.h5", tmp_path / "tpu.h5").first_divergence
    assert (fd.submodel, fd.tensor, fd.kind) == ("net", "sum", "local error")
    result = ak.compare(tmp_path / "top.h5", tmp_path / "tpu.h5")
    assert (result.table.set_index("tensor")["status"]["conv1"]) == "precision"  # bf16 truncation: within its floor


def _msprobe(root, scale_at_step=None, statistics=False):
    """Files laid out as msprobe's PyTorch dump writes them (FORMATS.md §2)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    for step in range(2):
        folder = root / f"step{step}" / "rank0"
        (folder / "dump_tensor_data").mkdir(parents=True)
        x = torch.full((2, 4), float(step + 1))
        with torch.no_grad():
            y = linear(x) * (1.5 if step == scale_at_step else 1.0)
        data = {}
        for key, io_name, tensors in (("Module.model.fc.Linear.forward.0", "fc", None),):
            entry = {}
            for side, value, suffix in (("input_args", x, "input.0"), ("output", y, "output.0")):
                name = f"{key}.{suffix}.pt"
                t = {"type": "torch.Tensor", "dtype": "torch.float32", "shape": list(value.shape),
                     "Max": float(value.max()), "Min": float(value.min()), "Mean": float(value.mean()),
                     "Norm": float(value.norm())}  # fmt: skip
                if not statistics:
                    t["data_name"] = name
                    torch.save(value.clone(), folder / "dump_tensor_data" / name)
                entry[side] = [t]
            entry["input_kwargs"] = {"scale": {"type": "float", "value": 1.0}}
            data[key] = entry
        data["Functional.linear.0.backward"] = {"input": [], "output": []}
        task = "statistics" if statistics else "tensor"
        (folder / "dump.json").write_text(
            json.dumps({"task": task, "level": "L0", "framework": "pytorch", "data": data})
        )
    return root


@pytest.mark.parametrize("statistics", [False, True], ids=["tensor", "statistics"])
def test_an_msprobe_dump_imports_and_a_planted_difference_is_found(tmp_path, statistics):
    ref = _msprobe(tmp_path / "ref", statistics=statistics)
    tgt = _msprobe(tmp_path / "tgt", scale_at_step=1, statistics=statistics)
    import_dump("msprobe", ref, tmp_path / "ref.h5")
    import_dump("msprobe", tgt, tmp_path / "tgt.h5")
    with ak.open_dump(tmp_path / "ref.h5") as dump:
        assert dump.submodels == ["model.fc"] and dump.steps("model.fc") == [0, 1]
        assert list(dump["model.fc", 0].outputs) == (["output.stats"] if statistics else ["output"])
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").first_divergence
    assert (fd.submodel, fd.step, fd.io, fd.kind) == ("model.fc", 1, "outputs", "local error")


def test_bad_files_get_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "x.npy", np.ones(2))
    cases = [
        (("polygraphy", tmp_path / "other.json"), "not Polygraphy RunResults"),
        (("npy-dir", tmp_path / "d", "--pattern", "{tensor}-{step}.npy"), "matched none of the files"),
        (("npy-dir", tmp_path, "--pattern", "{tensor}.npy"), "holds pickled Python objects"),
        (("msprobe", tmp_path / "d"), "no step*/rank0/dump.json"),
        (("npz", tmp_path / "missing.npz"), "no such file"),
    ]
    for args, message in cases:
        code, out = run_cli(capsys, "import", *args, "-o", tmp_path / "out.h5")
        assert code == 2 and message in out and "Traceback" not in out, out
        assert len(out.strip().splitlines()) == 1


def test_compare_writes_model_explorer_node_data(tmp_path, capsys):
    from tests.test_replaying import Block as LayeredBlock
    from tests.test_replaying import record_calls

    record_calls(tmp_path / "ref.h5", LayeredBlock().eval(), layers=["unet"])
    tgt_model = LayeredBlock().eval()
    with torch.no_grad():
        tgt_model.out.weight.mul_(1.05)
    record_calls(tmp_path / "tgt.h5", tgt_model, layers=["unet"])
    code, out = run_cli(capsys, "compare", tmp_path / "ref.h5", tmp_path / "tgt.h5", "--no-html",
                        "--model-explorer", tmp_path / "me.json")  # fmt: skip
    assert code == 1
    data = json.loads((tmp_path / "me.json").read_text())
    results = data["alignkit"]["results"]
    assert {"conv", "act", "out"} <= set(results) and results["out"]["value"] > 0.01
    assert [stop["stop"] for stop in data["alignkit"]["gradient"]] == [0, 0.5, 1]
