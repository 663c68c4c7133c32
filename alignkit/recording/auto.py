"""Zero code change: record what an unmodified script calls (``alignkit record -- script.py``).

Diffusers pipelines are watched when they are called, a diffusers scheduler that a hand-written
loop calls itself on its first ``step``, and ONNX Runtime sessions on each run (``run``,
``run_with_iobinding``, ``run_with_ort_values``); NNCF's calibration runs are left out; each patch is
installed when the script imports its library (nothing is imported ahead of the script).
``--hook module:Qualified.name`` wraps any other engine, and ``--step-on module:qualname``
makes a function or method the step boundary.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from alignkit.errors import UsageError
from alignkit.recording import openvino
from alignkit.recording.calibration import PausedWhileCalibrating
from alignkit.recording.hooks import ClassHook, FunctionHook, Hook, Watch
from alignkit.recording.ort_runs import PREBOUND, RUN_METHODS, BindingMemory, session_runs
from alignkit.recording.recorder import Recorder
from alignkit.recording.seam import recording_paused
from alignkit.recording.targets import (
    ObjectNames,
    is_torch_module,
    is_torch_module_class,
    name_from_path,
    ort_session_name,
    path_of,
)
from alignkit.recording.transformers import watch_generating_model


class AutoWatch:
    """Install and remove the process-wide patches for one recording."""

    def __init__(self, recorder: Recorder, hooks: list[str] = (), step_on: list[str] = ()):
        self.recorder = recorder
        self._patches: list[Hook] = []
        self._finder = _PostImportFinder(
            {
                "diffusers.pipelines.pipeline_utils": self._patch_pipelines,
                "diffusers.schedulers.scheduling_utils": self._patch_schedulers,
                "onnxruntime": self._patch_onnxruntime,
                "openvino": self._patch_openvino,
                "transformers.generation.utils": self._patch_generate,
                "nncf": self._patch_calibration,
            }
        )
        self._hook_specs, self._step_specs = list(hooks), list(step_on)
        self._instance_names = ObjectNames()
        self._running_pipelines = threading.local()  # depth: how many watched pipeline calls this thread is in

    def install(self) -> None:
        for spec in self._hook_specs:
            self._patch_target(spec, record=True)
        for spec in self._step_specs:
            self._patch_target(spec, record=False, after=lambda: self.recorder.step("hook"))
        sys.meta_path.insert(0, self._finder)
        for name, patch in self._finder.callbacks.items():
            if name in sys.modules:
                patch(sys.modules[name])

    def remove(self) -> None:
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        for patch in reversed(self._patches):
            patch.remove()
        self._patches.clear()

    # -- diffusers -------------------------------------------------------------------------
    def _patch_pipelines(self, module: Any) -> None:
        """Watch a pipeline when it is called."""
        recorder, running = self.recorder, self._running_pipelines

        def around(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def __call__(pipe: Any, *args: Any, **kwargs: Any) -> Any:
                hooked = recorder.method_watched_as(pipe, "__call__") is not None
                try:
                    recorder.watch(pipe)  # again on each call: a component may have been swapped since
                except UsageError:
                    raise
                except Exception as exc:  # never break the user's run over what alignkit cannot watch
                    warnings.warn(f"alignkit: could not watch {type(pipe).__name__}: {exc}", stacklevel=2)
                if not hooked and recorder.method_watched_as(pipe, "__call__") is not None:
                    return pipe(*args, **kwargs)  # through the hook just installed, which notes the arguments
                running.depth = getattr(running, "depth", 0) + 1
                try:
                    return original(pipe, *args, **kwargs)
                finally:
                    running.depth -= 1

            return __call__

        self._patches.append(_wrap_subclasses(module.DiffusionPipeline, "__call__", around))
        self._patches.append(_wrap_subclasses(module.DiffusionPipeline, "__init__", self._watch_when_made))

    def _watch_when_made(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """Watch a pipeline once it is made: its components may run before its first call (the
        text encoder computing ``prompt_embeds``), or in a loop that never calls it."""
        recorder, making = self.recorder, threading.local()

        @functools.wraps(original)
        def __init__(pipe: Any, *args: Any, **kwargs: Any) -> None:
            making.depth = getattr(making, "depth", 0) + 1
            try:
                original(pipe, *args, **kwargs)
            finally:
                making.depth -= 1
            if making.depth == 0:  # the outermost __init__ has returned: the pipeline is whole
                try:
                    recorder.watch(pipe)
                except Exception as exc:  # a pipeline that cannot be watched yet is watched when called
                    warnings.warn(
                        f"alignkit: could not watch {type(pipe).__name__} when it was made: {exc}", stacklevel=2
                    )

        return __init__

    def _patch_schedulers(self, module: Any) -> None:
        """Watch a scheduler that a hand-written loop calls itself, on its first ``step``:
        the loop gets its steps and the glue. A pipeline's own is watched with the pipeline;
        any other that a pipeline steps inside its call (LTX-2's copy of its scheduler, for
        the audio) is its business, and would count the steps twice."""
        recorder, running = self.recorder, self._running_pipelines

        def around(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def step(scheduler: Any, *args: Any, **kwargs: Any) -> Any:
                if not getattr(running, "depth", 0) and not recorder.is_watched(scheduler):
                    recorder.watch(scheduler)
                    if recorder.is_watched(scheduler):
                        return scheduler.step(*args, **kwargs)  # through the hook just installed
                return original(scheduler, *args, **kwargs)

            return step

        self._patches.append(_wrap_subclasses(module.SchedulerMixin, "step", around))

    # -- onnxruntime -----------------------------------------------------------------------
    def _patch_onnxruntime(self, module: Any) -> None:
        """Record every session that no watched pipeline holds, each way it runs, under a name
        from its model file."""
        cls, recorder, names = module.InferenceSession, self.recorder, ObjectNames()
        watches: dict[str, dict[str, Watch]] = {}  # each session's name: how each way it runs is recorded

        def watches_of(session: Any) -> dict[str, Watch]:
            name = names.get(session)
            if name is None:  # first sight (its name may be a freed session's: the watches are made anew)
                name = names.name_for(session, ort_session_name(session), recorder.unique_name)
                recorder.describe(name, session)
                prebound = functools.partial(recorder.not_recorded, name, PREBOUND)
                layers = recorder.session_layers(session, name)
                watches[name] = {
                    method: Watch(recorder, name, bind, outputs, layers=layers if method == "run" else None)
                    for method, (bind, outputs) in session_runs(session, prebound).items()
                }
            return watches[name]

        def recorded(method: str) -> Callable[..., Any]:
            original = getattr(cls, method)

            @functools.wraps(original)
            def run(session: Any, *args: Any, **kwargs: Any) -> Any:
                if recorder.is_watched(session) or recording_paused():  # a watched component: under its name
                    return original(session, *args, **kwargs)
                return watches_of(session)[method].call(functools.partial(original, session), args, kwargs)

            return run

        for method in RUN_METHODS:
            if callable(getattr(cls, method, None)):
                self._patches.append(_patch_method(cls, method, recorded(method)))
        self._patches.append(BindingMemory())

    # -- transformers ---------------------------------------------------------------------
    def _patch_generate(self, module: Any) -> None:
        """Watch the model that ``generate`` drives (a transformers model, an optimum causal LM)."""
        recorder = self.recorder

        def around(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def generate(model: Any, *args: Any, **kwargs: Any) -> Any:
                watch_generating_model(recorder, model)
                return original(model, *args, **kwargs)

            return generate

        self._patches.append(_wrap_subclasses(module.GenerationMixin, "generate", around, base_too=True))

    # -- openvino ---------------------------------------------------------------------------
    def _patch_openvino(self, module: Any) -> None:
        """Record every compiled model and infer request, named after what the script calls it
        (``self.unet = core.compile_model(...)``), else after the model."""
        names, recorder = ObjectNames(), self.recorder

        def name(engine: Any) -> str:
            known = names.get(engine)
            if known is None:
                base = name_in_caller(engine) or openvino.model_name(engine)
                known = names.name_for(engine, base, recorder.unique_name)
                openvino.introduce(recorder, engine, known)
            return known

        recorder.record_openvino(name)

    # -- quantizers ---------------------------------------------------------------------------
    def _patch_calibration(self, module: Any) -> None:
        """Leave NNCF's calibration runs out of the recording."""
        self._patches.append(PausedWhileCalibrating())

    # -- --hook and --step-on --------------------------------------------------------------
    def _patch_target(self, spec: str, *, record: bool, after: Callable[[], None] | None = None) -> None:
        owner, attr, is_class = resolve(spec)
        if is_class:
            self._patches.append(ClassHook(self.recorder, owner, attr, self._instance_name, after=after, record=record))
        else:
            if record:
                self.recorder.describe(attr, getattr(owner, attr))
            self._patches.append(FunctionHook(self.recorder, owner, attr, attr, after=after, record=record))

    def _instance_name(self, obj: Any) -> str:
        """The submodel an instance's calls are recorded as (asked on every call: the name
        is worked out on first sight only)."""
        name = self._instance_names.get(obj)
        if name is None:
            path = path_of(obj)
            given = name_from_path(path) if path else (name_in_caller(obj) or type(obj).__name__)
            name = self._instance_names.name_for(obj, given, self.recorder.unique_name)
            self.recorder.describe(name, obj)
            if is_torch_module(obj):
                self.recorder.watch_layers(obj, name)
        return name


