"""The CLI: exit codes like diff, and one-line errors with no traceback for bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from alignkit.cli import main
from tests.conftest import ROOT


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, args)))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_compare_exit_codes_and_outputs(capsys, demo_dumps, tmp_path):
    code, out, _ = run_cli(capsys, "compare", *demo_dumps["none"], "--html", tmp_path / "a.html")
    assert code == 0 and "ALIGNED" in out and (tmp_path / "a.html").exists()
    code, out, _ = run_cli(
        capsys,
        "compare",
        *demo_dumps["timestep"],
        "--no-html",
        "--csv",
        tmp_path / "t.csv",
        "--json",
        tmp_path / "t.json",
    )
    assert code == 1 and "DIVERGED" in out and "input mismatch" in out
    assert (tmp_path / "t.csv").read_text().startswith("seq,submodel,step")
    assert json.loads((tmp_path / "t.json").read_text())["verdict"] == "diverged"
    code, out, _ = run_cli(
        capsys, "compare", *demo_dumps["timestep"], "--no-html", "--rel-l1-max", "10", "--cos-min", "0"
    )
    assert code == 1  # a timestep is a control input: compared exactly whatever the tolerance


def test_compare_writes_the_default_report_path(capsys, demo_dumps, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "compare", *demo_dumps["none"])
    assert (tmp_path / "reports" / "demo_ref_vs_demo_tgt.html").exists()


def test_inspect_and_shapes(capsys, demo_dumps):
    code, out, _ = run_cli(capsys, "inspect", demo_dumps["none"][0])
    assert code == 0 and "unet" in out and "encoder_hidden_states" in out
    assert re.search(r"scheduler +6 +0–5 +1 +EulerDiscreteScheduler", out)  # each submodel's class
    assert re.search(
        r'pipeline call 0 \(StableDiffusionPipeline, from seq 0\): prompt "a red fox in the snow", height 32, width '
        r"32, "
        r"num_inference_steps 6, guidance_scale 7.5, .*, generator <Generator seed=0>",
        out,
    )  # what the pipeline was given
    code, out, _ = run_cli(capsys, "inspect", "--shapes", demo_dumps["none"][0])
    assert code == 0
    assert '--inputShape="sample:2,4,16,16;timestep:1;encoder_hidden_states:2,77,16"' in out
    assert "--shapes=sample:2x4x16x16,encoder_hidden_states:2x77x16" in out  # a 0-d input needs none
    assert "scheduler:" not in out  # glue, not a graph
    assert '--inputShape="input_ids:1,77"' in out


def bad_files(tmp_path, good):
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "text.h5").write_text("hello")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(2)
    shutil.copy(good, tmp_path / "future.h5")
    with h5py.File(tmp_path / "future.h5", "a") as f:
        f.attrs["format_version"] = 7
    data = good.read_bytes()
    cuts = {}
    for frac in (0.1, 0.5, 0.9):
        path = tmp_path / f"cut{int(frac * 100)}.h5"
        path.write_bytes(data[: int(len(data) * frac)])
        cuts[path.name] = path
    return {
        "missing": (tmp_path / "nope.h5", "no such file"),
        "directory": (tmp_path, "is a directory"),
        "empty": (tmp_path / "empty.h5", "empty file"),
        "not hdf5": (tmp_path / "text.h5", "not an HDF5 file"),
        "foreign hdf5": (tmp_path / "plain.h5", "not an alignkit dump"),
        "future": (tmp_path / "future.h5", "newer than this alignkit reads"),
        **{name: (path, "truncated or damaged") for name, path in cuts.items()},
    }


@pytest.mark.parametrize("command", ["compare", "inspect"])
def test_bad_files_get_one_line_and_exit_2(capsys, demo_dumps, tmp_path, command):
    good = demo_dumps["none"][0]
    for label, (path, message) in bad_files(tmp_path, good).items():
        args = [command, path] if command == "inspect" else [command, good, path, "--no-html"]
        code, out, err = run_cli(capsys, *args)
        assert code == 2, label
        assert message in err, (label, err)
        assert str(path) in err, label
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (label, err)
    assert good.exists() and h5py.is_hdf5(good)  # nothing touched the good dump


def test_usage_errors_exit_2_in_one_line(capsys, demo_dumps, tmp_path):
    ref, tgt = demo_dumps["none"]
    cases = [
        (["compare", ref], "Missing argument"),
        (["compare", ref, tgt, "--bogus"], "No such option"),
        (["compare", ref, tgt, "--map", "nothing=sample", "--no-html"], "matches no submodel or tensor"),
        (["compare", ref, tgt, "--map", "oops", "--no-html"], "not of the form target=reference"),
        (
            ["compare", ref, tgt, "--map", "names.json", "--no-html"],
            "'names.json' is not of the form target=reference; a file of names is given with --map-file",
        ),
        (["record", "-o", tmp_path / "x.h5"], "record needs a script"),
        (["record", "-o", tmp_path / "x.h5", "--", "missing_script.py"], "no such script"),
        (
            ["record", "-o", tmp_path / "x.h5", "--hook", "no_such_module:Engine.__call__", "--", __file__],
            "cannot import",
        ),
        (["record", "-o", tmp_path, "--", __file__], "is a directory: give the dump a file name"),
        (["record", "-o", tmp_path / "x.h5", "--hook", "numpy:ndarray.sum", "--", __file__], "cannot hook ndarray.sum"),
        (
            ["record", "-o", tmp_path / "x.h5", "--hook", "json:JSONDecoder", "--", __file__],
            "JSONDecoder instances are not callable",
        ),
        (["record", "-o", ref / "x.h5", "--", __file__], "part of its folder is a file, not a folder"),
        (
            ["record", "-o", tmp_path / "x.h5", "--include", "(", "--", __file__],
            "include '(' is not a valid regular expression",
        ),
        (["record", "-o", tmp_path / "x.h5", "--steps", "3-1", "--", __file__], "the range 3-1 runs backwards"),
        (["replay", ref, "--submodel", "nothing", "--callable", "os:getcwd"], "no calls of 'nothing'"),
        (["demo", "--bug", "nonsense"], "unknown bug"),
        (["replay", ref, "--submodel", "unet"], "replay needs one target"),
        (["replay", ref, "--submodel", "unet", "--onnx", tmp_path / "missing.onnx"], "no such ONNX file"),
        (
            ["replay", ref, "--submodel", "unet", "--steps", "a-b", "--callable", "os:getcwd"],
            "expected numbers and ranges",
        ),
        (
            ["replay", ref, "--submodel", "unet", "--callable", "os:getcwd"],
            "'os:getcwd' made a str: the factory must return",
        ),
        (
            ["replay", ref, "--submodel", "unet", "--steps", "40-50", "--callable", "os:getcwd"],
            "no calls of 'unet' at the steps asked for (it has steps 0–",
        ),
        (
            ["replay", ref, "--submodel", "unet", "--callable", "alignkit.demo.pipeline:tiny_pipeline", "-o", ref],
            "the replay would be written over the dump it replays",
        ),
        (["compare", ref, tgt, "--html", ref], "is an HDF5 file, perhaps a dump: the report will not replace it"),
        (
            ["compare", ref, tgt, "--csv", tgt, "--no-html"],
            "is an HDF5 file, perhaps a dump: the table will not replace it",
        ),
        (["compare", ref, tgt, "--json", tmp_path, "--no-html"], "is a directory: give the JSON a file name"),
        (
            ["compare", ref, tgt, "--csv", ref / "t.csv", "--no-html"],
            "cannot write the table here (part of its folder is a file, not a folder)",
        ),
        (["compare", ref, tgt, "--cos-min", "2", "--no-html"], "cos_min 2: a cosine lies between -1 and 1"),
        (["compare", ref, tgt, "--rel-l1-max", "-1", "--no-html"], "rel_l1_max -1: a relative L1 is never negative"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, *args)
        assert code == 2, args
        assert message in err, (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x.h5").exists()  # refused before a dump was begun
    import alignkit as ak

    for dump in (ref, tgt):
        with ak.open_dump(dump) as d:  # and the dumps in the way are untouched
            assert d.metadata["complete"] and len(d) > 0


def test_two_dumps_with_no_submodel_in_common(capsys, tmp_path, demo_dumps):
    import alignkit as ak

    with ak.Recorder(tmp_path / "other.h5") as rec:
        rec.watch(lambda x: x, "something_else")(np.zeros(2))
    code, _, err = run_cli(capsys, "compare", demo_dumps["none"][0], tmp_path / "other.h5", "--no-html")
    assert code == 2 and "no submodel in common" in err


ENGINE = textwrap.dedent(
    """
    import numpy as np
    class EngineOV:
        def __init__(self, model_path):
            self.model_path = model_path
        def __call__(self, args):
            return args["input.1"] * 2
    """
)
SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    from engine import EngineOV
    unet = EngineOV("./unet/compilation.bmodel")
    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    for step in range(3):
        unet({"input.1": np.full((2, 2), step, np.float32), "timesteps.1": np.array([step], np.int64)})
        session.run(None, {"x": np.ones((2, 4), np.float32)})
    raise SystemExit(3)
    """
)


