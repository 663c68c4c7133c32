"""Comparing two dumps: matching, metrics, diagnosis, and the Comparison result."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pandas as pd

from alignkit.comparison import configs, glue
from alignkit.comparison.cluster import client_for, table_on_cluster
from alignkit.comparison.diagnosis import (
    Divergence,
    classify_calls,
    first_divergence,
    growth,
    tolerance,
    unread_warnings,
    warnings_for,
)
from alignkit.comparison.engines import name_conversion
from alignkit.comparison.layers import drill_down
from alignkit.comparison.matching import NameMap, blind_spots, match_calls, pair_reordered_calls, run_notes
from alignkit.comparison.precision import engine_precisions, name_precision, parse_precisions, precision_warnings
from alignkit.comparison.randomness import name_randomness
from alignkit.comparison.result import Comparison
from alignkit.comparison.table import (
    Thresholds,
    as_table,
    carried_precision,
    inputs_agree,
    one_side_notes,
    raised_calls,
    table_rows,
)
from alignkit.comparison.tokens import token_agreement
from alignkit.errors import UsageError
from alignkit.storage.reader import Dump, open_dump

__all__ = ["Comparison", "Divergence", "Thresholds", "compare"]

MAX_GLUE_EXPLAINED = 1000  # tensors settled as precision loss the glue amplified, at most


def compare(
    ref: str | os.PathLike | Dump,
    tgt: str | os.PathLike | Dump,
    *,
    name_map: Mapping[str, str] | Iterable[str] | None = None,
    map_file: str | os.PathLike | None = None,
    cos_min: float = 0.999,
    rel_l1_max: float = 1e-3,
    floor_factor: float = 10.0,
    target_precision: Mapping[str, str] | Iterable[str] | None = None,
    replay: Comparison | str | os.PathLike | None = None,
    submodels: Iterable[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    dask: str | None = None,
) -> Comparison:
    """Compare a target dump against a reference dump and diagnose the first divergence.

    ``name_map`` maps target names to reference names (``{"unet.input.1": "sample"}`` or
    ``["input.1=sample"]``); ``submodels`` limits the comparison to those; ``replay`` attaches a
    replay comparison (or a replay dump to compare against ``ref``) so the report can draw local
    error beside pipeline drift. ``target_precision`` says what a target submodel computes in
    where its dump cannot (``{"unet": "fp16"}``, ``["all=bf16"]``); the engine's own, where it
    was recorded, is used otherwise (docs/comparing.md). ``dask``, a scheduler's address or
    ``local[:N]``, spreads the metrics over a Dask cluster whose workers see the dumps at the
    same paths (``compare_ranks`` compares the dumps of a distributed run rank by rank).
    """
    names = NameMap.build(name_map, map_file)
    declared = parse_precisions(target_precision)
    limits = Thresholds(cos_min, rel_l1_max, floor_factor)
    with _opened(ref) as r, _opened(tgt) as t:
        calls, notes = match_calls(r, t, names)
        uncompared, suggested = blind_spots(calls)
        engines = engine_precisions(r, t, declared)
        carried = carried_precision(r, t, engines)
        calls, reordered = pair_reordered_calls(
            calls, lambda rs, ts: inputs_agree(r, t, r.call_at(rs), t.call_at(ts), names, limits, carried)
        )
        notes += reordered
        if submodels is not None:
            keep = set(submodels)
            shared = list(dict.fromkeys(calls.dropna(subset=["ref_seq", "tgt_seq"])["submodel"]))
            unknown = [s for s in submodels if s not in shared]
            if unknown:
                raise UsageError(
                    f"submodels {', '.join(map(repr, unknown))}: not in both dumps (in both: "
                    f"{', '.join(shared) or 'none'})"
                )
            calls = calls[calls["submodel"].isin(keep)].reset_index(drop=True)
            notes = [n for n in notes if n.split(":", 1)[0] in keep]
        notes = run_notes(r, t) + notes
        total = len(calls)
        advance = (lambda i: progress(i + 1, total)) if progress else None
        if dask is None:
            table = as_table(table_rows(r, t, calls, names, limits, advance, carried))
        else:
            with client_for(dask) as client:
                table = table_on_cluster(client, r.path, t.path, calls, names, limits, carried, advance)
        unused = names.unused()
        if unused:
            raise UsageError(
                f"name map entr{'y' if len(unused) == 1 else 'ies'} {', '.join(map(repr, unused))} "
                f"match{'es' if len(unused) == 1 else ''} no submodel or tensor in {t.path}"
            )
        explainer = glue.Explainer(r, t, calls, table)
        raised = raised_calls(r, t, calls)
        per_call = classify_calls(table, calls, raised)
        seed = configs.same_seed(r, t)
        first = first_divergence(table, per_call, explainer.text, seed)
        for _ in range(MAX_GLUE_EXPLAINED):  # each pass walks the table again: bounded for dumps of 100k calls
            if first is None or not explainer.settle(first, limits.floor_factor):
                break
            per_call = classify_calls(table, calls, raised)
            first = first_divergence(table, per_call, explainer.text, seed)
        settings = configs.differences(r, t, calls)
        shown = _as_compared(calls)  # engines, descriptions and declarations by the names the table shows
        engines_shown, described = _renamed(engines, shown), _renamed(t.descriptions, shown)
        declared_shown = _renamed(declared, shown)
        if first is not None:
            configs.explain(first, settings, r, configs.call_arguments(r, t, calls, first.seq))
            name_precision(first, engines_shown, described, declared_shown)
            name_conversion(first, described)
            if first.submodel not in engines_shown:
                name_randomness(first, r, t, calls)
        result = Comparison(
            reference=str(r.path),
            target=str(t.path),
            verdict="diverged" if first is not None else "incomplete" if uncompared else "aligned",
            first_divergence=first,
            table=table,
            calls=per_call,
            thresholds=limits,
            warnings=precision_warnings(engines_shown, described, declared_shown, table, floor_factor)
            + configs.warnings(settings)
            + unread_warnings(table, per_call)
            + warnings_for(table, floor_factor),
            notes=notes + one_side_notes(table),
            growth=growth(per_call, first) if first is not None else {},
            tolerance=tolerance(table),
            ref_meta=dict(r.metadata),
            tgt_meta=dict(t.metadata),
            layers=drill_down(table, first, r.descriptions.get(first.submodel, {}).get("stateless_layers"))
            if first is not None
            else {},
            uncompared=uncompared,
            suggested_map=suggested,
            tokens=token_agreement(r, t, calls),
        )
    if replay is not None:
        result.replay = (
            replay
            if isinstance(replay, Comparison)
            else compare(
                ref,
                replay,
                name_map=name_map,
                map_file=map_file,
                cos_min=cos_min,
                rel_l1_max=rel_l1_max,
                floor_factor=floor_factor,
            )
        )
    return result


class _opened:
    """Open a path as a Dump for the duration, or use a Dump as given."""

    def __init__(self, source: str | os.PathLike | Dump):
        self._given = source if isinstance(source, Dump) else None
        self._source = source
        self._dump: Dump | None = None

    def __enter__(self) -> Dump:
        self._dump = self._given or open_dump(self._source)
        return self._dump

    def __exit__(self, *exc: object) -> None:
        if self._given is None and self._dump is not None:
            self._dump.close()


def _as_compared(calls: pd.DataFrame) -> dict[str, str]:
    """Target submodels compared under the reference's name (optimum's ``vae_decoder`` as
    ``vae.decode``, or a ``--map``): their names as the table shows them."""
    matched = calls.dropna(subset=["ref_seq", "tgt_seq"])
    return {own: shown for own, shown in zip(matched["tgt_name"], matched["submodel"]) if own != shown}


def _renamed(by_submodel: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    return {names.get(key, key): value for key, value in by_submodel.items()}
