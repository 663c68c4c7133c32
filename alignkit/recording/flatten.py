"""Flatten nested call arguments and results into stable tensor names.

Inputs are bound to the callee's signature, so ``unet(latents, t, encoder_hidden_states=e)``
and ``unet(sample=latents, timestep=t, encoder_hidden_states=e)`` give the same names:
``sample``, ``timestep``, ``encoder_hidden_states``. Nested containers add ``.key`` or
``.index``: ``added_cond_kwargs.text_embeds``. A call whose only argument is a dict (an
engine's feed, ``{"input.1": ...}``) is named by the dict's keys. Outputs: a bare tensor is
``output``, a tuple gives ``output.0``, ``output.1``, a dict or output dataclass its keys.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from alignkit.recording.tensors import Stage, Tensor, capture, describe_value, is_tensor

Named = list[tuple[str, Any]]


def flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Yield (name, leaf) pairs; leaves are tensors or plain values."""
    if is_tensor(value):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from flatten(item, _join(prefix, str(key)))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from flatten(getattr(value, field.name), _join(prefix, field.name))
    elif isinstance(value, (list, tuple)) and any(_holds_tensor(v) for v in value):
        for i, item in enumerate(value):
            yield from flatten(item, _join(prefix, str(i)))
    else:
        yield prefix, value


def _holds_tensor(value: Any) -> bool:
    if is_tensor(value):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def signature_binder(fn: Callable[..., Any]) -> Callable[[tuple, dict], Named]:
    """Make a function that names a call's arguments after ``fn``'s parameters."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None

    def bind(args: tuple, kwargs: dict) -> Named:
        if sig is None:
            return [(f"args.{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return [(f"args.{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        named: Named = []
        for pname, value in bound.arguments.items():
            kind = sig.parameters[pname].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.extend(value.items())
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                named.extend((f"{pname}.{i}", v) for i, v in enumerate(value))
            else:
                named.append((pname, value))
        if len(named) == 1 and isinstance(named[0][1], Mapping):
            return list(named[0][1].items())  # an engine's feed dict
        return named

    return bind


def name_outputs(result: Any) -> Named:
    """Name a callee's result: ``output``, ``output.N``, or the keys of a dict/dataclass."""
    if result is None:
        return []
    if isinstance(result, Mapping) or (dataclasses.is_dataclass(result) and not isinstance(result, type)):
        return [("", result)]
    return [("output", result)]


def split(named: Named, *, stage: Stage | None = None, keep: Callable[[str], Any] | None = None) -> tuple[list[Tensor], dict[str, str]]:
    """Copy out every tensor leaf (only those whose name ``keep`` accepts, when given; large
    ones written straight into the dump through ``stage``); describe every other leaf as JSON."""
    tensors: list[Tensor] = []
    values: dict[str, str] = {}
    seen: set[str] = set()
    for top, value in named:
        for name, leaf in flatten(value, top):
            name = _unique(name or "output", seen)
            if not is_tensor(leaf):
                values[name] = describe_value(leaf)
            elif keep is None or keep(name):
                try:
                    tensors.append(capture(name, leaf, stage))
                except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a quantized torch tensor: keep the rest of the call
                    values[name] = describe_value(f"<{type(leaf).__name__} not recorded: {exc}>")
    return tensors, values


def _unique(name: str, seen: set[str]) -> str:
    candidate, n = name, 2
    while candidate in seen:
        candidate, n = f"{name}#{n}", n + 1
    seen.add(candidate)
    return candidate
