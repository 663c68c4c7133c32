"""The Recorder: watches submodels, keys each call by (submodel, step, call), hands copies
to the background writer."""

from __future__ import annotations

import atexit
import collections
import functools
import json
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from alignkit.errors import UsageError
from alignkit.phrasing import count
from alignkit.recording import openvino
from alignkit.recording.flatten import Named, split
from alignkit.recording.hooks import CallHook, Hook, MethodHook, ModuleHook, wrap_function
from alignkit.recording.metadata import closing_metadata, path_for_rank, run_metadata
from alignkit.recording.openvino import is_openvino_engine
from alignkit.recording.seam import current_call, pop_call, push_call, recording_paused
from alignkit.recording.targets import (
    ObjectNames,
    description,
    is_diffusers_scheduler,
    is_function,
    is_ort_session,
    is_pipeline,
    is_torch_module,
    ort_session_name,
    uncompiled,
)
from alignkit.recording.tensors import Tensor
from alignkit.storage.records import CallRecord
from alignkit.storage.writer import DumpWriter

_ACTIVE: list[Recorder] = []


class Recorder:
    """Record every call of the watched submodels into one HDF5 dump.

    Use it as a context manager (or ``start``/``stop``). Filters keep large runs affordable:
    ``include``/``exclude`` are regular expressions on submodel names, ``tensors`` one on
    tensor names, ``steps`` the steps to keep (calls are still counted in the others).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        label: str | None = None,
        include: str | None = None,
        exclude: str | None = None,
        tensors: str | None = None,
        steps: Iterable[int] | None = None,
        layers: Iterable[str] | None = None,
        layer_filter: str | None = None,
        layer_depth: int | None = None,
        command: str | None = None,
        max_pending_bytes: int = 512 << 20,
        spread_against: list[Any] | None = None,
        mode: str = "full",
        full_at: str | None = None,
        against: str | os.PathLike | None = None,
    ):
        self.path = os.fspath(path)
        self.label = label
        self._include = _regex("include", include)
        self._exclude = _regex("exclude", exclude)
        self._tensors = _regex("tensors", tensors)
        self._steps = set(steps) if steps is not None else None
        self._layers = list(layers or [])
        self._layer_filter = _regex("layer_filter", layer_filter)
        self._layer_depth = layer_depth
        self._command = command
        self._max_pending = max_pending_bytes
        if mode not in ("full", "stats"):
            raise UsageError(f"--mode {mode!r}: expected full or stats")
        self._mode = mode
        self._full = parse_full_at(full_at)
        if self._full and mode != "stats" and against is None:
            raise UsageError("--full-at picks the calls a statistics recording keeps in full: give --mode stats too")
        if layer_depth is not None and not self._layers:
            raise UsageError("--layer-depth limits --layers: name the submodel whose layers to record with --layers")
        self._against = None
        if against is not None:
            from alignkit.recording.stats import Against
            from alignkit.storage.reader import open_dump

            self._against = Against(open_dump(against))
            self._mode = "stats"  # the dump holds statistics where the runs agree
        self._spread = None
        if spread_against:
            from alignkit.recording.repeat import Spread

            self._spread = Spread(spread_against)
        self._hooks: list[Hook] = []
        self._watched = ObjectNames()  # each watched object: the submodel it is recorded as
        self._methods = ObjectNames()  # each watched method of an object: its submodel
        self._names: dict[str, None] = {}  # every submodel name given out, in order
        self._wrapped: list[str] = []  # submodels recorded only through the wrapper watch() returned
        self._described: set[str] = set()  # submodels whose class and config are in the dump
        self._filter_notes: list[str] = []  # options that could not do what they were asked
        self._redescribe: set[str] = set()  # names released: their next description replaces the first
        self._openvino_hook: Hook | None = None
        self._openvino_namer: Callable[[Any], str | None] = lambda engine: None
        self._final_notes: list[str] = []
        self._tensors_kept = 0  # tensors the tensors filter let through
        self._layers_kept: collections.Counter = collections.Counter()  # submodel → layer outputs recorded
        self._pipeline_calls = 0  # calls of watched pipelines whose arguments are noted
        self._lock = threading.Lock()
        self._seq = 0
        self._step = 0
        self._step_source: str | None = None
        self._calls: collections.Counter = collections.Counter()
        self._ordinals: collections.Counter = collections.Counter()
        self._unrecorded: collections.Counter = (
            collections.Counter()
        )  # (submodel, how) → calls that could not be recorded whole
        self._writer: DumpWriter | None = None
        self._written = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Recorder:
        """Open the dump and start recording; a recorder never stopped is stopped when the
        interpreter exits, so that the dump is complete and holds its last calls."""
        self.path = path_for_rank(self.path)  # -o dump_{rank}.h5: the rank is known by now, if ever
        self._writer = DumpWriter(self.path, run_metadata(self.label, self._command), self._max_pending)
        _ACTIVE.append(self)
        self._error_before = getattr(sys, "last_value", None)  # an interactive session's earlier error is not the run's
        atexit.register(self._stop_at_exit)
        return self

    def _stop_at_exit(self) -> None:
        """Stop a recorder left running, with the exception that ended the script, if one did."""
        error = getattr(sys, "last_value", None)
        self.stop(error if error is not self._error_before else None)

    def stop(self, error: BaseException | None = None) -> None:
        """Remove every hook, then drain and close the dump (raises RecordingError on failure),
        with a warning for each thing the dump lacks that the user may expect. ``error`` is the
        exception that ended the run, if one did: the dump keeps it, so that a run cut short is
        not read as one set to fewer steps."""
        atexit.unregister(self._stop_at_exit)
        self.remove_hooks()
        self._final_notes = self._filter_notes + self._unmatched_filters()
        if self._writer is not None:
            for message in self._stop_warnings():
                warnings.warn(f"alignkit: {message}", RuntimeWarning, stacklevel=2)
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close({**closing_metadata(), **self._closing_facts(error)})
                if self._against is not None:
                    self._against.reference.close()
            finally:
                self._written = writer.calls_written

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.stop()
            return
        try:
            self.stop(exc)
        except Exception as close_error:  # never mask the user's own exception
            warnings.warn(str(close_error), RuntimeWarning, stacklevel=2)

    def _closing_facts(self, error: BaseException | None) -> dict[str, str]:
        """What only the end of the run knows (docs/format.md): how many calls each recorded
        submodel made, the filters that left some out, and the exception that ended the run."""
        filters = {
            "include": self._include and self._include.pattern,
            "exclude": self._exclude and self._exclude.pattern,
            "tensors": self._tensors and self._tensors.pattern,
            "steps": sorted(self._steps) if self._steps is not None else None,
            "layers": self._layers or None,
            "layer_depth": self._layer_depth,
            "layer_filter": self._layer_filter and self._layer_filter.pattern,
        }
        facts = {"calls_run": json.dumps(dict(self._ordinals))}
        if self._mode != "full":
            facts["mode"] = self._mode
        if self._against is not None:
            facts["against"] = json.dumps(
                {"reference": str(self._against.reference.path), "full_calls": self._against.full_calls}
            )
        if self._spread is not None:
            spread = self._spread
            facts["repeat"] = json.dumps(
                {"runs": len(spread.earlier) + 1, "measured": spread.measured, "unmatched": spread.unmatched}
            )
        if given := {key: value for key, value in filters.items() if value is not None}:
            facts["filters"] = json.dumps(given)
        if notes := self._final_notes:
            facts["filter_notes"] = json.dumps(notes)
        if error is not None and not isinstance(error, SystemExit):
            facts["error"] = _ended_by(error)
        return facts

    def _unmatched_filters(self) -> list[str]:
        """Filters that matched nothing or could not apply (a typo would otherwise leave an
        empty dump, a layer request a dump without layers): warned at the end, kept in the dump."""
        names = list(self._names)
        watched = ", ".join(names) or "none"
        out = []
        if self._include is not None and not any(self._include.search(n) for n in names):
            out.append(
                f"include {self._include.pattern!r} matched none of the watched submodels ({watched}), so none was "
                "recorded"
            )
        if self._exclude is not None and names and not any(self._exclude.search(n) for n in names):
            out.append(f"exclude {self._exclude.pattern!r} matched none of the watched submodels ({watched})")
        if self._tensors is not None and self._seq and not self._tensors_kept:
            out.append(f"tensors {self._tensors.pattern!r} matched no tensor of any recorded call, so none was stored")
        for layer in self._layers:
            parts = [n for n in names if n.startswith(f"{layer}.")]
            if layer not in self._names and parts:
                out.append(
                    f"layers: {layer!r} is recorded through its methods, as {', '.join(parts)}: ask for those "
                    f"(--layers {parts[0]}), so no layers were recorded"
                )
            elif layer not in self._names:
                out.append(
                    f"layers: {layer!r} is not a watched submodel ({watched}), so no layers were recorded for it"
                )
            elif self._ordinals[layer] and not self._layers_kept[layer]:
                out.append(
                    f"layers: {layer} ran {count(self._ordinals[layer], 'time')} but no layer output was recorded "
                    f"(the way it is watched cannot reach its layers{self._layer_filter_text()})"
                )
        if self._steps is not None and self._seq and not any(0 <= s <= self._step for s in self._steps):
            out.append(
                f"steps: none of the steps asked for ran (the run had steps 0–{self._step}), so no calls were recorded"
            )
        return out

    def _layer_filter_text(self) -> str:
        return f", or layer_filter {self._layer_filter.pattern!r} matched none" if self._layer_filter else ""

    def _stop_warnings(self) -> list[str]:
        """What the dump lacks that the user may expect: options that could not do what they
        were asked, calls that ran where they cannot be recorded."""
        out = list(self._final_notes)
        out += [
            f"{name!r} could not be watched in place (its class is built in), and the recording wrapper that watch() "
            "returned "
            "for it was never called: call that instead"
            for name in self._wrapped
            if not self._ordinals[name]
        ]
        out += [f"{name} ran {count(n, 'time')} {how}" for (name, how), n in self._unrecorded.items()]
        return out

    @property
    def calls_recorded(self) -> int:
        """Calls written so far (final once recording has stopped)."""
        return self._written if self._writer is None else self._writer.calls_written

    @property
    def hooks(self) -> list[Hook]:
        return list(self._hooks)

    def remove_hooks(self) -> None:
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks.clear()
        self._openvino_hook = None
        self._watched.clear()
        self._methods.clear()

    # -- watching --------------------------------------------------------------------------
    def watch(self, obj: Any, name: str | None = None, *, method: str | None = None) -> Any:
        """Record calls of ``obj`` under the submodel ``name``; returns what to call.

        A pipeline, module, session or engine object is watched in place and returned (a
        diffusers scheduler on its ``step``, which then ends each step); a plain function cannot
        be, nor an object of a built-in class (a C-extension engine, ``functools.partial``), so a
        recording wrapper of it is returned instead. Watching an object again does nothing (each
        call is recorded once); asking for another name for it is an error.
        """
        if method is not None:
            if not self._watched_already(self._methods.get(obj, method), obj, name):
                self.watch_method(obj, method, name or f"{type(obj).__name__}.{method}")
            return obj
        if is_pipeline(obj):
            from alignkit.recording.diffusers import watch_pipeline

            watch_pipeline(self, obj)
            return obj
        if self._watched_already(self._watched.get(obj), obj, name):
            return obj
        if is_diffusers_scheduler(obj):
            from alignkit.recording.diffusers import watch_scheduler

            watch_scheduler(self, obj, name or "scheduler")
            return obj
        if is_torch_module(obj):
            submodel = self.unique_name(name or type(uncompiled(obj)).__name__)
            self.add_hook(obj, ModuleHook(self, obj, submodel))
            self.watch_layers(obj, submodel)
            return obj
        if is_ort_session(obj):
            submodel = self.unique_name(name or ort_session_name(obj))
            self._watch_session(obj, submodel, self.session_layers(obj, submodel))
            return obj
        if is_openvino_engine(obj):
            self._watch_openvino(obj, self.unique_name(name or openvino.model_name(obj)))
            return obj
        if is_function(obj):
            submodel = self.unique_name(name or obj.__name__)
            self.describe(submodel, obj)
            return wrap_function(self, obj, submodel)
        if callable(obj):
            submodel = self.unique_name(name or type(obj).__name__)
            try:
                self.add_hook(obj, CallHook(self, obj, submodel))
            except TypeError:  # a built-in class (a C-extension engine, functools.partial): wrap it
                self._wrapped.append(submodel)
                self.describe(submodel, obj)
                return wrap_function(self, obj, submodel)
            return obj
        raise UsageError(
            f"cannot watch {type(obj).__name__}: it is not callable; pass method= to name the method to record"
        )

    def _watched_already(self, submodel: str | None, obj: Any, name: str | None) -> bool:
        if submodel is None:
            return False
        if name is not None and name != submodel:
            raise UsageError(
                f"this {type(obj).__name__} is already watched as {submodel!r}; it cannot also be {name!r}"
            )
        return True

    def wants_layers(self, submodel: str) -> bool:
        """Whether ``--layers`` asked for the layers of ``submodel``."""
        return submodel in self._layers

    def watch_layers(self, module: Any, submodel: str) -> None:
        """Record the outputs of ``module``'s layers under each call of ``submodel``, if asked."""
        if self.wants_layers(submodel):
            from alignkit.recording.layers import recorder_layers, stateless

            self.add_hook(None, recorder_layers(self, module, submodel, self._layer_filter, self._layer_depth))
            self._redescribe.add(submodel)  # the description again, with the layers that hold no parameters
            self._described.discard(submodel)
            self.describe(submodel, module, stateless_layers=json.dumps(stateless(module)))

    def session_layers(self, session: Any, submodel: str) -> Callable[[tuple, dict], Named] | None:
        """If ``--layers`` asked for ``submodel``: what runs a copy of the session's model with
        every intermediate output exposed; else None."""
        if not self.wants_layers(submodel):
            return None
        from alignkit.recording.onnx_layers import expose
        from alignkit.recording.ort_runs import ort_bind

        path = getattr(session, "_model_path", None)
        if not isinstance(path, str) or not path:
            self.note_filter(
                f"layers: {submodel}'s ONNX Runtime session was not made from a model file, so its layers cannot be "
                "recorded"
            )
            return None
        exposed = expose(path, self._layer_filter, session.get_providers())
        return lambda args, kwargs: exposed.run(dict(ort_bind(args, kwargs)))[1]

    def _watch_session(self, session: Any, submodel: str, layers: Callable[[tuple, dict], Named] | None) -> None:
        """Every way the session runs, recorded as ``submodel`` (layers through ``run`` only)."""
        from alignkit.recording.ort_runs import PREBOUND, BindingMemory, session_runs

        prebound = functools.partial(self.not_recorded, submodel, PREBOUND)
        for method, (bind, outputs) in session_runs(session, prebound).items():
            hook = MethodHook(
                self, session, method, submodel, bind=bind, outputs=outputs, layers=layers if method == "run" else None
            )
            self.add_hook(session, hook, whole=method == "run")
        self.add_hook(None, BindingMemory())

    def watch_method(self, obj: Any, method: str, name: str, *, after: Callable[[], None] | None = None) -> str:
        """Watch ``obj.<method>``; returns the submodel it is recorded as."""
        if not callable(getattr(obj, method, None)):
            raise UsageError(f"{type(obj).__name__} has no method {method!r} to watch")
        hook = MethodHook(self, obj, method, self.unique_name(name), after=after)
        self._methods.add(obj, hook.name, method)
        self.add_hook(obj, hook, whole=False)
        return hook.name

    def _watch_openvino(self, engine: Any, submodel: str) -> None:
        """Record an OpenVINO compiled model or infer request as ``submodel``, with the device
        and precision it computes in."""
        openvino.introduce(self, engine, submodel)
        self.mark_watched(engine, submodel)
        self.record_openvino()

    def record_openvino(self, name_unwatched: Callable[[Any], str | None] | None = None) -> None:
        """Record the OpenVINO engines this recorder watches and, with ``name_unwatched``, every
        other one under the name it gives (``alignkit record``)."""
        if name_unwatched is not None:
            self._openvino_namer = name_unwatched
        if self._openvino_hook is None:
            hook = openvino.OpenVINOHooks(self, lambda e: self._watched.get(e) or self._openvino_namer(e))
            self._openvino_hook = hook
            self.add_hook(None, hook)

    def add_hook(self, obj: Any, hook: Hook, *, whole: bool = True) -> None:
        """Keep ``hook``; ``whole``: it records calls of ``obj`` itself, not of one of its methods."""
        self._hooks.append(hook)
        if obj is not None:
            self.describe(hook.name, obj)
        if obj is not None and whole:
            self.mark_watched(obj, hook.name)

    def describe(self, submodel: str, obj: Any, **extra: str) -> None:
        """Store what ``submodel`` is (its class, its config, the precision its engine computes
        in) once, so a comparison can say that a scheduler differs, not only that its numbers do."""
        if self._writer is None or submodel in self._described:
            return
        self._described.add(submodel)
        try:
            attrs = {**description(obj), **extra}
        except Exception:  # a config that cannot be read is no reason to stop the run
            attrs = dict(extra)
        if attrs:
            self._writer.describe(submodel, attrs, replace=submodel in self._redescribe)

    def note_filter(self, message: str) -> None:
        """An option that could not do what it was asked: a warning when recording stops, and
        a note in the dump (``filter_notes``)."""
        with self._lock:
            if message not in self._filter_notes:
                self._filter_notes.append(message)

    def note_pipeline_call(self, pipeline: str, arguments: dict[str, Any]) -> None:
        """Note a pipeline call's arguments, and where in the run it began (the ``seq`` its
        first submodel call will have)."""
        if self._writer is None or self._writer.stopped_reason is not None:
            return
        with self._lock:
            index, seq = self._pipeline_calls, self._seq
            self._pipeline_calls += 1
        try:
            text = json.dumps(arguments)
        except (TypeError, ValueError):  # a value plain_value let through: no reason to stop the run
            return
        self._writer.note_pipeline_call(index, {"class": pipeline, "seq": seq, "arguments": text})

    def release(self, submodel: str) -> None:
        """Stop recording what is watched as ``submodel`` if it never ran (a pipeline's component
        swapped out before its first call), so that the name is free for what replaced it."""
        holder = next((h.target for h in self._hooks if h.name == submodel and h.target is not None), None)
        if holder is None or self._ordinals[submodel]:
            return
        for hook in [h for h in self._hooks if h.target is holder]:
            hook.remove()
            self._hooks.remove(hook)
        self._names.pop(submodel, None)
        if submodel in self._described:
            self._described.discard(submodel)
            self._redescribe.add(submodel)
        self._watched.discard(holder)
        self._methods.discard(holder)

    def method_watched_as(self, obj: Any, method: str) -> str | None:
        """The submodel that ``obj.<method>`` is recorded as, if it is watched."""
        return self._methods.get(obj, method)

    def mark_method_watched(self, obj: Any, method: str, submodel: str) -> None:
        self._methods.add(obj, submodel, method)

    def mark_watched(self, obj: Any, submodel: str) -> None:
        self._watched.add(obj, submodel)

    def is_watched(self, obj: Any) -> bool:
        return self._watched.get(obj) is not None

    def unique_name(self, name: str) -> str:
        candidate, n = name, 2
        while candidate in self._names:
            candidate, n = f"{name}#{n}", n + 1
        self._names[candidate] = None
        return candidate

    # -- steps -----------------------------------------------------------------------------
    def step(self, source: str = "explicit") -> None:
        """End the current step: later calls belong to the next one."""
        with self._lock:
            self._step += 1
            first = self._step_source is None
            if first:
                self._step_source = source
        if self._writer is not None:
            if first:
                self._writer.set_attr("step_source", source)
            else:
                self._writer.flush()

    def not_recorded(self, submodel: str, how: str) -> None:
        """Count a call that could not be recorded whole, to say so at the end: ``how`` it ran,
        and what is missing."""
        with self._lock:
            self._unrecorded[(submodel, how)] += 1

    # -- called by hooks -------------------------------------------------------------------
    def _wants(self, submodel: str) -> bool:
        if self._writer is None or self._writer.stopped_reason is not None:
            return False  # not recording, or stopped early (disk full): copy nothing
        if self._include is not None and not self._include.search(submodel):
            return False
        return not (self._exclude is not None and self._exclude.search(submodel))

    def begin_call(self, submodel: str, named: Callable[[], Named]) -> CallRecord | None:
        if not self._wants(submodel) or recording_paused():
            return None
        with self._lock:
            seq, step = self._seq, self._step
            self._seq += 1
            call = self._calls[(submodel, step)]
            self._calls[(submodel, step)] += 1
            ordinal = self._ordinals[submodel]
            self._ordinals[submodel] += 1
        if self._steps is not None and step not in self._steps:
            return None
        try:
            tensors, values = self.capture(named(), at=(submodel, step))
        except Exception as exc:  # never break the user's run over a value we cannot copy
            warnings.warn(
                f"alignkit: could not record the inputs of {submodel} (seq {seq}): {exc}", RuntimeWarning, stacklevel=3
            )
            return None
        record = CallRecord(seq, submodel, step, call, ordinal, inputs=tensors, values=values)
        push_call(record)
        return record

    def end_call(
        self, record: CallRecord | None, named: Callable[[], Named], error: BaseException | None = None
    ) -> None:
        if record is None:
            return
        pop_call(record)
        if error is not None:
            record.error = f"{type(error).__name__}: {error}"
        else:
            try:
                tensors, values = self.capture(named(), at=(record.submodel, record.step))
            except Exception as exc:  # never break the user's run over a value we cannot copy
                tensors, values = [], {}
                record.error = f"alignkit could not record the outputs: {exc}"
            record.outputs = tensors
            record.output_values = values
        self._tensors_kept += len(record.inputs) + len(record.outputs)
        self._layers_kept[record.submodel] += len(record.layers)
        if self._spread is not None:
            self._spread.measure(record)
        if self._against is not None:
            self._against.reduce(record)
        if self._writer is not None:
            self._writer.put(record)

    def capture(
        self, named: Named, *, layers: bool = False, at: tuple[str, int] | None = None
    ) -> tuple[list[Tensor], dict[str, str]]:
        """Take a call's values now: tensors the ``tensors`` filter keeps (layers are filtered
        by module path instead), large host tensors written straight into the dump."""
        writer = self._writer
        keep = self._tensors.search if self._tensors is not None and not layers else None
        return split(named, stage=writer.stage if writer is not None else None, keep=keep, take=self._take(at))

    def _take(self, at: tuple[str, int] | None) -> Callable[[str, Any, Any], Tensor] | None:
        """How a call's tensors are taken (None: whole, as usual): whole and in memory with
        ``against`` (kept as statistics once the call agrees); as statistics and a sample with
        ``mode="stats"``, unless ``full_at`` asks for this call in full. ``at`` is the call's
        (submodel, step); layers ask for the call being recorded."""
        if self._against is not None:
            from alignkit.recording.tensors import capture

            return lambda name, value, stage: capture(name, value)
        if self._mode != "stats":
            return None
        if at is None:
            record = current_call()
            at = (record.submodel, record.step) if record is not None else None
        if at is not None and self._full_at(*at):
            return None
        from alignkit.recording.stats import capture_stats

        return lambda name, value, stage: capture_stats(name, value)

    def _full_at(self, submodel: str, step: int) -> bool:
        return any(
            re.fullmatch(pattern, submodel) and (steps is None or step in steps) for pattern, steps in self._full
        )


