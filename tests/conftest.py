"""Shared fixtures: tiny in-process models and the dumps of the demo pipeline's bugs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_dumps(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Reference and target dumps of the tiny SD pipeline, one pair per planted bug."""
    from alignkit.demo import record_demo_pair

    out = {}
    for bug in ("none", "timestep", "timestep-dtype", "weights"):
        out[bug] = record_demo_pair(bug, steps=6, dumps=tmp_path_factory.mktemp(bug))
    return out


@pytest.fixture()
def tiny_onnx(tmp_path) -> Path:
    """A tiny ONNX model, y = x @ W + b, built with onnx.helper (no exporter needed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, path)
    return path


def run_python(code: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