def test_record_script_with_hook_and_onnxruntime_keeps_the_exit_code(tmp_path, tiny_onnx):
    (tmp_path / "engine.py").write_text(ENGINE)
    (tmp_path / "run.py").write_text(SCRIPT)
    dump = tmp_path / "tgt.h5"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit",
            "record",
            "-o",
            str(dump),
            "--hook",
            "engine:EngineOV.__call__",
            "--step-on",
            "engine:EngineOV.__call__",
            "--",
            "run.py",
            str(tiny_onnx),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"},
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    import alignkit as ak

    with ak.open_dump(dump) as d:
        # the engine is named from its model path (./unet/compilation.bmodel), the ONNX session
        # from unet/model.onnx: the second one to be called gets a suffix
        assert d.submodels == ["unet", "unet#2"]
        assert len(d.calls[d.calls["submodel"] == "unet"]) == 3
        assert len(d.calls[d.calls["submodel"] == "unet#2"]) == 3
        assert d.metadata["step_source"] == "hook" and d.steps("unet") == [0, 1, 2]
        assert "error" not in d.metadata  # an exit with a code is how a script ends, not a crash
        assert list(next(iter(d)).inputs) == ["input.1", "timesteps.1"]


def test_record_a_module_with_a_submodel_excluded(tmp_path, tiny_onnx):
    (tmp_path / "engine.py").write_text(ENGINE)
    body = SCRIPT.replace("raise SystemExit(3)", "").replace("\n", "\n    ")
    (tmp_path / "runner.py").write_text(f"if __name__ == '__main__':{body}")  # run as __main__, as -m does
    dump = tmp_path / "m.h5"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit",
            "record",
            "-o",
            str(dump),
            "--hook",
            "engine:EngineOV.__call__",
            "--exclude",
            "^unet$",
            "-m",
            "runner",
            "--",
            str(tiny_onnx),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import alignkit as ak

    with ak.open_dump(dump) as d:
        assert d.submodels == ["unet#2"] and len(d) == 3  # the engine is named but not recorded
        assert "-m runner" in d.metadata["command"]


