"""Polygraphy's ``RunResults`` (``polygraphy run … --save-outputs out.json``): a file, or a
folder of one file an iteration (``0000000000.json``…).

One runner is one side (``runner`` picks it by a part of its name when there are several);
each iteration is a step (or a call of one step), its outputs the outputs of one call of
``submodel``. ``inputs`` is a ``--save-inputs`` file (a JSON list of feed dicts, one an
iteration), taken as the calls' inputs. Arrays are base64 ``np.save`` bytes, loaded without
pickle; torch tensors (bf16 runners) with ``weights_only=True``.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.errors import UsageError
from alignkit.importing.common import Imported


def read(
    path: Path,
    *,
    runner: str | None = None,
    submodel: str = "model",
    inputs: str | None = None,
    iterations: str = "steps",
    outputs: str | None = None,
) -> tuple[list[Imported], bool]:
    """``outputs`` names the model's outputs (comma-separated) where the run saved more
    (``--onnx-outputs '*'``): every other tensor is then a layer."""
    if iterations not in ("steps", "calls"):
        raise UsageError(f"--iterations {iterations!r}: expected steps or calls")
    runs = _runners(path)
    name, results = _pick(runs, runner, path)
    feeds = _feeds(Path(inputs)) if inputs else []
    graph_outputs = {name.strip() for name in (outputs or "").split(",") if name.strip()}
    calls = []
    for i, result in enumerate(results):
        saved = [(tensor, decode(value, path)) for tensor, value in result.get("outputs", {}).items()]
        missing = graph_outputs - {name for name, _ in saved}
        if missing:
            raise UsageError(f"--outputs {', '.join(sorted(missing))}: not among what {path} saved")
        outs = [(n, v) for n, v in saved if not graph_outputs or n in graph_outputs]
        layers = [(n, v) for n, v in saved if graph_outputs and n not in graph_outputs]
        feed = [(tensor, decode(value, path)) for tensor, value in (feeds[i] if i < len(feeds) else {}).items()]
        step, call = (i, 0) if iterations == "steps" else (0, i)
        calls.append(Imported(submodel, step, call, inputs=feed, outputs=outs, layers=layers, values={"runner": name}))
    return calls, iterations == "steps"


def _runners(path: Path) -> list[tuple[str, list[dict]]]:
    """(runner name, its iteration results), from a file or a folder of per-iteration files."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"{path}: no .json file of Polygraphy RunResults in this folder")
    merged: dict[str, list[dict]] = {}
    for file in files:
        for name, results in _load(file):
            merged.setdefault(name, []).extend(results)
    return list(merged.items())


def _load(file: Path) -> list[tuple[str, list[dict]]]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{file}: not a JSON file ({exc})") from exc
    if not isinstance(data, dict) or data.get("polygraphy_class") != "RunResults" or "lst" not in data:
        raise UsageError(f"{file}: not Polygraphy RunResults (polygraphy run … --save-outputs out.json)")
    return [(str(name), list(results)) for name, results in data["lst"]]


def _pick(runs: list[tuple[str, list[dict]]], runner: str | None, path: Path) -> tuple[str, list[dict]]:
    names = [name for name, _ in runs]
    chosen = [run for run in runs if runner is None or runner in run[0]]
    if len(chosen) == 1:
        return chosen[0]
    if not chosen:
        raise UsageError(f"--runner {runner!r} names none of the runners in {path}: {', '.join(names)}")
    raise UsageError(f"{path} holds {len(chosen)} runners ({', '.join(names)}): pick one with --runner")


def _feeds(path: Path) -> list[dict]:
    """A ``--save-inputs`` file (a JSON list of feed dicts) or folder (one feed a file)."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    feeds: list[dict] = []
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{file}: not a JSON file of Polygraphy inputs ({exc})") from exc
        feeds.extend(data if isinstance(data, list) else [data])
    if not all(isinstance(feed, dict) for feed in feeds):
        raise UsageError(f"{path}: not Polygraphy inputs (a JSON list of feed dicts, from --save-inputs)")
    return feeds


def decode(value: Any, source: Path) -> np.ndarray:
    """One serialized value: an ``ndarray`` (base64 ``np.save`` bytes), a ``LazyArray`` around
    one, or a torch ``Tensor`` (base64 ``torch.save`` bytes)."""
    if not isinstance(value, dict):
        raise UsageError(f"{source}: a value that is not a serialized array ({type(value).__name__})")
    kind = value.get("polygraphy_class")
    if kind == "LazyArray":
        return decode(value["values"], source)
    if kind == "ndarray" or "array" in value:
        raw = _bytes(value["array"])
        try:
            loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as exc:
            raise UsageError(
                f"{source}: an array that holds pickled Python objects, which alignkit does not load"
            ) from exc
        return loaded[loaded.files[0]] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    if kind == "Tensor":
        import torch

        try:
            tensor = torch.load(io.BytesIO(_bytes(value["tensor"])), weights_only=True)
        except Exception as exc:  # torch refuses anything but tensors with weights_only
            raise UsageError(f"{source}: a torch value that is not a plain tensor ({exc})") from exc
        if tensor.dtype == torch.bfloat16:  # numpy has none: the same bits as ml_dtypes' bfloat16
            import ml_dtypes

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    raise UsageError(f"{source}: an unknown serialized value (polygraphy_class {kind!r})")


def _bytes(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return text.encode("latin-1")  # files of older Polygraphy versions
