"""Flatten nested call arguments and results into stable tensor names.

Inputs are bound to the callee's signature, so ``unet(latents, t, encoder_hidden_states=e)``
and ``unet(sample=latents, timestep=t, encoder_hidden_states=e)`` give the same names:
``sample``, ``timestep``, ``encoder_hidden_states``. Nested containers add ``.key`` or
``.index``: ``added_cond_kwargs.text_embeds``. A call whose only argument is a dict (an
engine's feed, ``{"input.1": ...}``) is named by the dict's keys. Outputs: a bare tensor is
``output``, a tuple gives ``output.0``, ``output.1``, a dict or output dataclass its keys.
A transformers KV cache (``DynamicCache``, ``StaticCache``…) gives its tensors per layer under
the names ONNX exports of decoders give them, whatever the argument that carries it is called
(``past_key_values``, transformers 5's ``cache``, a positional argument): ``past_key_values.0.key``,
``past_key_values.0.value``, and for an ``EncoderDecoderCache`` ``past_key_values.0.decoder.key``
(self-attention) and ``past_key_values.0.encoder.key`` (cross-attention). A VAE's latent
distribution gives its parameters: ``latent_dist.parameters``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from alignkit.recording.tensors import Stage, Tensor, capture, describe_value, is_tensor, torch_tensor_type

Named = list[tuple[str, Any]]


def flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Yield (name, leaf) pairs; leaves are tensors or plain values."""
    if is_tensor(value):
        yield prefix, value
    elif value is None or isinstance(value, (bool, str)):  # most keyword arguments: nothing to look into
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
    elif parts := kv_cache_tensors(value):
        base = cache_name(prefix)
        for name, tensor in parts:
            yield _join(base, name), tensor
    elif (parameters := distribution_parameters(value)) is not None:
        yield _join(prefix, "parameters"), parameters
    elif is_kv_cache(value):
        yield cache_name(prefix), value  # an empty cache stays a value ("<DynamicCache>")
    else:
        yield prefix, value


_KV_NAMES = {"keys": "key", "values": "value"}
CACHE_NAME = "past_key_values"


def cache_name(prefix: str) -> str:
    """The name a KV cache is recorded under, whatever carries it: ``past_key_values`` (as
    ONNX exports name it) in place of the argument's own name (transformers 5 passes it as
    ``cache``; a positional ``args.2``), the output's ``past_key_values`` kept as it is."""
    head, dot, _ = prefix.rpartition(".")
    if head and not head.startswith("args") and head != "output":
        return f"{head}{dot}{CACHE_NAME}"
    return CACHE_NAME


def kv_cache_tensors(value: Any) -> list[tuple[str, Any]]:
    """The tensors of a transformers KV cache, named per layer; empty for anything else.

    A cache is neither a container nor a dataclass, and the model updates it in place, so it
    is read through its layers (``layers[i].keys``; ``key_cache[i]`` before transformers
    4.56). Recognised by its class (a subclass of transformers' ``Cache``), without importing
    transformers."""
    if not is_kv_cache(value):
        return []
    if hasattr(value, "self_attention_cache") and hasattr(value, "cross_attention_cache"):
        sides = [
            ("decoder", _cache_layers(value.self_attention_cache)),
            ("encoder", _cache_layers(value.cross_attention_cache)),
        ]
        depth = max(len(layers) for _, layers in sides)
        return [
            (f"{i}.{side}.{kind}", tensor)
            for i in range(depth)
            for side, layers in sides
            if i < len(layers)
            for kind, tensor in layers[i].items()
        ]
    return [(f"{i}.{kind}", tensor) for i, layer in enumerate(_cache_layers(value)) for kind, tensor in layer.items()]


def is_kv_cache(value: Any) -> bool:
    cls = type(value)
    return cls.__module__.startswith("transformers") and any(c.__name__ == "Cache" for c in cls.__mro__)


def _cache_layers(cache: Any) -> list[dict[str, Any]]:
    """Each layer's tensors (keys, values, and a linear-attention layer's states), by kind."""
    tensor_type = torch_tensor_type()
    if tensor_type is None:  # (transformers' caches hold torch tensors)
        return []
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        return [
            {
                _KV_NAMES.get(k, k): v
                for k, v in getattr(layer, "__dict__", {}).items()
                if not k.startswith("_") and isinstance(v, tensor_type)
            }
            for layer in layers
        ]
    keys, values = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if isinstance(keys, list) and isinstance(values, list):
        return [{"key": k, "value": v} for k, v in zip(keys, values)]
    return []


def distribution_parameters(value: Any) -> Any:
    """The tensor behind a diffusers latent distribution (``vae.encode(x).latent_dist``, a
    ``DiagonalGaussianDistribution``): the encoder's output itself, mean and log-variance
    along the channels, as an export's ``latent_parameters`` is. None for anything else."""
    if not type(value).__module__.startswith("diffusers") or not type(value).__name__.endswith("Distribution"):
        return None
    parameters = getattr(value, "parameters", None)
    return parameters if is_tensor(parameters) else None


def _holds_tensor(value: Any) -> bool:
    if is_tensor(value):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return (
        (dataclasses.is_dataclass(value) and not isinstance(value, type))
        or bool(kv_cache_tensors(value))
        or distribution_parameters(value) is not None
    )


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


def split(
    named: Named,
    *,
    stage: Stage | None = None,
    keep: Callable[[str], Any] | None = None,
    take: Callable[[str, Any, Stage | None], Tensor] | None = None,
) -> tuple[list[Tensor], dict[str, str]]:
    """Copy out every tensor leaf (only those whose name ``keep`` accepts, when given; large
    ones written straight into the dump through ``stage``); describe every other leaf as JSON.
    ``take`` takes a tensor instead of copying it whole (``record --mode stats``)."""
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
                    tensors.append((take or capture)(name, leaf, stage))
                except (
                    RuntimeError,
                    TypeError,
                    ValueError,
                ) as exc:  # e.g. a quantized torch tensor: keep the rest of the call
                    values[name] = describe_value(f"<{type(leaf).__name__} not recorded: {exc}>")
    return tensors, values


def _unique(name: str, seen: set[str]) -> str:
    candidate, n = name, 2
    while candidate in seen:
        candidate, n = f"{name}#{n}", n + 1
    seen.add(candidate)
    return candidate
