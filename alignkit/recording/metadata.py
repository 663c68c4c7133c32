"""Run metadata stored at the root of a dump: who ran what, where, with which libraries."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import socket
import sys
from typing import Any

from alignkit._version import __version__
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
    return {"versions": json.dumps(versions, sort_keys=True), "device": _device()}


def _device() -> str:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"
