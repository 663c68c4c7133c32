"""Large host tensors are written into the dump at call time and linked into their call."""

import h5py
import numpy as np
import torch

import alignkit as ak
from alignkit.recording.tensors import STAGE_MIN_BYTES, capture
from alignkit.storage.schema import STAGING, bf16_to_float32

BIG = STAGE_MIN_BYTES // 4 * 2  # float32 elements: two stageable MiB


def test_only_large_contiguous_arrays_are_staged():
    staged = []

    def stage(data):
        staged.append(data.copy())
        return f"{STAGING}/{len(staged) - 1}"

    big = np.arange(BIG, dtype=np.float32)
    taken = capture("x", big, stage)
    assert taken.staged == f"{STAGING}/0" and taken.nbytes == 0
    assert taken.data.shape == big.shape and taken.data.dtype == big.dtype
    np.testing.assert_array_equal(staged[0], big)
    assert capture("small", np.ones(16, np.float32), stage).staged is None
    strided = big.reshape(-1, 2)[:, 0]  # as large as the threshold, but not C-ordered
    assert strided.nbytes >= STAGE_MIN_BYTES and capture("strided", strided, stage).staged is None
    assert capture("refused", big, lambda data: None).staged is None
    assert len(staged) == 1


def test_staged_tensors_land_in_their_calls_exactly(tmp_path):
    big = np.arange(BIG, dtype=np.float32).reshape(-1, 1024)
    half = torch.randn(BIG, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def engine(first, grande, last, bf):
        return {"große": grande * 2, "small": first}

    with ak.Recorder(tmp_path / "big.h5") as rec:
        fn = rec.watch(engine, "engine")
        for step in range(3):
            source = big + step
            fn(np.float32(step), source, np.ones(3), half)
            source[...] = -1  # changed in place after the call: the dump keeps the call-time values
            ak.step()
    with h5py.File(tmp_path / "big.h5") as f:
        assert STAGING not in f
        assert list(f["calls/00000001/inputs"]) == ["first", "grande", "last", "bf"]
        assert list(f["calls/00000001/outputs"]) == ["große", "small"]
    with ak.open_dump(tmp_path / "big.h5") as d:
        for step in range(3):
            call = d["engine", step]
            np.testing.assert_array_equal(call.inputs["grande"], big + step)
            np.testing.assert_array_equal(call.outputs["große"], (big + step) * 2)
            assert call.inputs["first"] == step
        bf = d["engine", 0].dataset("inputs", "bf")
        assert bf.attrs["dtype"] == "bfloat16"
        assert torch.equal(torch.from_numpy(bf16_to_float32(bf[()])), half.float())


def test_filtered_out_tensors_are_neither_copied_nor_staged(tmp_path):
    big = np.zeros(BIG, np.float32)
    with ak.Recorder(tmp_path / "f.h5", tensors="^keep$") as rec:
        fn = rec.watch(lambda keep, drop: None, "engine")
        fn(np.ones(2), big)
    with h5py.File(tmp_path / "f.h5") as f:
        assert list(f["calls/00000000/inputs"]) == ["keep"]
        assert STAGING not in f
        assert f.id.get_filesize() < STAGE_MIN_BYTES


def test_large_layer_outputs_are_staged_under_their_call(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU())
    x = torch.randn(BIG // 1024, 256)  # each layer's output: two MiB
    with torch.no_grad(), ak.record(tmp_path / "layers.h5", layers=["net"]) as rec:
        rec.watch(net, "net")
        hidden = net[0](x)
        out = net(x)
    with h5py.File(tmp_path / "layers.h5") as f:
        assert STAGING not in f
        assert list(f["calls/00000000/layers"]) == ["0", "1"]
    with ak.open_dump(tmp_path / "layers.h5") as d:
        layers = d["net", 0].layers
        np.testing.assert_array_equal(layers["0"], hidden.numpy())
        np.testing.assert_array_equal(layers["1"], out.numpy())
