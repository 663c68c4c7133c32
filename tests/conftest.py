"""Shared fixtures: tiny in-process models and the dumps of the demo pipeline's bugs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_dumps(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Reference and target dumps of the tiny SD pipeline, one pair per planted bug."""
    from alignkit.demo import record_demo_pair

    cache = _mutation_cache()
    out = {}
    for bug in ("none", "timestep", "timestep-dtype", "weights"):
        if cache is None:
            out[bug] = record_demo_pair(bug, steps=6, dumps=tmp_path_factory.mktemp(bug))
        else:
            out[bug] = _recorded_once(cache / bug, lambda folder: record_demo_pair(bug, steps=6, dumps=folder))
    return out


def _mutation_cache() -> Path | None:
    """Where the demo dumps are kept across mutants under mutmut (which names the mutant in
    MUTANT_UNDER_TEST), when the mutant cannot change what recording writes: one in
    comparison/ (recording reaches comparison/metrics.py only to gate statistics on a
    reference or measure repeats, and the demo dumps do neither). Recording them again for
    each mutant was most of a mutant's time. The folder is named by the rest of the package's
    source, so a change to recording records them again."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if not mutant.startswith("alignkit.comparison."):
        return None
    import alignkit

    package = Path(alignkit.__file__).parent
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        if "comparison" not in source.relative_to(package).parts:
            digest.update(source.read_bytes())
    return package.parent / ".demo-dumps" / digest.hexdigest()[:16]


def _recorded_once(folder: Path, record: Callable[[Path], tuple[Path, Path]]) -> tuple[Path, Path]:
    """``record`` into ``folder`` unless an earlier mutant did; a scratch folder renamed into
    place keeps two workers from reading each other's half-written dumps."""
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=folder.parent))
        record(scratch)
        try:
            scratch.rename(folder)
        except OSError:  # another worker's came first
            shutil.rmtree(scratch)
    return folder / "demo_ref.h5", folder / "demo_tgt.h5"


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
