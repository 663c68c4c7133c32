"""Every way an ONNX Runtime session runs is recorded: run, run_with_iobinding, run_with_ort_values."""

import numpy as np
import pytest

import alignkit as ak
from alignkit.recording.ort_runs import _Pointer


def test_every_way_a_session_runs_is_recorded_with_its_feed_and_output_names(tmp_path, tiny_onnx):
    """run, run_with_iobinding (an array, an OrtValue or a host pointer bound) and
    run_with_ort_values: what optimum does on a GPU is recorded as run is."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    binding_methods = dict(vars(ort.IOBinding))
    early = session.io_binding()  # given its input before the recording began
    early.bind_cpu_input("x", np.full((2, 4), 9, np.float32))
    early.bind_output("y")
    xs = [np.full((2, 4), i, np.float32) for i in range(5)]
    with pytest.warns(
        RuntimeWarning, match="unet ran 1 time through run_with_iobinding with inputs bound before the recording began"
    ):
        with ak.record(tmp_path / "s.h5", session):
            session.run(None, {"x": xs[0]})
            binding = session.io_binding()
            x = xs[1].copy()
            binding.bind_cpu_input("x", x)
            binding.bind_output("y")
            session.run_with_iobinding(binding)
            x[:] = xs[2]  # the bound array changed in place: the next run sees, and records, the new values
            session.run_with_iobinding(binding)
            binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(xs[3]))
            session.run_with_iobinding(binding)
            session.run_with_ort_values(["y"], {"x": ort.OrtValue.ortvalue_from_numpy(xs[4])})
            session.run_with_iobinding(early)
    assert not any(m in vars(session) for m in ("run", "run_with_iobinding", "run_with_ort_values"))
    assert dict(vars(ort.IOBinding)) == binding_methods
    with ak.open_dump(tmp_path / "s.h5") as dump:
        assert dump.submodels == ["unet"] and len(dump) == 6
        for i, x in enumerate(xs):
            call = dump["unet", i]
            np.testing.assert_array_equal(call.inputs["x"], x)
            np.testing.assert_array_equal(call.outputs["y"], session.run(None, {"x": x})[0])
        assert list(dump["unet", 5].inputs) == [] and list(dump["unet", 5].outputs) == [
            "output.0"
        ]  # its binding's names unknown too


def test_an_input_bound_by_host_pointer_is_read(tmp_path, tiny_onnx):
    import onnxruntime as ort
    from onnx import TensorProto

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with ak.record(tmp_path / "p.h5", session):
        binding = session.io_binding()
        binding.bind_input("x", "cpu", 0, TensorProto.FLOAT, x.shape, x.ctypes.data)
        binding.bind_output("y")
        session.run_with_iobinding(binding)
    with ak.open_dump(tmp_path / "p.h5") as dump:
        np.testing.assert_array_equal(dump["unet", 0].inputs["x"], x)


def test_device_memory_behind_a_bare_pointer_is_named_not_read():
    assert _Pointer("cuda", np.float32, (2, 4), 1234).read() == "<cuda pointer>"  # never dereferenced
    assert _Pointer("cpu", 16, (2, 4), 1234).read() == "<cpu pointer to element type 16>"  # bfloat16: no numpy type


def test_a_binding_leaves_a_recording_as_it_came_and_is_not_trusted_by_the_next(tmp_path, tiny_onnx):
    """What a binding was given is kept beside it, not on it, and only while recording: one
    rebound between two recordings would otherwise be recorded with its old input."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    first, second = np.zeros((2, 4), np.float32), np.ones((2, 4), np.float32)
    with ak.record(tmp_path / "one.h5", session):
        binding = session.io_binding()
        before = dict(vars(binding))
        binding.bind_cpu_input("x", first)
        binding.bind_output("y")
        session.run_with_iobinding(binding)
    assert vars(binding) == before
    binding.bind_cpu_input("x", second)  # unseen: no recording is on
    with pytest.warns(RuntimeWarning, match="inputs bound before the recording began"):
        with ak.record(tmp_path / "two.h5", session):
            session.run_with_iobinding(binding)
    with ak.open_dump(tmp_path / "two.h5") as dump:
        assert list(dump["unet", 0].inputs) == []
        np.testing.assert_array_equal(dump["unet", 0].outputs["output.0"], session.run(None, {"x": second})[0])
