"""How the two runs differ in their settings, not in what they compute: a scheduler of another
class, one whose config says otherwise (``timestep_spacing``, ``steps_offset``,
``prediction_type``), one set to another number of steps, a pipeline called with other
arguments (a guidance scale, a prompt, a seed), or a submodel called with other non-tensor
arguments (a scheduler's ``step`` given no generator, an interpolation mode, a flag). Numbers
show where the runs part ways; this says why, when the cause is a setting.

Dumps hold each watched submodel's class and, for diffusers and transformers objects, its
config (docs/format.md, ``/submodels``). Classes are compared only where both runs have a
config (an ONNX session standing in for a torch UNet is the port, not news), and configs only
where the classes are the same, key by key where both have the key. Keys that say nothing
about the computation are left out: private ones (``_name_or_path``), the library version, and
the dtype, which the dtype warnings already give. A call's non-tensor arguments are compared
where both runs have them (an engine fed tensors only has none), for each submodel's first
matched call and for the call where the runs part ways.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from alignkit.comparison.diagnosis import INPUT_MISMATCH, LOCAL_ERROR, Divergence
from alignkit.comparison.matching import cut_short
from alignkit.storage.reader import Dump
from alignkit.storage.schema import stands_in

IGNORED_KEYS = frozenset({"torch_dtype", "dtype", "transformers_version"})
IGNORED_ARGUMENTS = frozenset(
    {  # how a pipeline hands back its result, not what it computes
        "output_type",
        "return_dict",
        "callback",
        "callback_steps",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
    }
)
SHOWN_KEYS = 4  # config keys named in one difference; the rest are counted
SHOWN_CHARS = 60  # of a long value (a prompt)
PIPELINE = "pipeline"  # how a pipeline's call arguments are named among the differences


def differences(ref: Dump, tgt: Dump, calls: pd.DataFrame | None = None) -> dict[str, str]:
    """For each submodel that differs in its description or (given the matched ``calls``) in
    the arguments of its first call, what differs, as a phrase that follows its name ("is
    EulerDiscreteScheduler in the reference, …")."""
    ref_info, tgt_info = ref.descriptions, tgt.descriptions
    out = {}
    for submodel, r in ref_info.items():
        t = tgt_info.get(submodel)
        if t is None or "config" not in r or "config" not in t:
            continue
        phrases = []
        if r["class"] != t["class"]:
            phrases.append(f"is {_short(r['class'])} in the reference, {_short(t['class'])} in the target")
        elif text := _config_text(r["config"], t["config"]):
            phrases.append(f"is configured otherwise: {text}")
        if (
            is_scheduler(r["class"])
            and not cut_short(ref)
            and not cut_short(tgt)
            and (steps := _steps(ref, submodel)) != (tgt_steps := _steps(tgt, submodel))
        ):
            phrases.append(
                f"takes {steps} steps in the reference and {tgt_steps} in the target, so its timesteps and sigmas "
                "differ"
            )
        if phrases:
            out[submodel] = "; ".join(phrases)
    if calls is not None:
        for submodel, text in _first_calls_arguments(ref, tgt, calls).items():
            phrase = f"is called with other arguments: {text}"
            out[submodel] = f"{out[submodel]}; {phrase}" if submodel in out else phrase
    if text := _arguments_text(ref.pipeline_calls, tgt.pipeline_calls):
        out[PIPELINE] = text
    return out


def call_arguments(ref: Dump, tgt: Dump, calls: pd.DataFrame, ref_seq: int) -> str:
    """The non-tensor arguments that the reference call ``ref_seq`` and its match were given
    otherwise ('' when none, or when it has no match)."""
    row = calls[calls["ref_seq"] == ref_seq]
    if row.empty or pd.isna(row["tgt_seq"].iloc[0]):
        return ""
    return _changed(ref.call_at(ref_seq).values(), tgt.call_at(int(row["tgt_seq"].iloc[0])).values())


def _first_calls_arguments(ref: Dump, tgt: Dump, calls: pd.DataFrame) -> dict[str, str]:
    """For each submodel, the arguments its first matched call was given otherwise (one call
    each: reading every call's would take seconds on a dump of 100k calls)."""
    matched = calls.dropna(subset=["ref_seq", "tgt_seq"]).drop_duplicates("submodel")
    texts = {row.submodel: call_arguments(ref, tgt, matched, int(row.ref_seq)) for row in matched.itertuples()}
    return {submodel: text for submodel, text in texts.items() if text}


def _arguments_text(ref: list[dict[str, Any]], tgt: list[dict[str, Any]]) -> str:
    """The arguments the n-th pipeline call of each run was given otherwise, by parameter
    name (both runs' defaults filled in, so a value left to its default counts as given)."""
    texts, pairs = {}, min(len(ref), len(tgt))
    for n, (r, t) in enumerate(zip(ref, tgt)):
        if text := _changed(r["arguments"], t["arguments"]):
            texts[n] = text
    phrases = []
    if len(texts) == pairs and len(set(texts.values())) == 1:  # every call alike
        phrases.append(f"is called with other arguments: {next(iter(texts.values()))}")
    else:
        phrases += [f"call {n} is given other arguments: {text}" for n, text in texts.items()]
    if len(ref) != len(tgt) and ref and tgt:
        phrases.append(f"is called {len(ref)} times in the reference and {len(tgt)} in the target")
    return "; ".join(phrases)


def _changed(ref: dict[str, Any], tgt: dict[str, Any]) -> str:
    """The arguments both runs were given, with other values (``guidance_scale 7.5 → 5.0``),
    leaving out how a result is handed back."""
    keys = [k for k in ref if k in tgt and k not in IGNORED_ARGUMENTS and ref[k] != tgt[k]]
    return _listed([f"{k} {argument_text(ref[k])} → {argument_text(tgt[k])}" for k in keys])


def argument_text(value: Any) -> str:
    """A recorded pipeline argument as the user wrote it: a stand-in (``<Generator seed=0>``) bare,
    a long prompt cut short."""
    text = value if stands_in(value) else json.dumps(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[: SHOWN_CHARS - 1]}…"


def given_arguments(arguments: dict[str, Any]) -> str:
    """A pipeline call's arguments that say something: set (not None), and about what it
    computes (not how it hands back its result)."""
    return ", ".join(
        f"{k} {argument_text(v)}"
        for k, v in arguments.items()
        if v is not None and v != [] and k not in IGNORED_ARGUMENTS
    )


def _listed(parts: list[str]) -> str:
    shown = parts[:SHOWN_KEYS]
    if len(parts) > SHOWN_KEYS:
        shown.append(f"and {len(parts) - SHOWN_KEYS} more")
    return ", ".join(shown)


def _steps(dump: Dump, submodel: str) -> int:
    """How many steps a scheduler took: its calls, counted also where a steps filter left
    them out (``calls_run``); in a dump without that count, one past the step of its last call."""
    counted = dump.metadata.get("calls_run")
    if isinstance(counted, dict) and isinstance(counted.get(submodel), int):
        return counted[submodel]
    steps = dump.calls.loc[dump.calls["submodel"] == submodel, "step"]
    return int(steps.max()) + 1 if len(steps) else 0


def warnings(diffs: dict[str, str]) -> list[str]:
    return [f"{submodel} {text}" for submodel, text in diffs.items()]


def explain(first: Divergence, diffs: dict[str, str], ref: Dump, arguments: str = "") -> None:
    """Add to the first divergence the setting that likely explains it: for a local error, its
    own submodel's; for an input mismatch, the pipeline's arguments and a scheduler's (in a
    diffusers pipeline the pipeline and its scheduler compute the glue: the prompt's tokens,
    the initial noise and its scale, ``scale_model_input``, the timesteps, the guidance); and,
    whatever its kind, the non-tensor ``arguments`` the diverging call itself was given otherwise."""
    if first.kind == LOCAL_ERROR:
        named = [first.submodel] if first.submodel in diffs else []
    elif first.kind == INPUT_MISMATCH:
        named = [s for s in diffs if s == PIPELINE or is_scheduler(ref.descriptions.get(s, {}).get("class", ""))]
    else:
        named = []
    parts = [f"{s} {diffs[s]}" for s in named]
    if arguments and not any(arguments in part for part in parts):
        parts.append(f"{first.submodel} is called with other arguments here: {arguments}")
    if parts:
        text = "; ".join(parts)
        first.message += f"; {text}"
        first.evidence["config"] = text


def is_scheduler(class_name: str) -> bool:
    return class_name.startswith("diffusers.schedulers.")


def _short(class_name: str) -> str:
    return class_name.rsplit(".", 1)[-1]


def _config_text(ref: dict[str, Any], tgt: dict[str, Any]) -> str:
    """The keys both configs have, with other values (a key only one has comes from another
    library version, which fills in its own default)."""
    keys = [k for k in ref if k in tgt and not k.startswith("_") and k not in IGNORED_KEYS and ref[k] != tgt[k]]
    return _listed([f"{k} {json.dumps(ref[k])} → {json.dumps(tgt[k])}" for k in keys])


def same_seed(ref: Dump, tgt: Dump) -> str | None:
    """The seeds both runs' pipeline calls were given (``<Generator seed=0>``), when they were
    recorded on both sides and agree; None when they differ or are unknown."""
    seeds = [_seeds(dump) for dump in (ref, tgt)]
    return ", ".join(seeds[0]) if seeds[0] and seeds[0] == seeds[1] else None


def _seeds(dump: Dump) -> list[str]:
    out = []
    for call in dump.pipeline_calls:
        for value in call["arguments"].values():
            if isinstance(value, str) and value.startswith("<Generator seed="):
                out.append(value.removeprefix("<Generator ").removesuffix(">"))
    return out