ONNX_PIPELINE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    from diffusers import DiffusionPipeline

    class Session:  # the shape of diffusers' OnnxRuntimeModel: the session in .model
        def __init__(self, path):
            self.model = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        def __call__(self, **feed):
            return self.model.run(None, feed)

    class OnnxPipeline(DiffusionPipeline):
        def __init__(self, text_encoder, unet):
            super().__init__()
            self.register_modules(text_encoder=text_encoder, unet=unet)
        def __call__(self, x):
            h = self.text_encoder(x=x)[0]
            return self.unet(x=np.concatenate([h, h[:, :1]], axis=1))[0]

    pipe = OnnxPipeline(Session(sys.argv[1]), Session(sys.argv[1]))
    pipe(np.ones((2, 4), np.float32))
    """
)


def test_record_script_with_a_pipeline_of_onnx_sessions_records_each_call_once(tmp_path, tiny_onnx):
    (tmp_path / "run.py").write_text(ONNX_PIPELINE)
    dump = tmp_path / "p.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "record", "-o", str(dump), "--", "run.py", str(tiny_onnx)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import alignkit as ak

    with ak.open_dump(dump) as d:  # by component name, not twice more as unet and unet#2 from unet/model.onnx
        assert d.submodels == ["text_encoder", "unet"] and len(d) == 2


ENGINE_PIPELINE = textwrap.dedent(
    """
    import numpy as np
    from diffusers import DiffusionPipeline
    from engine import EngineOV

    class EnginePipeline(DiffusionPipeline):
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)
        def __call__(self, x):
            return self.unet({"input.1": x, "timesteps.1": np.array([1])})

    EnginePipeline(EngineOV("./unet/compilation.bmodel"))(np.ones((2, 2), np.float32))
    EngineOV("./vae/compilation.bmodel")({"input.1": np.ones((2, 2), np.float32)})  # outside the pipeline
    """
)


def test_record_script_with_a_hooked_engine_in_a_pipeline_records_each_call_once(tmp_path):
    (tmp_path / "engine.py").write_text(ENGINE)
    (tmp_path / "run.py").write_text(ENGINE_PIPELINE)
    dump = tmp_path / "e.h5"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit",
            "record",
            "-o",
            str(dump),
            "--hook",
            "engine:EngineOV.__call__",
            "--",
            "run.py",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import alignkit as ak

    with ak.open_dump(dump) as d:  # the pipeline's engine by component name, the other by --hook
        assert d.submodels == ["unet", "vae"] and len(d) == 2


CRASH = textwrap.dedent(
    """
    import numpy as np
    import onnxruntime as ort, sys
    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((2, 4), np.float32)})
    raise KeyError("user bug")
    """
)


@pytest.mark.parametrize("raised, code", [('KeyError("user bug")', 1), ("KeyboardInterrupt", 130)])
def test_a_script_that_raises_keeps_its_exception_and_the_dump(tmp_path, tiny_onnx, raised, code):
    (tmp_path / "crash.py").write_text(CRASH.replace('KeyError("user bug")', raised))
    dump = tmp_path / "crash.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "record", "-o", str(dump), "--", "crash.py", str(tiny_onnx)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == code  # Ctrl-C: 130, as a shell reports an interrupted command
    assert ("KeyError: 'user bug'" if code == 1 else "KeyboardInterrupt") in proc.stderr and "Traceback" in proc.stderr
    import alignkit as ak

    with ak.open_dump(dump) as d:
        assert d.submodels == ["unet"] and len(d) == 1
        assert d.metadata["error"] == ("KeyError: 'user bug'" if code == 1 else "KeyboardInterrupt")


def test_shapes_that_vary_give_dynamic_axes(capsys, tmp_path):
    import alignkit as ak

    with ak.Recorder(tmp_path / "dyn.h5") as rec:
        f = rec.watch(lambda sample, ids: None, "unet")
        for n in (1, 2):
            f(np.zeros((n, 4, 8, 8), np.float32), np.zeros((1, 77), np.int64))
    code, out, _ = run_cli(capsys, "inspect", "--shapes", tmp_path / "dyn.h5")
    assert code == 0
    assert '--inputShape="sample:1,4,8,8;ids:1,77"' in out
    assert "dynamic_axes={'sample': {0: 'batch'}}" in out
    assert 'ATC: --input_shape="sample:-1,4,8,8;ids:1,77" --dynamic_dims="1;2" --input_format=ND' in out


def test_the_printed_dynamic_axes_paste_into_torch_onnx_export(capsys, tmp_path):
    """Shapes from two dumps (two batch sizes): one symbol for the batch both inputs share,
    integer axes, no Python number and no scheduler among the graph inputs."""
    import ast

    import onnx
    import torch

    import alignkit as ak

    class Net(torch.nn.Module):
        def forward(self, sample, encoder_hidden_states, timestep, conditioning_scale=1.0):
            return sample.mean(dim=(1, 2, 3)) * encoder_hidden_states.mean(dim=(1, 2)) * timestep * conditioning_scale

    net = Net()
    for batch in (1, 2):
        with ak.Recorder(tmp_path / f"b{batch}.h5") as rec, torch.no_grad():
            rec.watch(net, "unet")(torch.ones(batch, 4, 8, 8), torch.ones(batch, 77, 16), torch.tensor(999.0), 0.5)
    code, out, _ = run_cli(capsys, "inspect", "--shapes", tmp_path / "b1.h5", tmp_path / "b2.h5")
    assert code == 0 and "conditioning_scale" not in out
    assert "0-d inputs: timestep: given as 1 in --inputShape" in out
    line = next(ln.strip() for ln in out.splitlines() if ln.strip().startswith("dynamic_axes="))
    axes = ast.literal_eval(line.removeprefix("dynamic_axes="))
    assert axes == {"sample": {0: "batch"}, "encoder_hidden_states": {0: "batch"}}
    path = tmp_path / "unet.onnx"
    torch.onnx.export(
        net,
        (torch.ones(1, 4, 8, 8), torch.ones(1, 77, 16), torch.tensor(999.0)),
        str(path),
        input_names=["sample", "encoder_hidden_states", "timestep"],
        dynamic_axes=axes,
        dynamo=False,
    )
    dims = [d.dim_param for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch"


def test_inspect_range_predicts_an_fp16_overflow_from_the_fp32_reference(capsys, tmp_path):
    import alignkit as ak

    with ak.Recorder(tmp_path / "ref.h5") as rec:
        demod = rec.watch(lambda w: {"sum": (w * w).sum(axis=1), "rsqrt": 1 / np.sqrt((w * w).sum(axis=1))}, "block")
        demod(np.full((2, 64), 40.0, np.float32))  # 64 × 1600 = 102400: past fp16's 65504
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "ref.h5", "--range", "fp16")
    assert code == 0
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith("block")]
    assert [r[:4] for r in rows] == [["block", "outputs", "sum", "overflow"]]
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "ref.h5", "--range", "bf16")
    assert code == 0 and "every recorded value fits bf16" in out


def test_a_script_that_calls_nothing_watched_is_told_how_to_hook_its_engine(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.py").write_text("print('done')\n")
    code, _, err = run_cli(capsys, "record", "-o", tmp_path / "n.h5", "--", "plain.py")
    assert code == 0
    assert "recorded 0 calls to" in err and "name its engine with --hook module:Class.method" in err
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "n.h5")
    assert code == 0 and "holds no calls" in out


def test_a_replay_without_an_output_prints_its_verdict_and_leaves_no_dump_behind(
    capsys, demo_dumps, tmp_path, monkeypatch
):
    import tempfile

    ref, _ = demo_dumps["timestep"]
    (tmp_path / "unet_factory.py").write_text(
        "from alignkit.demo.pipeline import tiny_pipeline\n\ndef make():\n    return tiny_pipeline().unet\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code, out, err = run_cli(
        capsys, "replay", ref, "--submodel", "unet", "--callable", "unet_factory:make", "--steps", "0-1"
    )
    assert code == 0, out + err
    assert "ALIGNED" in out
    assert list(scratch.iterdir()) == []


def test_bad_models_and_output_paths_get_one_line_before_the_work(capsys, demo_dumps, tmp_path, monkeypatch):
    ref, tgt = demo_dumps["none"]
    (tmp_path / "bad.onnx").write_text("not a model")
    code, out, err = run_cli(capsys, "replay", ref, "--submodel", "unet", "--onnx", tmp_path / "bad.onnx")
    assert code == 2 and "bad.onnx: ONNX Runtime cannot load it (" in err and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "factory.py").write_text("def make():\n    raise RuntimeError('no weights here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_cli(capsys, "replay", ref, "--submodel", "unet", "--callable", "factory:make")
    assert code == 2 and "'factory:make': the factory raised RuntimeError: no weights here" in err

    from alignkit import comparison

    compared = []
    monkeypatch.setattr(
        comparison, "match_calls", lambda *a: compared.append(1) or (_ for _ in ()).throw(AssertionError)
    )
    code, _, err = run_cli(capsys, "compare", ref, tgt, "--html", ref)  # the report would replace a dump
    assert code == 2 and "is an HDF5 file, perhaps a dump" in err and not compared  # refused before comparing
