"""What each target submodel computes in, and the verdicts that name it.

A port's engine may compute in fp16, bf16 or int8 behind float32 inputs and outputs (ONNX
Runtime's float16 converter with ``keep_io_types=True``, OpenVINO's CPU default of bf16,
``quantize_dynamic``): the dtypes in the dump do not show it. The recorder keeps it in each
submodel's description (``precision``); the user may declare it (``--target-precision``). Its
error is then judged against that precision's noise floor (docs/comparing.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from alignkit.comparison.diagnosis import Divergence
from alignkit.comparison.metrics import FLOOR_OF_PRECISION
from alignkit.errors import UsageError
from alignkit.storage.reader import Dump

PRECISIONS = (*FLOOR_OF_PRECISION, "fp32")


def engine_precisions(ref: Dump, tgt: Dump, declared: Mapping[str, str] | None = None) -> dict[str, str]:
    """The reduced precision each target submodel computes in where its reference does not:
    declared (``{"unet": "fp16"}``, ``{"all": "bf16"}``) or recorded from its engine (an ONNX
    graph's float16 weights or quantized operators, OpenVINO's inference precision)."""
    declared = dict(declared or {})
    ref_described = ref.descriptions
    described = tgt.descriptions
    out = {}
    for submodel in tgt.submodels:
        precision = declared.get(submodel, declared.get("all", described.get(submodel, {}).get("precision")))
        if precision in FLOOR_OF_PRECISION and ref_described.get(submodel, {}).get("precision") != precision:
            out[submodel] = precision
    return out


def parse_precisions(given: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """``{"unet": "fp16"}`` or ``["unet=fp16", "all=bf16"]`` → a mapping, each precision checked."""
    if given is None:
        return {}
    pairs = given.items() if isinstance(given, Mapping) else (_precision_pair(text) for text in given)
    out = {}
    for submodel, precision in pairs:
        if precision not in PRECISIONS:
            raise UsageError(f"target precision {precision!r} for {submodel}: expected one of {', '.join(PRECISIONS)}")
        out[submodel] = precision
    return out


def _precision_pair(text: str) -> tuple[str, str]:
    submodel, sep, precision = text.partition("=")
    if not sep or not submodel or not precision:
        raise UsageError(f"--target-precision {text!r}: expected submodel=precision, e.g. unet=fp16 or all=bf16")
    return submodel, precision


def _where_from(submodel: str, descriptions: dict, declared: dict) -> str:
    """How the precision of ``submodel`` is known: declared, or read from its engine."""
    if submodel in declared or "all" in declared:
        return "as declared"
    described = descriptions.get(submodel, {})
    engine = described.get("engine", "engine")
    if engine == "openvino" and described.get("quantized_layers"):
        return (
            f"OpenVINO runs {described['quantized_layers']} of its convolutions and matrix products on 8-bit integers"
        )
    return {"onnxruntime": "read from its ONNX graph", "openvino": "OpenVINO's inference precision"}.get(
        engine, f"read from its {engine}"
    )


def precision_warnings(
    engines: dict[str, str], descriptions: dict, declared: dict, table: pd.DataFrame, floor_factor: float
) -> list[str]:
    """Each reduced-precision target submodel said once, with how far its error is from that
    precision's floor (a quantized graph with the estimate its floor is)."""
    out = []
    for submodel, precision in engines.items():
        rows = table[(table["submodel"] == submodel) & (table["io"] == "outputs")]
        worst = rows["floor_ratio"].max() if len(rows) else float("nan")
        quantized = " (the graph is quantized: its floor is an estimate, an int8 rounding of each output)"
        where = _where_from(submodel, descriptions, declared)
        text = f"{submodel} computes in {precision}, {where}{quantized if precision == 'int8' else ''}"
        if worst == worst:  # not NaN
            verdict = "expected precision loss" if worst <= floor_factor else "more than precision loss"
            text += f": its outputs' error is up to {worst:.3g}× the {precision} floor, {verdict}"
        out.append(text)
    return out


def name_precision(first: Divergence, engines: dict[str, str], descriptions: dict, declared: dict) -> None:
    """A verdict on a reduced-precision submodel names the precision."""
    precision = engines.get(first.submodel)
    control_input = first.io == "inputs" and "ref_value" in first.evidence  # no precision explains it
    if precision is None or control_input:
        return
    ratio = first.evidence.get("floor_ratio")
    where = _where_from(first.submodel, descriptions, declared)
    first.message += f"; {first.submodel} computes in {precision} ({where})"
    if ratio is not None and ratio == ratio:
        first.message += f", and {ratio:.3g}× the {precision} floor is more than that precision loses"
