"""Large host tensors are written into the dump at call time and listed with their call."""

import h5py
import numpy as np
import torch

import alignkit as ak
from alignkit.recording.tensors import STAGE_MIN_BYTES, capture
from alignkit.storage.schema import DATA, bf16_to_float32

BIG = STAGE_MIN_BYTES // 4 * 2  # float32 elements: two stageable MiB


def test_only_large_contiguous_arrays_are_staged():
    staged = []

    def stage(data):
        staged.append(data.copy())
        return f"/{DATA}/{len(staged) - 1}"

    big = np.arange(BIG, dtype=np.float32)
    taken = capture("x", big, stage)
    assert taken.staged == f"/{DATA}/0" and taken.nbytes == 0
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
        assert len(f[DATA]) == 3 * 3  # grande, große and bf at each step (written before they could be found equal)
    with ak.open_dump(tmp_path / "big.h5") as d:
        assert [t.name for t in d["engine", 1].info("inputs")] == ["first", "grande", "last", "bf"]
        assert [t.name for t in d["engine", 1].info("outputs")] == ["große", "small"]
        assert d.is_whole(d["engine", 1].info("inputs")[1].path)
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
    with ak.open_dump(tmp_path / "f.h5") as d:
        assert [t.name for t in d["engine", 0].info("inputs")] == ["keep"]
    with h5py.File(tmp_path / "f.h5") as f:
        assert len(f[DATA]) == 0 and f.id.get_filesize() < STAGE_MIN_BYTES


def test_large_layer_outputs_are_staged_under_their_call(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU())
    x = torch.randn(BIG // 1024, 256)  # each layer's output: two MiB
    with torch.no_grad(), ak.record(tmp_path / "layers.h5", layers=["net"]) as rec:
        rec.watch(net, "net")
        hidden = net[0](x)
        out = net(x)
    with h5py.File(tmp_path / "layers.h5") as f:
        assert len(f[DATA]) == 3  # the two layers and the output
    with ak.open_dump(tmp_path / "layers.h5") as d:
        assert [t.path for t in d["net", 0].info("layers")] == [f"/{DATA}/0", f"/{DATA}/1"]
        layers = d["net", 0].layers
        np.testing.assert_array_equal(layers["0"], hidden.numpy())
        np.testing.assert_array_equal(layers["1"], out.numpy())
