"""The ways a callable is watched. Each hook is named, removable and leaves no trace.

- :class:`MethodHook` shadows one method on one object (``vae.decode``, ``session.run``,
  ``scheduler.step``) with an instance attribute that keeps the method's signature.
- :class:`CallHook` gives an engine object with ``__call__`` a private subclass for as long as
  it is watched (special methods are looked up on the type, not the instance).
- :class:`ModuleHook` uses torch's own forward pre/post hooks.
- :func:`wrap_function` returns a recording wrapper for a plain function.
- :class:`ClassHook` patches a method on a class (``--hook module:Engine.__call__``).

All but the torch hooks record each call through a :class:`Watch`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from alignkit.errors import UsageError
from alignkit.recording.flatten import Named, name_outputs, signature_binder
from alignkit.recording.seam import Hook
from alignkit.recording.targets import torch_is_tracing, uncompiled

if TYPE_CHECKING:
    from alignkit.recording.seam import CallLog

Binder = Callable[[tuple, dict], Named]
OutputNamer = Callable[[Any, tuple, dict], Named]


def default_outputs(result: Any, args: tuple, kwargs: dict) -> Named:
    return name_outputs(result)


@dataclass(frozen=True)
class Watch:
    """How the calls of one watched callable are recorded.

    ``bind`` names the arguments and ``outputs`` the result. ``layers``, when given, computes
    named layer outputs for the same arguments (an ONNX model's intermediate outputs) to store
    under the call. ``after`` runs once a call has returned (a step boundary); with
    ``record=False`` it is all that happens (``--step-on``).
    """

    recorder: CallLog
    submodel: str
    bind: Binder
    outputs: OutputNamer = default_outputs
    after: Callable[[], None] | None = None
    layers: Binder | None = None
    record: bool = True

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Call ``fn`` and record its inputs (copied before) and outputs (copied after)."""
        if not self.record:
            result = fn(*args, **kwargs)
            if self.after is not None:
                self.after()
            return result
        recorder = self.recorder
        pending = recorder.begin_call(self.submodel, lambda: self.bind(args, kwargs))
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            recorder.end_call(pending, lambda: [], error=exc)
            raise
        if self.layers is not None and pending is not None:
            pending.layers.extend(recorder.capture(self.layers(args, kwargs), layers=True)[0])
        recorder.end_call(pending, lambda: self.outputs(result, args, kwargs))
        if self.after is not None:
            self.after()
        return result


class MethodHook(Hook):
    """Record every call of ``obj.<method>`` by shadowing it with an instance attribute.

    Two recorders may watch one object and stop in either order: a hook removed while another
    is installed over it turns inert (it only passes calls on), and the one over it, when it
    is removed in turn, restores what was there before both."""

    def __init__(
        self,
        recorder: CallLog,
        obj: Any,
        method: str,
        name: str,
        *,
        bind: Binder | None = None,
        outputs: OutputNamer = default_outputs,
        after: Callable[[], None] | None = None,
        layers: Binder | None = None,
        record: bool = True,
    ):
        self.name, self._obj, self._method = name, obj, method
        self._records(obj)
        self._had_own = method in getattr(obj, "__dict__", {})
        self._own = obj.__dict__.get(method) if self._had_own else None
        self.removed = False
        original = getattr(obj, method)

        watch = Watch(recorder, name, bind or signature_binder(original), outputs, after, layers, record)
        self._wrapper = _Shadow(self, obj, watch, original)
        object.__setattr__(obj, method, self._wrapper)

    def remove(self) -> None:
        if self._obj is None:
            return
        self.removed = True
        if self._obj.__dict__.get(self._method) is self._wrapper:  # else another hook is over this one
            had_own, own = self._had_own, self._own
            while had_own and getattr(getattr(own, "__alignkit_hook__", None), "removed", False):
                below = own.__alignkit_hook__
                had_own, own = below._had_own, below._own
            if had_own:
                object.__setattr__(self._obj, self._method, own)
            else:
                try:
                    object.__delattr__(self._obj, self._method)
                except AttributeError:
                    pass
        self._obj = None


class _Shadow:
    """The instance attribute that stands in for a watched method.

    A deep copy of the object (``copy.deepcopy(self.scheduler)``: LTX-2's pipelines make
    their audio scheduler so) copies its ``__dict__``, and with it whatever stands in there.
    A plain function would go on running the original object's method, so that stepping the
    copy stepped the original; this one gives the copy its own method back, unwatched."""

    def __init__(self, hook: MethodHook, obj: Any, watch: Watch, method: Callable[..., Any]):
        functools.update_wrapper(
            self, method
        )  # the method's name, doc and signature (this first: it copies the method's __dict__)
        self.__alignkit_hook__, self._obj, self._watch, self._original = hook, obj, watch, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.__alignkit_hook__.removed:  # another hook over this one is still installed: pass calls on
            return self._original(*args, **kwargs)
        return self._watch.call(self._original, args, kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        copied = memo.get(id(self._obj))
        if copied is None:  # copied on its own, not as part of its object
            return self
        hook = self.__alignkit_hook__
        if hook._had_own:  # what it stands over was the object's own: copy that
            return copy.deepcopy(hook._own, memo)
        return inspect.getattr_static(type(copied), hook._method).__get__(copied, type(copied))


class CallHook(Hook):
    """Record ``obj(...)`` for an engine object by swapping in a private subclass (out-of-order
    removal as for :class:`MethodHook`). ``around``, when given, is called instead of
    recording a call, as ``around(call, args, kwargs)`` (a pipeline notes its arguments)."""

    def __init__(
        self,
        recorder: CallLog,
        obj: Any,
        name: str,
        *,
        around: Callable[[Callable[..., Any], tuple, dict], Any] | None = None,
    ):
        self.name, self._obj, self._cls = name, obj, type(obj)
        self._records(obj)
        self.removed = False
        original_call = self._cls.__call__
        if around is None:
            watch = Watch(recorder, name, signature_binder(functools.partial(original_call, obj)))
            around = watch.call

        @functools.wraps(original_call)
        def __call__(this: Any, *args: Any, **kwargs: Any) -> Any:
            if self.removed:
                return original_call(this, *args, **kwargs)
            return around(functools.partial(original_call, this), args, kwargs)

        namespace = {
            "__call__": __call__,
            "__module__": self._cls.__module__,
            "__qualname__": self._cls.__qualname__,
            "__alignkit_hook__": self,
        }
        self._subclass = type(self._cls.__name__, (self._cls,), namespace)
        obj.__class__ = self._subclass

    def remove(self) -> None:
        if self._obj is None:
            return
        self.removed = True
        if type(self._obj) is self._subclass:  # else another hook's subclass is over this one
            cls = self._cls
            while getattr(cls.__dict__.get("__alignkit_hook__"), "removed", False):
                cls = cls.__dict__["__alignkit_hook__"]._cls
            self._obj.__class__ = cls
        self._obj = None


class ModuleHook(Hook):
    """Record a ``torch.nn.Module``'s calls with torch's forward pre/post hooks.

    A deep copy of the module copies its hooks too, which torch cannot remove from the copy:
    there they do nothing (the copy is another model, not the watched one)."""

    def __init__(self, recorder: CallLog, module: Any, name: str):
        self.name = name
        self._records(module)
        bind = signature_binder(uncompiled(module).forward)
        local = threading.local()

        def pre(mod: Any, args: tuple, kwargs: dict) -> None:
            if mod is not module:
                return
            stack = local.__dict__.setdefault("stack", [])
            stack.append(None if torch_is_tracing() else recorder.begin_call(name, lambda: bind(args, kwargs)))

        def post(mod: Any, args: tuple, kwargs: dict, result: Any) -> None:
            if mod is not module:
                return
            stack = local.__dict__.get("stack") or [None]
            raised = sys.exc_info()[1] if result is None else None  # always_call runs it on errors
            recorder.end_call(stack.pop(), lambda: name_outputs(result), error=raised)

        self._handles = [
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ClassHook(Hook):
    """Record calls of a method defined on a class, for every instance (``--hook``)."""

    def __init__(
        self,
        recorder: CallLog,
        owner: type,
        method: str,
        namer: Callable[[Any], str],
        *,
        after: Callable[[], None] | None = None,
        record: bool = True,
    ):
        self.name = f"{owner.__qualname__}.{method}"
        self._owner, self._method = owner, method
        self._had_own = method in owner.__dict__
        self._own = owner.__dict__.get(method)
        original = getattr(owner, method)
        watch = Watch(recorder, "", _method_binder(original), after=after, record=record)
        by_name: dict[str, Watch] = {}  # the watch of each instance name

        @functools.wraps(original)
        def wrapper(this: Any, *args: Any, **kwargs: Any) -> Any:
            if not record:
                return watch.call(functools.partial(original, this), args, kwargs)
            if recorder.is_watched(this):  # watched itself (a pipeline's component): recorded there
                return original(this, *args, **kwargs)
            name = namer(this)
            named = by_name.get(name) or by_name.setdefault(name, replace(watch, submodel=name))
            return named.call(functools.partial(original, this), args, kwargs)

        try:
            setattr(owner, method, wrapper)
        except TypeError as exc:  # a built-in class: its methods cannot be replaced
            raise UsageError(
                f"cannot hook {owner.__qualname__}.{method}: {exc}; hook the Python function or class that calls it"
            ) from exc

    def remove(self) -> None:
        if self._owner is None:
            return
        if self._had_own:
            setattr(self._owner, self._method, self._own)
        else:
            delattr(self._owner, self._method)
        self._owner = None


class FunctionHook(Hook):
    """Record calls of a module-level function by replacing the module's attribute."""

    def __init__(
        self,
        recorder: CallLog,
        module: Any,
        attr: str,
        name: str,
        *,
        after: Callable[[], None] | None = None,
        record: bool = True,
    ):
        self.name, self._module, self._attr = name, module, attr
        self._original = getattr(module, attr)
        wrapped = wrap_function(recorder, self._original, name, after=after, record=record)
        setattr(module, attr, wrapped)

    def remove(self) -> None:
        if self._module is not None:
            setattr(self._module, self._attr, self._original)
            self._module = None


def wrap_function(
    recorder: CallLog,
    fn: Callable[..., Any],
    name: str,
    *,
    after: Callable[[], None] | None = None,
    record: bool = True,
) -> Callable[..., Any]:
    """A wrapper of ``fn`` that records each call under ``name``."""
    watch = Watch(recorder, name, signature_binder(fn), after=after, record=record)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return watch.call(fn, args, kwargs)

    return wrapper


def _method_binder(method: Callable[..., Any]) -> Binder:
    """Bind arguments to an unbound method's parameters, leaving ``self`` out."""
    try:
        params = list(inspect.signature(method).parameters.values())[1:]
        sig = inspect.Signature(params)
    except (TypeError, ValueError):
        return signature_binder(method)

    def stub(*args: Any, **kwargs: Any) -> None: ...

    stub.__signature__ = sig  # type: ignore[attr-defined]
    return signature_binder(stub)
