"""The drill-down on a DragGAN-like generator whose demodulation-like gain is written inline
in a block's forward, not as a module: in fp16 it overflows, and the error is placed in the
block's own code, with a keep list of the one block to keep in fp32."""

from pathlib import Path

import pytest
import torch

import alignkit as ak


class ModBlock(torch.nn.Module):
    def __init__(self, channels: int, style_scale: float):
        super().__init__()
        self.affine = torch.nn.Linear(8, channels)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.act = torch.nn.LeakyReLU(0.2)
        with torch.no_grad():
            self.affine.bias.fill_(style_scale)

    def forward(self, x, w):
        s = self.affine(w)[:, :, None, None]
        x = self.conv(x * s)
        energy = (x * x).sum(dim=1, keepdim=True)  # inline: a sum of squares that fp16 cannot hold
        x = x * energy.rsqrt() * energy.sqrt()
        return self.act(x)


class Generator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.b0 = ModBlock(8, 1.0)
        self.b1 = ModBlock(8, 300.0)  # its activations reach ~3e2: the sum of their squares passes 65504
        self.out = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x, w):
        return self.out(self.b1(self.b0(x, w), w))


def record(path, model, dtype):
    x = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    w = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    with ak.Recorder(path, layers=["generator"]) as rec, torch.no_grad():
        rec.watch(model, "generator")(x.to(dtype), w.to(dtype))


def test_an_inline_overflow_is_placed_in_the_blocks_own_code(tmp_path):
    model = Generator().eval()
    record(tmp_path / "ref.h5", model, torch.float32)
    half = Generator().eval().half()
    half.load_state_dict(model.state_dict())
    record(tmp_path / "fp16.h5", half, torch.float16)
    with ak.open_dump(tmp_path / "ref.h5") as dump:
        assert {"b0", "b0.affine", "b1", "b1.act", "out"} <= set(dump["generator", 0].layers)  # every depth
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "fp16.h5")
    layers = result.layers
    assert layers["first_layer"] == layers["first_nonfinite_tgt"] == "b1.act"  # the first to show it
    assert layers["arises"] == {"in": "b1", "own_code": True, "after": "b1.conv", "before": "b1.act"}
    assert layers["keep_fp32"] == ["b1"]  # not the layers downstream that receive the Inf
    text = ak.comparison.layers.drill_down_text(layers)
    assert "the error arises in `b1`'s own forward" in text and "before `b1.act` (differs)" in text
    assert "after `b1.conv` (matches)" in text
    record(tmp_path / "again.h5", Generator().eval(), torch.float32)
    assert ak.compare(tmp_path / "ref.h5", tmp_path / "again.h5").verdict == "aligned"


FACTORY = """
import sys
sys.path.insert(0, {root!r})
from tests.comparison.test_layers import Generator


def make():
    return Generator().eval()


def build(keep):
    '''Any toolchain's build: here torch, b1 in fp32 where kept, the rest in fp16.'''
    import torch
    model = Generator().eval()
    model.half()
    if "b1" in keep:
        model.b1.float()
        model.b1.register_forward_pre_hook(lambda m, args: tuple(a.float() for a in args))
        model.b1.register_forward_hook(lambda m, args, out: out.half())
    return model
"""


@pytest.mark.parametrize("how", ["--module", "--builder"])
def test_fix_precision_finds_the_one_block_to_keep_and_verifies_it(tmp_path, monkeypatch, capsys, how):
    from alignkit.cli import main
    from tests.conftest import ROOT

    record(tmp_path / "ref.h5", Generator().eval(), torch.float32)
    (tmp_path / "gen_factory.py").write_text(FACTORY.format(root=str(ROOT)))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "gen_factory:make" if how == "--module" else "gen_factory:build"
    args = ["fix-precision", tmp_path / "ref.h5", "--submodel", "generator", "--dtype", "fp16", how, spec]
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args), "-o", str(tmp_path / "keep.txt")])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    assert "keep 1 in fp32: b1 — the fp16 build then aligns at every recorded step" in out
    assert (tmp_path / "keep.txt").read_text() == "b1\n"  # no more modules than needed
    assert (tmp_path / "keep.qtable").read_text().splitlines()[1:] == ["b1 F32"]


def test_fix_precision_of_an_fp32_onnx_model_gives_a_verified_answer(tmp_path, monkeypatch):
    """ONNX Runtime on a CPU computes many fp16 operators through fp32: the overflow a real
    NPU meets may not happen here, and the answer says so; otherwise it is a verified list.
    Its builds take no more disk than one at a time, and none is left behind."""
    import tempfile

    from alignkit.fixing import fix_precision

    model = Generator().eval()
    record(tmp_path / "ref.h5", model, torch.float32)
    torch.onnx.export(model, (torch.ones(1, 8, 8, 8), torch.ones(1, 8)), str(tmp_path / "g.onnx"),
                      input_names=["x", "w"], output_names=["output"], dynamo=False)  # fmt: skip
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    held = []  # before each build: the builds on disk
    result = fix_precision(tmp_path / "ref.h5", submodel="generator", dtype="fp16", out=tmp_path / "fixed.onnx",
                           onnx=tmp_path / "g.onnx", max_builds=4,
                           progress=lambda run, _: held.append(len(list(scratch.glob("*/*.onnx")))))  # fmt: skip
    assert held[0] == 0 and all(n == 1 for n in held[1:])
    assert list(scratch.iterdir()) == []
    from alignkit.fixing import _onnx_builds  # ONNX Runtime's CPU build may align at once: the builds one by one

    build, _ = _onnx_builds(tmp_path / "g.onnx", "fp16", scratch)
    made = [Path(build(keep)) for keep in ([], ["b1"], [])]
    assert [m.exists() for m in made] == [False, False, True] and list(scratch.iterdir()) == [made[-1]]
    assert result.aligned
    if result.keep:
        assert result.keep == ["b1"]
    else:
        assert "already aligns on ONNX Runtime on this CPU" in result.message
    import onnx

    fixed = onnx.load(tmp_path / "fixed.onnx")
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fixed.graph.initializer)  # a real fp16 build
    assert ak.replay(tmp_path / "ref.h5", submodel="generator", target=tmp_path / "fixed.onnx").aligned
