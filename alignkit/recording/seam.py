"""The one interface between the recorder and the adapters that watch a framework for it.

Hooks (``hooks.py``) and each framework's adapter (``diffusers.py``, ``optimum.py``,
``openvino.py``, ``transformers.py``, ``ort_runs.py``, ``layers.py``) see the recorder only as
a :class:`CallLog`, the way diffusers' hook registry hands its hooks a small state object:
a call begins (its inputs taken), ends (its outputs taken), a step ends, a submodel is named and
described, an object is marked as watched. Nothing here imports the recorder, so the adapters
do not either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from alignkit.recording.targets import reference

if TYPE_CHECKING:
    from alignkit.recording.flatten import Named
    from alignkit.storage.records import CallRecord, Tensor


class Hook:
    """A named, removable hook; ``remove`` may be called more than once."""

    name: str
    _target: Callable[[], Any] | None = None

    @property
    def target(self) -> Any:
        """The object whose calls it records, where it is one object (held weakly: a freed
        model's hook keeps nothing alive)."""
        return self._target() if self._target is not None else None

    def _records(self, obj: Any) -> None:
        self._target = reference(obj)

    def remove(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class CallLog(Protocol):
    """What an adapter may ask of the recorder."""

    def begin_call(self, submodel: str, named: Callable[[], Named]) -> CallRecord | None:
        """A call of ``submodel`` starts: take its inputs now; None when it is not recorded."""

    def end_call(
        self, record: CallRecord | None, named: Callable[[], Named], error: BaseException | None = None
    ) -> None:
        """The call returned (its outputs taken now) or raised ``error``."""

    def capture(
        self, named: Named, *, layers: bool = False, at: tuple[str, int] | None = None
    ) -> tuple[list[Tensor], dict[str, str]]:
        """Take values now: the tensors (filtered), and every other value described."""

    def step(self, source: str = "explicit") -> None:
        """End the current step."""

    def watch(self, obj: Any, name: str | None = None, *, method: str | None = None) -> Any:
        """Watch another object (a component found inside the one being watched)."""

    def wants_layers(self, submodel: str) -> bool:
        """Whether ``--layers`` asked for ``submodel``'s layers."""

    def watch_layers(self, module: Any, submodel: str) -> None:
        """Record ``module``'s layers under each call of ``submodel``, if ``--layers`` asked."""

    def watch_method(self, obj: Any, method: str, name: str, *, after: Callable[[], None] | None = None) -> str:
        """Watch ``obj.<method>`` as the submodel ``name``; returns the name given."""

    def add_hook(self, obj: Any, hook: Hook, *, whole: bool = True) -> None:
        """Keep ``hook`` until recording stops (``obj`` is then watched, if ``whole``)."""

    def is_watched(self, obj: Any) -> bool: ...

    def mark_watched(self, obj: Any, submodel: str) -> None:
        """Record nothing more for ``obj`` itself: it is recorded as ``submodel`` elsewhere."""

    def method_watched_as(self, obj: Any, method: str) -> str | None: ...

    def release(self, submodel: str) -> None:
        """Stop recording what is watched as ``submodel`` if it never ran; the name is free again."""

    def mark_method_watched(self, obj: Any, method: str, submodel: str) -> None: ...

    def unique_name(self, name: str) -> str:
        """``name``, or ``name#2``… when it is taken."""

    def describe(self, submodel: str, obj: Any, **extra: str) -> None:
        """Keep what ``submodel`` is (class, config, compute precision) in the dump."""

    def not_recorded(self, submodel: str, how: str) -> None:
        """Count a call that ran where it cannot be recorded whole, to say so at the end."""

    def note_pipeline_call(self, pipeline: str, arguments: dict[str, Any]) -> None: ...

    def note_filter(self, message: str) -> None:
        """A filter or option that could not do what it was asked: warned at the end, kept in the dump."""


_CURRENT = threading.local()


@contextmanager
def not_recording() -> Iterator[None]:
    """Record no call on this thread while the block runs: a converter (``openvino.convert_model``)
    runs the model once or traces it, and those calls are not the pipeline's."""
    _CURRENT.paused = getattr(_CURRENT, "paused", 0) + 1
    try:
        yield
    finally:
        _CURRENT.paused -= 1


def recording_paused() -> bool:
    return bool(getattr(_CURRENT, "paused", 0))


def push_call(record: CallRecord) -> None:
    _CURRENT.__dict__.setdefault("stack", []).append(record)


def pop_call(record: CallRecord) -> None:
    stack = _CURRENT.__dict__.get("stack", [])
    if record in stack:
        stack.remove(record)


def current_call() -> CallRecord | None:
    """The innermost call being recorded on this thread (layer hooks attach to it)."""
    stack = _CURRENT.__dict__.get("stack")
    return stack[-1] if stack else None
