"""The drill-down on a DragGAN-like generator whose demodulation-like gain is written inline
in a block's forward, not as a module: in fp16 it overflows, and the error is placed in the
block's own code, with a keep list of the one block to keep in fp32."""

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
