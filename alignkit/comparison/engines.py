"""What an engine does to its inputs before computing, which the recording shows only as a
difference of dtypes: OpenVINO converts each input to the element type its model declares.

optimum-intel exports a UNet with ``timestep`` declared int64; fed a scheduler's float timestep
(499.5), OpenVINO computes with 499. The recorder stores the input as the engine computed with
it, so compare sees the mismatch; this names its cause instead of the glue code.
"""

from __future__ import annotations

import json
from typing import Any

from alignkit.comparison.diagnosis import INPUT_MISMATCH, Divergence


def declared_input_types(description: dict[str, Any]) -> dict[str, str]:
    """The element types an engine's model declares for its inputs, by name (where recorded)."""
    try:
        return dict(json.loads(description.get("input_types") or "{}"))
    except (TypeError, ValueError):
        return {}


def name_conversion(first: Divergence, descriptions: dict[str, dict[str, Any]]) -> None:
    """An input mismatch where the target engine's model declares the input's type, and the
    reference feeds another: the engine converted it."""
    described = descriptions.get(first.submodel, {})
    declared = declared_input_types(described).get(first.tensor)
    ev = first.evidence
    if first.kind != INPUT_MISMATCH or first.io != "inputs" or declared is None:
        return
    ref_dtype, tgt_dtype = ev.get("ref_dtype"), ev.get("tgt_dtype")
    if tgt_dtype != declared or ref_dtype == declared:
        return
    engine = {"openvino": "OpenVINO"}.get(str(described.get("engine")), str(described.get("engine", "the engine")))
    seen = ""
    if "ref_value" in ev and "tgt_value" in ev:
        seen = f" ({ev['ref_value']} becomes {ev['tgt_value']})"
    cause = (
        f"{first.submodel}'s {engine} model declares `{first.tensor}` {declared}, and {engine} converts the "
        f"{ref_dtype} it is fed to {declared}{seen}: export the model with `{first.tensor}` as {ref_dtype}, or feed "
        f"it values {declared} holds"
    )
    glue = f"the glue code that feeds {first.submodel} differs"
    first.message = first.message.replace(glue, cause) if glue in first.message else f"{first.message}; {cause}"
