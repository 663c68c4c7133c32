import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.recording.flatten import flatten, name_outputs, signature_binder, split


def unet(sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
    pass


def test_positional_and_keyword_calls_get_the_same_names():
    bind = signature_binder(unet)
    a, t, e = np.zeros(2), np.int64(3), np.ones(3)
    positional = bind((a, t), {"encoder_hidden_states": e})
    keyword = bind((), {"sample": a, "timestep": t, "encoder_hidden_states": e})
    assert [n for n, _ in positional] == [n for n, _ in keyword] == ["sample", "timestep", "encoder_hidden_states"]


def test_var_keyword_arguments_are_named_by_their_keys():
    named = signature_binder(unet)((np.zeros(1), 1), {"added_cond_kwargs": {"text_embeds": np.ones(2)}})
    tensors, values = split(named)
    assert [t.name for t in tensors] == ["sample", "timestep", "added_cond_kwargs.text_embeds"]


def test_a_sole_dict_argument_is_an_engine_feed():
    def engine(args):
        pass

    named = signature_binder(engine)(({"input.1": np.zeros(2), "timesteps.1": np.zeros(1)},), {})
    assert [n for n, _ in named] == ["input.1", "timesteps.1"]


@dataclasses.dataclass
class Output:
    sample: np.ndarray
    extra: object = None


def test_outputs_are_named_by_shape_of_the_result():
    assert [t.name for t in split(name_outputs(np.zeros(2)))[0]] == ["output"]
    assert [t.name for t in split(name_outputs((np.zeros(2), np.ones(1))))[0]] == ["output.0", "output.1"]
    assert [t.name for t in split(name_outputs({"y": np.zeros(2)}))[0]] == ["y"]
    tensors, values = split(name_outputs(Output(np.zeros(2))))
    assert [t.name for t in tensors] == ["sample"] and values == {"extra": "null"}


def test_diffusers_and_transformers_outputs_are_named_by_their_fields():
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    unet_out = UNet2DConditionOutput(sample=torch.zeros(1, 4, 8, 8))
    text_out = BaseModelOutputWithPooling(
        last_hidden_state=torch.ones(1, 7, 32),
        pooler_output=torch.ones(1, 32),
        hidden_states=(torch.zeros(1, 7, 32), torch.ones(1, 7, 32)),
    )
    assert [t.name for t in split(name_outputs(unet_out))[0]] == ["sample"]
    tensors, values = split(name_outputs(text_out))
    assert [t.name for t in tensors] == ["last_hidden_state", "pooler_output", "hidden_states.0", "hidden_states.1"]
    assert values == {}  # unset fields (attentions) are not recorded as null
    assert [t.name for t in split(name_outputs((unet_out.sample,)))[0]] == ["output.0"]  # return_dict=False


def test_non_tensor_arguments_are_kept_as_json_values():
    tensors, values = split(
        [("sample", np.zeros(1)), ("return_dict", False), ("mode", "fast"), ("cfg", None), ("gen", object())]
    )
    assert values == {"return_dict": "false", "mode": '"fast"', "cfg": "null", "gen": '"<object>"'}


def test_python_numbers_are_values_stored_as_tensors():
    tensors, values = split([("timestep", 999), ("scale", 7.5), ("flag", True)])
    assert [(t.name, t.dtype, t.source) for t in tensors] == [
        ("timestep", "int64", "python"),
        ("scale", "float64", "python"),
    ]
    assert values == {"flag": "true"}


leaves = st.one_of(st.integers(-5, 5).map(lambda n: np.full(2, n)), st.none(), st.text(max_size=3), st.booleans())
nested = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text("abc", min_size=1, max_size=2), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(nested)
def test_flatten_names_are_unique_and_values_survive(value):
    tensors, values = split([("x", value)])
    names = [t.name for t in tensors] + list(values)
    assert len(names) == len(set(names))
    expected = [leaf for _, leaf in flatten(value, "x") if isinstance(leaf, np.ndarray)]
    assert len(tensors) == len(expected)
    for t, e in zip(tensors, expected):
        np.testing.assert_array_equal(t.data, e)


def test_kv_caches_are_named_per_layer_as_onnx_exports_name_them():
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    def filled(layers: int, fill: float) -> DynamicCache:
        cache = DynamicCache()
        for i in range(layers):
            cache.update(torch.full((1, 2, 3, 4), fill + i), torch.full((1, 2, 3, 4), -fill - i), i)
        return cache

    tensors, values = split([("past_key_values", filled(2, 1.0))])
    assert [t.name for t in tensors] == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert [float(t.data.flat[0]) for t in tensors] == [1.0, -1.0, 2.0, -2.0]

    tensors, _ = split([("past_key_values", EncoderDecoderCache(filled(1, 1.0), filled(1, 5.0)))])
    assert [t.name for t in tensors] == [
        "past_key_values.0.decoder.key",
        "past_key_values.0.decoder.value",
        "past_key_values.0.encoder.key",
        "past_key_values.0.encoder.value",
    ]
    tensors, values = split([("past_key_values", DynamicCache())])
    assert not tensors and values == {"past_key_values": '"<DynamicCache>"'}  # empty: still visible as a value


@pytest.mark.parametrize("carrier", ["cache", "args.2", "past_key_values"])
def test_a_kv_cache_has_one_name_whatever_argument_carries_it(carrier):
    """transformers 5 hands the cache to the model as ``cache=``; an export names it
    ``past_key_values``: the two must pair."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    tensors, _ = split([(carrier, cache)])
    assert [t.name for t in tensors] == ["past_key_values.0.key", "past_key_values.0.value"]
    _, values = split([(carrier, DynamicCache())])
    assert list(values) == ["past_key_values"]


def test_kv_caches_of_older_transformers_are_read_from_their_lists():
    import torch

    Cache = type("Cache", (), {"__module__": "transformers.cache_utils"})
    Legacy = type("DynamicCache", (Cache,), {"__module__": "transformers.cache_utils"})
    cache = Legacy()
    cache.key_cache, cache.value_cache = [torch.ones(1, 2), torch.ones(1, 3)], [torch.zeros(1, 2), torch.zeros(1, 3)]
    tensors, _ = split([("past_key_values", cache)])
    assert [(t.name, t.data.shape) for t in tensors] == [
        ("past_key_values.0.key", (1, 2)),
        ("past_key_values.0.value", (1, 2)),
        ("past_key_values.1.key", (1, 3)),
        ("past_key_values.1.value", (1, 3)),
    ]
    lookalike = type(
        "DynamicCache", (), {"key_cache": [torch.ones(1)], "value_cache": [torch.ones(1)]}
    )()  # not transformers'
    assert split([("x", lookalike)])[0] == []
