"""The precision an ONNX model computes in, read from its graph as the real converters leave it."""

import onnx

from alignkit.recording.onnx_layers import onnx_precision


def test_fp32_fp16_behind_float32_io_and_int8_are_told_apart(tiny_onnx, tmp_path):
    from onnxconverter_common import float16
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert onnx_precision(str(tiny_onnx)) == "fp32"
    fp16 = float16.convert_float_to_float16(onnx.load(tiny_onnx), keep_io_types=True)  # the usual advice
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # its I/O hides it
    onnx.save(fp16, tmp_path / "fp16.onnx")
    assert onnx_precision(str(tmp_path / "fp16.onnx")) == "fp16"
    quantize_dynamic(str(tiny_onnx), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8)
    assert onnx_precision(str(tmp_path / "int8.onnx")) == "int8"
    assert onnx_precision(str(tmp_path / "missing.onnx")) is None