def parse_full_at(text: str | None) -> list[tuple[str, set[int] | None]]:
    """``"unet:3-5,8;vae.decode"`` → the submodels (regular expressions) and steps to record in
    full in a statistics recording; a submodel without steps is recorded in full at every step."""
    from alignkit.replaying import parse_steps

    out = []
    for part in filter(None, (text or "").split(";")):
        submodel, _, steps = part.partition(":")
        if not submodel:
            raise UsageError(f"--full-at {part!r}: expected submodel[:steps], e.g. unet:3-5")
        _regex("full_at", submodel)
        out.append((submodel, set(parse_steps(steps)) if steps else None))
    return out


def _ended_by(error: BaseException) -> str:
    """An exception as a run's end is told: ``RuntimeError: CUDA out of memory``."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _regex(option: str, pattern: str | None) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{option} {pattern!r} is not a valid regular expression ({exc})") from exc


def step() -> None:
    """Mark a step boundary in a hand-written loop, for every active recorder."""
    for recorder in list(_ACTIVE):
        recorder.step("explicit")


@contextmanager
def record(
    path: str | os.PathLike,
    *targets: Any,
    label: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    **options: Any,
) -> Iterator[Recorder]:
    """Record every call of ``targets`` (pipelines, modules, sessions, engines) into ``path``.

    ::

        with alignkit.record("dumps/ref.h5", pipe, label="torch-fp32"):
            image = pipe(prompt, num_inference_steps=20)
    """
    recorder = Recorder(path, label=label, include=include, exclude=exclude, **options)
    with recorder:
        for target in targets:
            recorder.watch(target)
        yield recorder