_GENERIC_NAMES = {
    "self",
    "engine",
    "model",
    "module",
    "net",
    "session",
    "m",
    "fn",
    "func",
    "request",
    "infer_request",
    "compiled",
    "compiled_model",
    "core",
}


def name_in_caller(obj: Any) -> str | None:
    """What the code that calls ``obj`` calls it: the attribute of the calling object that
    holds it (``self.unet(...)``, ``pipe.unet = EngineOV(...)``), else a variable of the calling
    frame bound to it (``controlnet = EngineOV(...)``). An engine that replaces a pipeline's
    component is then named after that component, not after its class."""
    frame = sys._getframe(1)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while frame is not None:
        if (
            not os.path.abspath(frame.f_code.co_filename).startswith(package)
            and "functools" not in frame.f_code.co_filename
        ):
            local = frame.f_locals
            owner = local.get("self")
            for attr, value in vars(owner).items() if hasattr(owner, "__dict__") else ():
                if value is obj and attr not in _GENERIC_NAMES and not attr.startswith("_"):
                    return attr
            for var, value in local.items():
                if value is obj and var not in _GENERIC_NAMES:
                    return var
        frame = frame.f_back
    return None


def _patch_method(cls: type, name: str, replacement: Callable[..., Any]) -> Hook:
    """Set ``cls.<name>``; the hook returned puts back what was there."""
    had_own, original = name in cls.__dict__, cls.__dict__.get(name)
    setattr(cls, name, replacement)
    return _Restore(lambda: setattr(cls, name, original) if had_own else delattr(cls, name))


