"""Pair up the calls and tensors of two dumps.

Calls pair by (submodel, step, call), or, where a target makes a step's calls of one submodel in
another order (the negative prompt encoded first), by their inputs. Tensors pair by name, then
through the name map, then where one name is the other's dotted tail
(``added_cond_kwargs.text_embeds`` and ``text_embeds``), then, for what is left, by position
when count, order and shapes agree. What has no partner is kept, never dropped: it appears in
the table as present on one side only.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from alignkit.errors import UsageError
from alignkit.phrasing import count, ranges
from alignkit.storage.reader import Call, Dump, TensorInfo


@dataclass
class NameMap:
    """Target names → reference names, for submodels and tensors.

    Keys are a target submodel (``vae_decoder``), a target tensor in one submodel
    (``unet.input.1``), or a target tensor anywhere (``input.1``).
    """

    entries: dict[str, str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, mapping: Mapping[str, str] | Iterable[str] | None = None, path: str | Path | None = None) -> NameMap:
        entries: dict[str, str] = {}
        if path is not None:
            entries.update(_read_map_file(Path(path)))
        if isinstance(mapping, Mapping):
            entries.update({str(k): str(v) for k, v in _flatten_map(mapping).items()})
        elif mapping is not None:
            for item in mapping:
                tgt, sep, ref = str(item).partition("=")
                if not sep or not tgt or not ref:
                    raise UsageError(
                        f"name map entry {item!r} is not of the form target=reference{_file_hint(str(item))}"
                    )
                entries[tgt] = ref
        return cls(entries)

    def submodel(self, tgt_submodel: str) -> str:
        if tgt_submodel in self.entries:
            self.used.add(tgt_submodel)
            return self.entries[tgt_submodel]
        return tgt_submodel

    def tensor(self, tgt_submodel: str, name: str) -> str | None:
        for key in (f"{tgt_submodel}.{name}", name):
            if key in self.entries:
                self.used.add(key)
                return self.entries[key]
        return None

    def unused(self) -> list[str]:
        return [k for k in self.entries if k not in self.used]


def _file_hint(item: str) -> str:
    """Where a name-map file given as an entry belongs (``--map names.json``)."""
    if "=" in item or not (Path(item).suffix.lower() in (".json", ".txt", ".map") or Path(item).is_file()):
        return ""
    return "; a file of names is given with --map-file (map_file= in Python)"


def _flatten_map(mapping: Mapping) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            prefix = "" if key in ("tensors", "submodels") else f"{key}."
            out.update({f"{prefix}{k}": str(v) for k, v in _flatten_map(value).items()})
        else:
            out[str(key)] = str(value)
    return out


def _read_map_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the name map ({exc.strerror or exc})") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
        if not isinstance(data, Mapping):
            raise UsageError(f"{path}: the name map must be a JSON object")
        return _flatten_map(data)
    entries = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tgt, sep, ref = line.partition("=")
        if not sep:
            raise UsageError(f"{path}:{n}: expected target=reference, got {line!r}")
        entries[tgt.strip()] = ref.strip()
    return entries


@dataclass
class TensorPair:
    io: str
    ref: TensorInfo | None
    tgt: TensorInfo | None
    how: str  # "name", "map", "suffix", "position", "structure", or "one side"


class MergedCall:
    """The calls a target split one reference call into, seen as that one call: a port with a
    static batch of 1 runs classifier-free guidance as two calls a step where diffusers makes
    one at batch 2. Each tensor is the parts concatenated along the batch."""

    def __init__(self, calls: list[Call]):
        self.calls = calls
        first = calls[0]
        self.seq, self.submodel, self.step, self.call = first.seq, first.submodel, first.step, first.call

    def info(self, io: str) -> list[TensorInfo]:
        sides = [c.info(io) for c in self.calls]
        merged = []
        for parts in zip(*sides):
            head = parts[0]
            shape = (sum(p.shape[0] for p in parts), *head.shape[1:]) if head.shape else (len(parts),)
            merged.append(MergedTensor(io, head.name, head.dtype, shape, head.path, tuple(p.path for p in parts)))
        return merged


class MergedTensor(NamedTuple):
    """A tensor of a :class:`MergedCall`: read by concatenating its ``parts`` (a
    :class:`TensorInfo` with them)."""

    io: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str
    parts: tuple[str, ...] = ()


def match_calls(ref: Dump, tgt: Dump, names: NameMap) -> tuple[pd.DataFrame, list[str]]:
    """Join the call tables on (submodel, step, call); notes say what only one side has.
    ``tgt_name`` is the target's own name for a submodel compared under another.

    A target that splits every call of a submodel into calls of a smaller batch has them
    joined as one (``tgt_parts`` lists their sequence numbers), and a note says so."""
    r = ref.calls.assign(ref_seq=ref.calls["seq"])
    t = tgt.calls.assign(tgt_seq=tgt.calls["seq"], tgt_name=tgt.calls["submodel"])
    t["submodel"] = [names.submodel(s) for s in t["submodel"]]
    aliases = _export_aliases(set(r["submodel"]), set(t["submodel"]), names)
    t["submodel"] = [aliases.get(s, s) for s in t["submodel"]]
    shared = set(r["submodel"]) & set(t["submodel"])
    if not shared:
        raise UsageError(
            f"{ref.path} and {tgt.path} have no submodel in common "
            f"(reference: {', '.join(ref.submodels) or 'none'}; target: {', '.join(tgt.submodels) or 'none'}); "
            "map target names with --map target=reference"
        )
    notes = [
        f"{tgt_name} (target) is compared with {ref_name} (reference): the names diffusers' ONNX export and a torch "
        f"pipeline give the same VAE half"
        for tgt_name, ref_name in aliases.items()
    ]
    for sub in sorted(shared):
        parts = _batch_split(ref, tgt, r[r["submodel"] == sub], t[t["submodel"] == sub])
        if parts:
            t = _merge_split_calls(t, sub)
            notes.append(
                f"{sub}: the target splits each call into {parts} along the batch (as classifier-free guidance at "
                "batch 1 does); "
                "compared with the reference's call as one, concatenated"
            )
    columns = ["submodel", "step", "call", "tgt_seq", "tgt_name"] + (["tgt_parts"] if "tgt_parts" in t else [])
    joined = r.merge(t[columns], on=["submodel", "step", "call"], how="outer")
    joined = joined.sort_values(["ref_seq", "tgt_seq"], kind="stable").reset_index(drop=True)
    return joined, notes + _one_side_notes(joined, r, t)


def run_notes(ref: Dump, tgt: Dump) -> list[str]:
    """What made either run record less than it ran (:func:`shortfalls`)."""
    return shortfalls(ref, "the reference") + shortfalls(tgt, "the target")


def shortfalls(dump: Dump, who: str = "the run") -> list[str]:
    """What made a run record less than it ran: an exception or a kill that ended it early, a
    recording stopped (disk full), filters that left calls out."""
    meta, notes = dump.metadata, []
    if meta.get("error"):
        notes.append(f"{who} ended early, with {meta['error']}")
    elif meta.get("writer_error"):
        notes.append(f"recording {who} failed ({meta['writer_error']}): the dump holds its calls up to the failure")
    elif not meta.get("complete", True) and not meta.get("stopped"):  # a stop leaves it incomplete too
        notes.append(
            f"{who} was killed before its recording ended: the dump holds its calls up to its last completed steps"
        )
    if meta.get("stopped"):
        notes.append(f"recording of {who} stopped early: {meta['stopped']}")
    if isinstance(filters := meta.get("filters"), dict) and filters:
        given = ", ".join(f"{key} {_filter_text(value)}" for key, value in filters.items())
        notes.append(f"{who} was recorded with filters ({given})")
    if isinstance(filter_notes := meta.get("filter_notes"), list):
        notes += [f"recording {who}: {note}" for note in filter_notes]
    return notes


def cut_short(dump: Dump) -> bool:
    """Whether the dump holds less than the run made (an exception, a kill, a recording stopped)."""
    return bool(dump.metadata.get("error")) or not dump.metadata.get("complete", True)


def _filter_text(value: object) -> str:
    """A recording filter as it was given: a pattern quoted, steps as ranges (``0–3, 8``)."""
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return ranges(value)
    if isinstance(value, list):
        return ", ".join(map(repr, value))
    return repr(value)


EXPORT_ALIASES = {"vae_decoder": "vae.decode", "vae_encoder": "vae.encode"}
"""diffusers' and optimum's ONNX layout (``vae_decoder/model.onnx``) against what a torch
pipeline records (the VAE's ``decode`` and ``encode``)."""


def _export_aliases(ref_subs: set[str], tgt_subs: set[str], names: NameMap) -> dict[str, str]:
    """Target submodels to compare under the reference's name for them: a VAE half named the
    ONNX way on one side and the torch way on the other, with no name map entry of its own."""
    out = {}
    for onnx_name, torch_name in EXPORT_ALIASES.items():
        for tgt_name, ref_name in ((onnx_name, torch_name), (torch_name, onnx_name)):
            if tgt_name in tgt_subs - ref_subs and ref_name in ref_subs - tgt_subs and tgt_name not in names.entries:
                out[tgt_name] = ref_name
    return out


def _batch_split(ref: Dump, tgt: Dump, r: pd.DataFrame, t: pd.DataFrame) -> int:
    """How many calls the target makes for each of the reference's, when it splits every
    call of this submodel along the batch (one reference call a step, k target calls whose
    first inputs add up to the reference's batch); 0 when it does not. Judged on the steps both
    have: a run killed early, or recorded at some steps, still splits the ones it has."""
    per_r, per_t = r.groupby("step").size(), t.groupby("step").size()
    shared = per_r.index.intersection(per_t.index)
    per_r, per_t = per_r[shared], per_t[shared]
    if shared.empty or (per_r != 1).any() or per_t.nunique() != 1 or per_t.iloc[0] < 2:
        return 0
    step = int(per_r.index[0])
    ref_first = ref[str(r["submodel"].iloc[0]), step, 0].info("inputs")
    at_step = t[t["step"] == step]
    parts = [tgt[str(name), step, int(call)].info("inputs") for name, call in zip(at_step["tgt_name"], at_step["call"])]
    if not ref_first or not ref_first[0].shape or any(not p or not p[0].shape for p in parts):
        return 0
    batch, rest = ref_first[0].shape[0], ref_first[0].shape[1:]
    fits = sum(p[0].shape[0] for p in parts) == batch and all(p[0].shape[1:] == rest for p in parts)
    return len(parts) if fits and all([i.name for i in p] == [i.name for i in parts[0]] for p in parts) else 0


def _merge_split_calls(t: pd.DataFrame, sub: str) -> pd.DataFrame:
    """One row per step for ``sub``: its first call, as call 0, with every part's seq in ``tgt_parts``."""
    if "tgt_parts" not in t:
        t = t.assign(tgt_parts=None)
    mine = t[t["submodel"] == sub]
    parts = mine.groupby("step")["tgt_seq"].agg(tuple)
    merged = mine.drop_duplicates("step").assign(call=0, tgt_parts=lambda f: f["step"].map(parts))
    return pd.concat([t[t["submodel"] != sub], merged], ignore_index=True)


def blind_spots(calls: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Reference submodels never compared although the target ran submodels of its own at the
    same steps (a port whose engines were recorded under other names): a comparison that did
    not look at them cannot call the port aligned. Returns them, and the ``--map`` their call
    pattern suggests (a target-only submodel with the same steps and calls)."""
    compared = set(calls.dropna(subset=["ref_seq", "tgt_seq"])["submodel"])
    ref = calls.dropna(subset=["ref_seq"])
    tgt = calls.dropna(subset=["tgt_seq"])
    only_ref = {s: g for s, g in ref.groupby("submodel", sort=False) if s not in compared}
    only_tgt = {s: g for s, g in tgt.groupby("submodel", sort=False) if s not in compared}
    tgt_steps = {s: set(g["step"]) for s, g in only_tgt.items()}
    blind = [s for s, g in only_ref.items() if any(set(g["step"]) & steps for steps in tgt_steps.values())]
    maps, used = [], set()
    for sub in blind:
        pattern = only_ref[sub].groupby("step").size().to_dict()
        fit = next(
            (t for t, g in only_tgt.items() if t not in used and g.groupby("step").size().to_dict() == pattern), None
        )
        if fit is not None:
            used.add(fit)
            maps.append(f"{fit}={sub}")
    return blind, maps


def _one_side_notes(joined: pd.DataFrame, r: pd.DataFrame, t: pd.DataFrame) -> list[str]:
    notes = []
    only_ref, only_tgt = [], []
    for sub in dict.fromkeys([*r["submodel"], *t["submodel"]]):
        rs = sorted(set(r.loc[r["submodel"] == sub, "step"]))
        ts = sorted(set(t.loc[t["submodel"] == sub, "step"]))
        if not ts:
            only_ref.append((sub, rs))
            notes.append(f"{sub}: only in the reference ({count(len(rs), 'step')}); not compared")
        elif not rs:
            only_tgt.append((sub, ts))
            notes.append(f"{sub}: only in the target ({count(len(ts), 'step')}); not compared")
        elif rs != ts:
            both = sorted(set(rs) & set(ts))
            shared = f"compared the {count(len(both), 'shared step')}" if both else "no step is in both; not compared"
            notes.append(f"{sub}: the reference has {_step_span(rs)}, the target {_step_span(ts)}; {shared}")
        else:
            notes.extend(_calls_per_step_note(sub, r[r["submodel"] == sub], t[t["submodel"] == sub]))
    if len(only_ref) == 1 and len(only_tgt) == 1 and only_ref[0][1] == only_tgt[0][1]:  # one submodel under two names
        notes.append(
            f"{only_tgt[0][0]} looks like the target's name for {only_ref[0][0]} (the same steps): "
            f"compare them with --map {only_tgt[0][0]}={only_ref[0][0]}"
        )
    one_side = int((joined["tgt_seq"].isna() | joined["ref_seq"].isna()).sum())
    if one_side and not notes:
        notes.append(f"{one_side} calls are on one side only: the two runs number a step's calls differently")
    return notes


REORDER_MAX_CALLS = 6  # calls of one submodel in one step, beyond which their order is trusted


def pair_reordered_calls(calls: pd.DataFrame, agree: Callable[[int, int], bool]) -> tuple[pd.DataFrame, list[str]]:
    """Re-pair a step's calls of one submodel where the target makes them in another order.

    Calls pair by their index within the step; a port that encodes the negative prompt before
    the prompt (diffusers encodes the prompt first) would then have both text encoder calls
    fed the other's input. Where the pairs by index disagree on their inputs (``agree(ref_seq,
    tgt_seq)``), and another order makes every pair agree, the calls are paired in that order
    and a note says so. Anything short of that is left to the diagnosis."""
    calls = calls.copy()
    notes = []
    both = calls.dropna(subset=["ref_seq", "tgt_seq"])  # a batch split is one call a step: never re-paired
    for (submodel, step), group in both.groupby(["submodel", "step"], sort=False):
        if not 2 <= len(group) <= REORDER_MAX_CALLS:
            continue
        refs, tgts = [int(s) for s in group["ref_seq"]], [int(s) for s in group["tgt_seq"]]
        if all(agree(r, t) for r, t in zip(refs, tgts)):
            continue
        fits = [[agree(r, t) for t in tgts] for r in refs]
        order = next(
            (p for p in itertools.permutations(range(len(tgts))) if all(fits[i][j] for i, j in enumerate(p))), None
        )
        if order is None:
            continue
        calls.loc[group.index, "tgt_seq"] = [tgts[j] for j in order]
        pairs = ", ".join(
            f"{int(c)} with {int(group['call'].iloc[j])}"
            for c, j in zip(group["call"], order)
            if c != group["call"].iloc[j]
        )
        notes.append(
            f"{submodel} step {step}: the target makes these calls in another order; paired by their inputs "
            f"(the reference's call {pairs} of the target's)"
        )
    return calls, notes


def _calls_per_step_note(sub: str, r: pd.DataFrame, t: pd.DataFrame) -> list[str]:
    """Say when the two runs call a submodel a different number of times a step (and the
    target's calls are no batch split, which is joined instead)."""
    per_r, per_t = r.groupby("step").size(), t.groupby("step").size()
    if per_r.equals(per_t):
        return []
    if per_r.nunique() == 1 and per_t.nunique() == 1:
        nr, nt = int(per_r.iloc[0]), int(per_t.iloc[0])
        return [
            f"{sub}: the reference calls it {count(nr, 'time')} a step, the target {nt}; calls are paired by their "
            f"index within the step (the target's do not split one batch between them)"
        ]
    return [
        f"{sub}: the two runs call it a different number of times in some steps; calls are paired by their index "
        "within the step"
    ]


def _step_span(steps: list[int]) -> str:
    """``steps 0–1, 3``: the gaps said, since a run recorded with a steps filter has them."""
    return f"steps {ranges(steps)}" if len(steps) > 1 else f"step {steps[0]}"


def match_tensors(ref_call: Call, tgt_call: Call | MergedCall, names: NameMap) -> list[TensorPair]:
    """Pair the tensors of two matched calls, io by io."""
    pairs: list[TensorPair] = []
    for io in ("inputs", "outputs", "layers"):
        pairs.extend(_match_io(io, ref_call.info(io), tgt_call.info(io), tgt_call.submodel, names))
    return pairs


def nests(a: str, b: str) -> bool:
    """Whether one name is the other's dotted tail: diffusers' ``added_cond_kwargs.text_embeds``
    and an export's ``text_embeds``."""
    return a.endswith("." + b) or b.endswith("." + a)


def _match_nested(
    io: str, refs: list[TensorInfo], tgts: list[TensorInfo]
) -> tuple[list[TensorPair], list[TensorInfo], list[TensorInfo]]:
    """Pair names where one is the other's dotted tail (:func:`nests`), each the only candidate
    of the other. Returns the pairs and what is left on each side."""
    pairs = []
    for t in tgts:
        candidates = [r for r in refs if nests(r.name, t.name)]
        if len(candidates) == 1 and sum(nests(candidates[0].name, other.name) for other in tgts) == 1:
            pairs.append(TensorPair(io, candidates[0], t, "suffix"))
    paired_r, paired_t = {id(p.ref) for p in pairs}, {id(p.tgt) for p in pairs}
    return pairs, [r for r in refs if id(r) not in paired_r], [t for t in tgts if id(t) not in paired_t]


def _names_collide(by_name: dict[str, TensorInfo], tgts: list[TensorInfo], submodel: str, names: NameMap) -> bool:
    """Whether to pair by structure (flattened order and shape) rather than by name: some name
    pairs tensors of other shapes, and the two sides have the same tensors in the same order
    by shape (an engine that returns a flat list, ``output.0 … output.6``, against nested
    outputs, ``output.0.0 … output.0.5, output.1``). A name map decides instead, when given."""
    refs = list(by_name.values())
    if len(refs) != len(tgts) or any(names.tensor(submodel, t.name) is not None for t in tgts):
        return False
    collides = any(t.name in by_name and by_name[t.name].shape != t.shape for t in tgts)
    return collides and all(r.shape == t.shape for r, t in zip(refs, tgts))


def _match_io(
    io: str, refs: list[TensorInfo], tgts: list[TensorInfo], tgt_submodel: str, names: NameMap
) -> list[TensorPair]:
    by_name = {r.name: r for r in refs}
    if _names_collide(by_name, tgts, tgt_submodel, names):
        return [TensorPair(io, r, t, "structure") for r, t in zip(refs, tgts)]
    pairs, left_t = [], []
    taken: set[str] = set()
    for t in tgts:
        mapped = names.tensor(tgt_submodel, t.name)
        key, how = (mapped, "map") if mapped is not None else (t.name, "name")
        if key in by_name and key not in taken:
            pairs.append(TensorPair(io, by_name[key], t, how))
            taken.add(key)
        else:
            left_t.append(t)
    left_r = [r for r in refs if r.name not in taken]
    nested, left_r, left_t = _match_nested(io, left_r, left_t)
    pairs.extend(nested)
    if left_r and len(left_r) == len(left_t) and all(r.shape == t.shape for r, t in zip(left_r, left_t)):
        pairs.extend(TensorPair(io, r, t, "position") for r, t in zip(left_r, left_t))
    else:
        pairs.extend(TensorPair(io, r, None, "one side") for r in left_r)
        pairs.extend(TensorPair(io, None, t, "one side") for t in left_t)
    order = {r.name: i for i, r in enumerate(refs)}
    return sorted(pairs, key=lambda p: order.get(p.ref.name, len(order)) if p.ref else len(order))
