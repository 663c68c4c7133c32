"""Replay: feed the reference inputs of every recorded call of one submodel into a target
(an ONNX file, a torch module, any callable) and compare its outputs call by call — the
submodel's local error per step, free of accumulation.

Inputs are fed as recorded. Where the target declares other input types (an ONNX graph
that wants int64 where float32 was recorded), they are cast, and each cast is reported:
it can itself be the bug.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.comparison import Comparison, compare
from alignkit.comparison.matching import nests
from alignkit.errors import AlignkitError, ReplayError, UsageError, require
from alignkit.recording.flatten import name_outputs, split
from alignkit.recording.metadata import run_metadata
from alignkit.recording.ort_runs import ort_outputs_for
from alignkit.recording.targets import is_ort_session, is_torch_module, uncompiled
from alignkit.storage.reader import Call, open_dump
from alignkit.storage.records import CallRecord
from alignkit.storage.schema import stands_in
from alignkit.storage.writer import DumpWriter

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def parse_steps(text: str | None) -> list[int] | None:
    """``"0-4,10"`` → [0, 1, 2, 3, 4, 10]."""
    if not text:
        return None
    steps: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            if sep and int(hi) < int(lo):
                raise UsageError(f"--steps {text!r}: the range {part.strip()} runs backwards")
            steps.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError as exc:
        raise UsageError(f"--steps {text!r}: expected numbers and ranges like 0-4,10") from exc
    return steps


def replay(
    ref_dump: str | os.PathLike,
    *,
    submodel: str,
    target: Any,
    out: str | os.PathLike | None = None,
    steps: Iterable[int] | None = None,
    layers: bool = False,
    **compare_options: Any,
) -> Comparison:
    """Replay ``submodel``'s recorded inputs into ``target`` and compare with the reference.

    ``target`` is a path to an ``.onnx`` file, ``"module:factory"`` (called with no
    arguments to make the target), a torch module, an ONNX Runtime session or a callable.
    ``layers`` records the target's layers too (every leaf module of a torch target, every
    intermediate output of an ONNX target), so the comparison names the first layer that
    diverges against a reference recorded with layers. Without ``out`` the target's dump is
    written to a new temporary folder and kept, since the result's report reads its images
    from it (``result.target`` names it).
    """
    out_path = (
        Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="alignkit-replay-")) / f"replay_{submodel}.h5"
    )
    if out_path.exists() and Path(ref_dump).exists() and os.path.samefile(out_path, ref_dump):
        raise UsageError(f"{out_path}: the replay would be written over the dump it replays")
    wanted = set(steps) if steps is not None else None
    notes: list[str] = []
    with open_dump(ref_dump) as ref:
        calls = [c for c in ref if c.submodel == submodel and (wanted is None or c.step in wanted)]
        if not calls:
            if submodel in ref.submodels:
                have = ref.steps(submodel)
                raise UsageError(
                    f"{ref.path}: no calls of {submodel!r} at the steps asked for (it has steps {have[0]}–{have[-1]})"
                )
            have = ", ".join(ref.submodels) or "none"
            raise UsageError(f"{ref.path}: no calls of {submodel!r} to replay (submodels: {have})")
        runner = _make_runner(target, layers)
        writer = DumpWriter(out_path, {**run_metadata(f"replay of {submodel}"), "replay_of": str(ref.path)})
        if (
            ref.metadata.get("step_source", "none") != "none"
        ):  # the calls keep the reference's steps, which come from there
            writer.set_attr("step_source", ref.metadata["step_source"])
        writer.describe(submodel, _target_description(target))
        try:
            for call in calls:
                feed, values, adapted = runner.feed(call)
                try:
                    named_out, named_layers, said = runner.run(feed, values)
                except (AlignkitError, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    raise ReplayError(
                        f"{submodel} step {call.step} call {call.call}: the target raised {type(exc).__name__}: {exc}"
                    ) from exc
                notes.extend(n for n in [*adapted, *said] if n not in notes)
                inputs, in_values = split(list(feed.items()))
                outputs, _ = split(named_out)
                layer_tensors, _ = split(named_layers)
                writer.put(
                    CallRecord(
                        call.seq,
                        call.submodel,
                        call.step,
                        call.call,
                        call.ordinal,
                        inputs,
                        outputs,
                        layer_tensors,
                        values=in_values,
                    )
                )
                writer.flush()
        finally:
            writer.close()
    result = compare(ref_dump, out_path, submodels=[submodel], **compare_options)
    result.warnings[:0] = notes
    return result


Named = list[tuple[str, Any]]


class _Runner:
    def feed(self, call: Call) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """The recorded inputs, Python numbers given back as numbers (a model may treat an
        ``int`` and a tensor differently: transformers' ``logits_to_keep``)."""
        inputs = {
            name: value.item() if value.ndim == 0 and call.source("inputs", name) == "python" else value
            for name, value in call.inputs.items()
        }
        return inputs, call.values("inputs"), []

    def run(self, feed: dict[str, Any], values: dict[str, Any]) -> tuple[Named, Named, list[str]]:
        """(outputs, layer outputs, what was adapted, said as notes) of one call."""
        raise NotImplementedError


class _OrtRunner(_Runner):
    def __init__(self, session: Any, exposed: Any = None):
        self.session = session
        self.inputs = session.get_inputs()
        self.exposed = exposed

    def feed(self, call: Call) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        recorded = call.inputs
        adapted = []
        empty = {
            m.name: e for m in self.inputs if m.name not in recorded and (e := _empty_cache(m, recorded)) is not None
        }
        if empty:  # the prefill: a decoder export takes a cache of no positions where the reference had none
            recorded = {**recorded, **empty}
            adapted.append("replay fed an empty KV cache (no positions) where the reference recorded none: the prefill")
        names = [i.name for i in self.inputs]
        chosen = _feed_by_name(names, recorded)
        for meta in self.inputs:
            want = _ORT_TYPES.get(meta.type)
            value = np.asarray(chosen[meta.name])
            if want is not None and value.dtype != want:
                adapted.append(
                    f"replay cast input `{meta.name}` from {value.dtype} (recorded) to {np.dtype(want).name} "
                    "(declared by the ONNX model)"
                )
                value = value.astype(want)
            chosen[meta.name] = value
        return chosen, {}, adapted

    def run(self, feed: dict[str, Any], values: dict[str, Any]) -> tuple[Named, Named, list[str]]:
        if self.exposed is not None:
            return (*self.exposed.run(feed), [])
        result = self.session.run(None, feed)
        return ort_outputs_for(self.session)(result, (None,), {}), [], []


def _feed_by_name(names: list[str], recorded: dict[str, Any]) -> dict[str, Any]:
    """The recorded input for each of the model's inputs: by name; else by dotted tail, where
    one recorded name alone ends in it (diffusers' ``added_cond_kwargs.time_ids`` is an SDXL
    export's ``time_ids``); what is left, by position when as many are left on each side."""
    source = {n: n for n in names if n in recorded}
    for n in names:
        tails = [r for r in recorded if nests(r, n)]
        if n not in source and len(tails) == 1 and tails[0] not in source.values():
            source[n] = tails[0]
    left = [n for n in names if n not in source]
    unused = [r for r in recorded if r not in source.values()]
    if left and len(left) != len(unused):
        raise UsageError(f"the ONNX model takes {names}, the recorded call has {list(recorded)}")
    source.update(zip(left, unused))
    return {n: recorded[source[n]] for n in names}


def _empty_cache(meta: Any, recorded: dict[str, np.ndarray]) -> np.ndarray | None:
    """A KV-cache input of no positions, (batch, heads, 0, head size), for an ONNX decoder's
    ``past_key_values.N.key`` when its heads and head size are fixed; else None."""
    shape = list(meta.shape or [])
    if (
        not meta.name.startswith(("past_key_values.", "past."))
        or len(shape) != 4
        or not all(isinstance(d, int) for d in (shape[1], shape[3]))
    ):
        return None
    batch = shape[0] if isinstance(shape[0], int) else next((v.shape[0] for v in recorded.values() if np.ndim(v)), None)
    return None if batch is None else np.zeros((batch, shape[1], 0, shape[3]), _ORT_TYPES.get(meta.type, np.float32))


class _CallableRunner(_Runner):
    def __init__(self, fn: Any, layers: bool = False):
        self.fn = fn
        self.torch = is_torch_module(fn)
        if layers and not self.torch:
            raise UsageError("layers can be replayed for torch modules and ONNX models only")
        self.layers = layers
        self.signature = _signature(uncompiled(fn).forward if self.torch else fn)
        self.feed_name = None if self.torch else _sole_parameter(self.signature)

    def takes(self, name: str) -> bool:
        """Whether the target has a parameter ``name`` (or takes any keyword)."""
        if self.signature is None:
            return True
        params = self.signature.parameters
        return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def run(self, feed: dict[str, Any], values: dict[str, Any]) -> tuple[Named, Named, list[str]]:
        if self.feed_name is not None and set(feed) != {self.feed_name}:  # an engine fed one dict, as recorded
            return name_outputs(self.fn(dict(feed))), [], []
        recorded = {k: v for k, v in values.items() if "." not in k and not stands_in(v)}
        left_out = [k for k in recorded if not self.takes(k)]
        notes = (
            [f"replay left out the recorded {', '.join(f'`{k}`' for k in left_out)}: not parameters of the target"]
            if left_out
            else []
        )
        args = {**_unflatten(feed), **{k: v for k, v in recorded.items() if k not in left_out}}
        if not self.torch:
            return name_outputs(self.fn(**args)), [], notes
        import torch

        from alignkit.recording.layers import capture_layers

        args, cast = _to_module(self.fn, args)
        with torch.no_grad(), capture_layers(self.fn, enabled=self.layers) as layers:
            result = self.fn(**args)
        return name_outputs(result), [(t.name, t.data) for t in layers], cast + notes


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _sole_parameter(signature: inspect.Signature | None) -> str | None:
    """The name of the one positional parameter, when that is all a callable takes (an engine
    fed a dict of compiler-made names, ``{"input.1": ...}``)."""
    params = list(signature.parameters.values()) if signature is not None else []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return params[0].name if len(params) == 1 and params[0].kind in positional else None


def _to_module(module: Any, args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Recorded arrays as torch tensors on the module's device, and a KV cache rebuilt.

    Floating tensors of two or more dimensions take the dtype of most of the module's
    parameters (fp32 latents into a bf16 port), each cast said. Scalars and vectors (a
    timestep, a guidance scale) stay as recorded: models embed them in float32 and cast after,
    and diffusers feeds them so; a bf16 timestep would itself be a bug (999 becomes 1000)."""
    import torch

    params = [p for p in module.parameters() if p.is_floating_point()]
    dtype = (
        max({p.dtype for p in params}, key=lambda d: sum(p.numel() for p in params if p.dtype == d)) if params else None
    )
    device = params[0].device if params else torch.device("cpu")
    cast: list[str] = []

    def tensor(name: str, value: np.ndarray) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(value)).to(device)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype and t.dim() >= 2:
            cast.append(
                f"replay cast input `{name}` from {t.dtype} (recorded) to {dtype} (the module's parameters)".replace(
                    "torch.", ""
                )
            )
            t = t.to(dtype)
        return t

    out = {}
    for name, value in args.items():
        if isinstance(value, np.ndarray):
            out[name] = tensor(name, value)
        elif isinstance(value, dict) and _is_kv_cache(value):
            out[name] = _kv_cache({k: tensor(f"{name}.{k}", v) for k, v in value.items()})
        else:
            out[name] = value
    return out, list(dict.fromkeys(cast))


_KV_PART = re.compile(r"\d+\.((decoder|encoder)\.)?(key|value)")


def _is_kv_cache(parts: dict[str, Any]) -> bool:
    return bool(parts) and all(_KV_PART.fullmatch(k) for k in parts)


def _kv_cache(parts: dict[str, Any]) -> Any:
    """The transformers cache that recording flattened to ``0.key``, ``0.value``…
    (``0.decoder.key``, ``0.encoder.key`` for an encoder-decoder cache)."""
    transformers = require("transformers", "demo")

    def build(side: str) -> Any:
        cache, prefix = transformers.DynamicCache(), f"{side}." if side else ""
        for i in sorted({int(k.split(".")[0]) for k in parts if (_KV_PART.fullmatch(k).group(2) or "") == side}):
            cache.update(parts[f"{i}.{prefix}key"], parts[f"{i}.{prefix}value"], i)
        return cache

    if any(".decoder." in k for k in parts):
        return transformers.EncoderDecoderCache(build("decoder"), build("encoder"))
    return build("")


def _unflatten(feed: dict[str, Any]) -> dict[str, Any]:
    """``{"added.text": x}`` → ``{"added": {"text": x}}`` (one level, as flatten made it)."""
    out: dict[str, Any] = {}
    for name, value in feed.items():
        head, sep, rest = name.partition(".")
        if sep and not rest.isdigit():
            out.setdefault(head, {})[rest] = value
        else:
            out[name] = value
    return out


def _make_runner(target: Any, layers: bool = False) -> _Runner:
    if isinstance(target, (str, os.PathLike)) and str(target).endswith(".onnx"):
        ort = require("onnxruntime", "onnx")
        if not Path(target).is_file():
            raise UsageError(f"{target}: no such ONNX file")
        try:
            session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's own error: one line of it
            raise UsageError(f"{target}: ONNX Runtime cannot load it ({_first_line(exc)})") from exc
        return _make_runner(session, layers)
    if isinstance(target, str):
        factory = factory_from(target)
        try:
            made = factory()
        except Exception as exc:
            raise UsageError(f"{target!r}: the factory raised {type(exc).__name__}: {_first_line(exc)}") from exc
        if isinstance(made, (str, os.PathLike)) or not callable(made):
            raise UsageError(
                f"{target!r} made a {type(made).__name__}: the factory must return a model, a session or a callable"
            )
        return _make_runner(made, layers)
    if is_ort_session(target):
        exposed = None
        if layers:
            from alignkit.recording.onnx_layers import expose

            exposed = expose(target._model_path, providers=target.get_providers())
        return _OrtRunner(target, exposed)
    if callable(target):
        return _CallableRunner(target, layers)
    raise UsageError(
        f"cannot replay into {type(target).__name__}: give an .onnx path, module:factory, a torch module or a callable"
    )


def _target_description(target: Any) -> dict[str, str]:
    """What the replayed target is, for the replay dump's ``/submodels``: an ONNX model's
    precision read from its graph (an fp16 build behind float32 I/O is judged at its floor)."""
    from alignkit.recording.targets import description, is_ort_session

    if isinstance(target, (str, os.PathLike)) and str(target).endswith(".onnx"):
        from alignkit.recording.onnx_layers import onnx_precision

        precision = onnx_precision(str(target))
        return {"class": "onnx", "engine": "onnxruntime", **({"precision": precision} if precision else {})}
    if is_ort_session(target) or not isinstance(target, str):
        try:
            return description(target)
        except Exception:  # a target that cannot be described is still replayed
            return {"class": type(target).__name__}
    return {"class": str(target)}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def factory_from(spec: str) -> Any:
    """The callable ``module:name`` names, imported (one line when it cannot be)."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise UsageError(f"{spec!r}: expected an .onnx path or module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{spec!r}: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{spec!r}: {module_name} has no callable {attr!r}")
    return factory
