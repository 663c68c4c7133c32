"""Run metadata stored at the root of a dump: who ran what, where, with which libraries."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import sys
from typing import Any

from alignkit._version import __version__
from alignkit.errors import UsageError
from alignkit.storage.schema import FORMAT_VERSION

_LIBRARIES = ("numpy", "h5py", "torch", "diffusers", "transformers", "onnxruntime", "onnx", "openvino", "tensorrt")


def run_metadata(label: str | None, command: str | None = None) -> dict[str, Any]:
    """Metadata known when recording starts."""
    return {
        "label": label or "",
        "command": command if command is not None else " ".join([sys.executable, *sys.argv]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "alignkit_version": __version__,
        "format_version": FORMAT_VERSION,
        **closing_metadata(),
    }


def closing_metadata() -> dict[str, Any]:
    """Metadata that the run itself may change: imported libraries and the device."""
    versions = {}
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module else None
        if version:
            versions[name] = str(version)
    return {"versions": json.dumps(versions, sort_keys=True), "device": _device(), **rank_facts()}


def rank_and_world() -> tuple[int, int] | None:
    """This process's rank and the world size of a torch.distributed run: from torch.distributed
    once it is initialized, else from the launcher's environment (torchrun, ``mp.spawn`` helpers
    and most schedulers' launchers set RANK and WORLD_SIZE before the script runs). None outside
    such a run."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except Exception:  # a torch build without distributed, or a process group being torn down
        pass
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")
    if rank.isdigit() and world.isdigit():
        return int(rank), int(world)
    return None


def rank_facts() -> dict[str, int]:
    found = rank_and_world()
    return {} if found is None else {"rank": found[0], "world_size": found[1]}


def path_for_rank(path: str | os.PathLike) -> str:
    """``path`` with ``{rank}`` replaced by this process's rank: one dump per rank."""
    text = os.fspath(path)
    if "{rank}" not in text:
        return text
    found = rank_and_world()
    if found is None:
        raise UsageError(
            f"{text}: {{rank}} names one dump per rank, but this process has no rank: run it under torchrun "
            "(which sets RANK and WORLD_SIZE), or start recording after torch.distributed.init_process_group"
        )
    return text.replace("{rank}", str(found[0]))


def _device() -> str:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"
