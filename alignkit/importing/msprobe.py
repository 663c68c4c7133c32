"""Ascend msprobe dumps: ``dump_path/step{k}/rank{r}/dump.json``, with ``dump_tensor_data/``
in tensor mode (``.pt`` for PyTorch, ``.npy`` for MindSpore).

Each forward entry of ``dump.json`` is one call: a module entry
(``Module.unet.down_blocks.0.Conv2d.forward.0``) of the submodel named by its path
(``unet.down_blocks.0``), an API entry (``Functional.linear.0.forward``) of the submodel
named by the API (``Functional.linear``); its call number is the call, ``step{k}`` the step.
Tensors are named as alignkit names arguments: ``args.0``, a keyword by its name, ``output``
or ``output.0``… A statistics-only dump (``task: statistics``) keeps, for each tensor, its four
statistics as a float64 vector ``[Max, Min, Mean, Norm]`` named ``<tensor>.stats``: compare
then compares those (dtype and shape are kept in the values).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.errors import UsageError
from alignkit.importing.common import Imported, load_npy

_MODULE = re.compile(r"^Module\.(?:\d+\.)?(?P<path>.+)\.(?P<cls>[^.]+)\.forward\.(?P<call>\d+)$")
_API = re.compile(r"^(?P<api>[^.]+\.[^.]+)\.(?P<call>\d+)\.forward$")
STATS = ("Max", "Min", "Mean", "Norm")


def read(root: Path, *, rank: int = 0) -> tuple[list[Imported], bool]:
    dumps = sorted(root.glob(f"step*/rank{rank}/dump.json")) or sorted(root.glob("step*/rank*/dump.json"))
    if not dumps:
        raise UsageError(f"{root}: no step*/rank{rank}/dump.json (an msprobe dump_path)")
    calls = []
    for dump in dumps:
        step = int(re.sub(r"\D", "", dump.parent.parent.name) or 0)
        calls += _calls(dump, step)
    return calls, True


def _calls(dump: Path, step: int) -> list[Imported]:
    try:
        data = json.loads(dump.read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{dump}: not an msprobe dump.json ({exc})") from exc
    out = []
    for key, entry in data.items():
        m = _MODULE.match(key) or _API.match(key)
        if m is None or not isinstance(entry, dict):
            continue  # backward entries, parameter gradients
        submodel = m.group("path") if "path" in m.groupdict() else m.group("api")
        call = Imported(submodel, step, int(m.group("call")))
        for i, arg in enumerate(entry.get("input_args") or []):
            _add(call, "inputs", f"args.{i}", arg, dump)
        for name, arg in (entry.get("input_kwargs") or {}).items():
            _add(call, "inputs", name, arg, dump)
        results = entry.get("output") or []
        for i, result in enumerate(results):
            _add(call, "outputs", "output" if len(results) == 1 else f"output.{i}", result, dump)
        out.append(call)
    return out


def _add(call: Imported, io: str, name: str, entry: Any, dump: Path) -> None:
    if not isinstance(entry, dict) or "dtype" not in entry:  # a value (int, float, slice…), not a tensor
        if isinstance(entry, dict) and "value" in entry:
            call.values[name] = entry["value"]
        return
    data_name = entry.get("data_name")
    if data_name:
        getattr(call, io).append((name, _load(dump.parent / "dump_tensor_data" / data_name)))
        return
    stats = [float(entry[s]) if entry.get(s) is not None else np.nan for s in STATS]
    getattr(call, io).append((f"{name}.stats", np.array(stats, np.float64)))
    call.values[f"{name}.dtype"] = entry.get("dtype")
    call.values[f"{name}.shape"] = entry.get("shape")


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise UsageError(f"{path}: named in dump.json but not in dump_tensor_data/")
    if path.suffix in (".npy", ".npz"):
        loaded = load_npy(path)
        return next(iter(loaded.values())) if isinstance(loaded, dict) else loaded
    import torch

    try:
        tensor = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch refuses anything but tensors with weights_only
        raise UsageError(f"{path}: not a plain torch tensor ({exc})") from exc
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
