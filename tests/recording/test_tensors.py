import numpy as np
import pytest
import torch

from alignkit.recording.tensors import capture, describe_value, is_tensor
from alignkit.storage.schema import bf16_to_float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bool, torch.float32, torch.int8])
def test_torch_dtypes_are_kept(dtype):
    t = (torch.arange(6).reshape(2, 3) % 2).to(dtype)
    captured = capture("x", t)
    assert captured.dtype == str(dtype).removeprefix("torch.")
    assert captured.data.shape == (2, 3)
    np.testing.assert_array_equal(captured.data, t.numpy())


def test_bfloat16_is_bit_exact():
    t = torch.randn(5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    captured = capture("x", t)
    assert captured.dtype == "bfloat16" and captured.data.dtype == np.uint16
    assert torch.equal(torch.from_numpy(bf16_to_float32(captured.data)), t.float())


def test_zero_d_and_values_are_copied_at_call_time():
    latents = torch.zeros(3)
    captured = capture("latents", latents)
    latents.add_(1)  # pipelines update latents in place after the call
    assert captured.data.tolist() == [0, 0, 0]
    scalar = capture("t", torch.tensor(999))
    assert scalar.data.shape == () and scalar.dtype == "int64" and scalar.data == 999


def test_strings_and_objects_are_not_tensors_and_never_pickled():
    assert not is_tensor(np.array(["a", "b"]))
    assert not is_tensor(np.array([object()], dtype=object))
    assert describe_value(np.array(["a", "b"])) == '["a", "b"]'
    assert describe_value(object()) == '"<object>"'
    assert not is_tensor(2**70)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_tensors_are_recorded_as_the_dense_values_the_callee_sees():
    dense = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
    for sparse in (dense.to_sparse(), dense.to_sparse_csr()):
        t = capture("x", sparse)
        np.testing.assert_array_equal(t.data, dense.numpy())
        assert t.dtype == "float32"


def test_a_tensor_that_cannot_be_copied_leaves_the_rest_of_the_call(tmp_path):
    import alignkit as ak

    with ak.Recorder(tmp_path / "d.h5") as rec:
        rec.watch(lambda weight, x: x, "f")(torch.empty(3, device="meta"), torch.ones(2))  # meta: shape, no data
    with ak.open_dump(tmp_path / "d.h5") as d:
        call = d["f", 0]
        assert list(call.inputs) == ["x"] and list(call.outputs) == ["output"]
        assert call.values()["weight"].startswith("<Tensor not recorded: Cannot copy out of meta tensor")
