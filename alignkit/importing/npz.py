"""One ``.npz`` of a compile stage (TPU-MLIR's ``<model>_top_outputs.npz``, ``_tpu_outputs``…):
its keys are op output names in graph order, imported as the outputs of one call, so that
compare names the first op whose output differs.

TPU-MLIR stores bf16 as uint16 bits: ``bf16`` names the keys to take back to bfloat16 (``all``
for every uint16 array), or a side file ``<file>.dtypes.json`` (``{"name": "bf16"}``) says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignkit.errors import UsageError
from alignkit.importing.common import Imported, load_npy


def read(path: Path, *, submodel: str | None = None, bf16: str = "") -> tuple[list[Imported], bool]:
    if path.suffix != ".npz":
        raise UsageError(f"{path}: npz imports one .npz file")
    arrays = load_npy(path)
    assert isinstance(arrays, dict)
    wanted = _bf16_names(path, bf16, arrays)
    outputs = [(name, _as_bf16(array) if name in wanted else array) for name, array in arrays.items()]
    return [Imported(submodel or _model_name(path), 0, 0, outputs=outputs)], False


def _bf16_names(path: Path, given: str, arrays: dict[str, np.ndarray]) -> set[str]:
    side = path.with_name(path.name + ".dtypes.json")
    names = {n.strip() for n in given.split(",") if n.strip()}
    if side.exists():
        try:
            names |= {name for name, dtype in json.loads(side.read_text()).items() if dtype in ("bf16", "bfloat16")}
        except (ValueError, AttributeError) as exc:
            raise UsageError(f"{side}: expected a JSON object of tensor name → dtype ({exc})") from exc
    if "all" in names:
        return {name for name, array in arrays.items() if array.dtype == np.uint16}
    bad = [n for n in names if n not in arrays or arrays[n].dtype != np.uint16]
    if bad:
        raise UsageError(f"bf16: {', '.join(bad)} not uint16 arrays of {path.name} (bf16 is stored as uint16 bits)")
    return names


def _as_bf16(bits: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return bits.view(ml_dtypes.bfloat16)


def _model_name(path: Path) -> str:
    """``unet_top_outputs.npz`` → ``unet``: the model, whatever the stage."""
    stem = path.stem
    for stage in ("_in_f32", "_ref_outputs", "_top_outputs", "_tpu_outputs", "_model_outputs"):
        if stem.endswith(stage):
            return stem[: -len(stage)]
    return stem
