"""A folder of ``np.save`` files, one tensor a file (``bins/latent-3.npy``) or one call a file
(``unet_3.npz``), keyed by a pattern the user gives.

The pattern is a template over the path relative to the folder, with ``{submodel}``,
``{tensor}``, ``{step}``, ``{call}`` and ``{io}`` (``'{submodel}/{tensor}-{step}.npy'``), or a
regular expression with those named groups. A ``.npz`` file's keys are its tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

from alignkit.errors import UsageError
from alignkit.importing.common import Imported, load_npy

_FIELDS = {"submodel": r"[^/]+?", "tensor": r"[^/]+?", "step": r"\d+", "call": r"\d+", "io": r"inputs|outputs"}


def compile_pattern(pattern: str) -> re.Pattern:
    """A template or a regular expression (it has ``(?P<``) as a regex over relative paths."""
    if "(?P<" in pattern:
        try:
            return re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--pattern {pattern!r} is not a valid regular expression ({exc})") from exc
    parts, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        if m.group(1) not in _FIELDS:
            raise UsageError(f"--pattern {pattern!r}: {{{m.group(1)}}} is not one of {', '.join(_FIELDS)}")
        parts += [re.escape(pattern[pos : m.start()]), f"(?P<{m.group(1)}>{_FIELDS[m.group(1)]})"]
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts))


def read(
    folder: Path, *, pattern: str | None = None, submodel: str = "model", inputs: str = ""
) -> tuple[list[Imported], bool]:
    """The calls in ``folder``; ``inputs`` names the tensors that are inputs (comma-separated),
    where the pattern has no ``{io}``: the rest are outputs."""
    if pattern is None:
        raise UsageError("npy-dir needs --pattern, e.g. '{submodel}/{tensor}-{step}.npy'")
    if not folder.is_dir():
        raise UsageError(f"{folder}: npy-dir imports a folder")
    regex = compile_pattern(pattern)
    input_names = {name.strip() for name in inputs.split(",") if name.strip()}
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".npy", ".npz") and p.is_file())
    calls: dict[tuple[str, int, int], Imported] = {}
    matched = 0
    for path in files:
        m = regex.fullmatch(path.relative_to(folder).as_posix())
        if m is None:
            continue
        matched += 1
        key = m.groupdict()
        sub = key.get("submodel") or submodel
        step, call = int(key.get("step") or 0), int(key.get("call") or 0)
        entry = calls.setdefault((sub, step, call), Imported(sub, step, call))
        loaded = load_npy(path)
        named = loaded.items() if isinstance(loaded, dict) else [(key.get("tensor") or path.stem, loaded)]
        for name, array in named:
            io = key.get("io") or ("inputs" if name in input_names else "outputs")
            getattr(entry, io).append((name, array))
    if not matched:
        seen = ", ".join(p.relative_to(folder).as_posix() for p in files[:3]) or "no .npy or .npz file"
        raise UsageError(f"--pattern {pattern!r} matched none of the files in {folder} ({seen})")
    return list(calls.values()), "step" in regex.groupindex