def resolve(spec: str) -> tuple[Any, str, bool]:
    """``module:Qualified.name`` → (owner, attribute, owner is a class)."""
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise UsageError(f"{spec!r}: expected module:Qualified.name, e.g. engine:EngineOV.__call__")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{spec!r}: cannot import {module_name!r} ({exc})") from exc
    parts = qualname.split(".")
    for part in parts[:-1]:
        if not hasattr(owner, part):
            raise UsageError(f"{spec!r}: {module_name} has no {qualname!r}")
        owner = getattr(owner, part)
    target = getattr(owner, parts[-1], None)
    if not callable(target):
        raise UsageError(f"{spec!r}: {module_name} has no callable {qualname!r}")
    if isinstance(target, type):  # a class named alone: its instances' calls, never its constructor
        return target, _instance_method(spec, target), True
    return owner, parts[-1], isinstance(owner, type)


def _instance_method(spec: str, cls: type) -> str:
    """The method that runs when an instance of ``cls`` is called: a torch module's
    ``forward`` (its parameters name the inputs), else ``__call__``."""
    if is_torch_module_class(cls):
        return "forward"
    if any("__call__" in c.__dict__ for c in cls.__mro__[:-1]):
        return "__call__"
    raise UsageError(
        f"{spec!r}: {cls.__qualname__} instances are not callable; name the method that runs the model, e.g. "
        f"{spec}.infer"
    )


class _Restore(Hook):
    def __init__(self, undo: Callable[[], None]):
        self.name, self._undo = "restore", undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def _wrap_subclasses(
    base: type, method: str, around: Callable[[Callable[..., Any]], Callable[..., Any]], *, base_too: bool = False
) -> Hook:
    """Replace ``method`` with ``around(method)`` on every subclass of ``base`` that defines
    it, now and as later subclasses are created (diffusers imports its classes lazily);
    returns the hook that puts everything back."""
    wrapped: list[tuple[type, Any]] = []

    def wrap(cls: type) -> None:
        original = cls.__dict__.get(method)
        if original is None or getattr(original, "__alignkit__", False):
            return
        replacement = around(original)
        replacement.__alignkit__ = True  # type: ignore[attr-defined]
        setattr(cls, method, replacement)
        wrapped.append((cls, original))

    def subclasses(cls: type) -> list[type]:
        out = []
        for sub in cls.__subclasses__():
            out += [sub, *subclasses(sub)]
        return out

    for cls in [base] * base_too + subclasses(base):
        wrap(cls)
    had_hook = "__init_subclass__" in base.__dict__
    previous = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls: type, **kw: Any) -> None:
        if previous is not None:  # another patch's hook (``__call__`` wrapped, then ``__init__``): chained
            previous.__get__(None, cls)(**kw)
        else:
            super(base, cls).__init_subclass__(**kw)
        wrap(cls)

    base.__init_subclass__ = classmethod(__init_subclass__)

    def undo() -> None:
        for cls, original in wrapped:
            setattr(cls, method, original)
        if had_hook:
            base.__init_subclass__ = previous
        else:
            del base.__init_subclass__

    return _Restore(undo)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Run a callback right after a named module has been imported."""

    def __init__(self, callbacks: dict[str, Callable[[Any], None]]):
        self.callbacks = callbacks
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.callbacks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CallbackLoader(spec.loader, self.callbacks[fullname])
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, callback: Callable[[Any], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
