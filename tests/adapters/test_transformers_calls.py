"""Calls to and from transformers are laid out by the installed release's signatures (eigenfast/adapters/calls.py):
renamed parameters are followed, unknown ones are an error naming the release and the parameter."""
from __future__ import annotations

import inspect
import re

import pytest
import torch
import transformers
from torch import nn

import eigenfast
from eigenfast.adapters import get_adapter
from eigenfast.adapters.base import Adapter
from eigenfast.adapters.calls import (
    cache_keyword,
    check_attention_function,
    check_cache_update,
    check_rotary,
    layer_parameters,
)

from conftest import FAMILIES, make_data, make_model

P = inspect.Parameter


def layer_class(*names: str) -> type[nn.Module]:
    """A decoder-layer class whose forward is ``(self, hidden_states, <names>=None..., **kwargs)``."""

    class Layer(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    parameters = [P("self", P.POSITIONAL_OR_KEYWORD), P("hidden_states", P.POSITIONAL_OR_KEYWORD)]
    parameters += [P(name, P.POSITIONAL_OR_KEYWORD, default=None) for name in names]
    Layer.forward.__signature__ = inspect.Signature([*parameters, P("kwargs", P.VAR_KEYWORD)])
    return Layer


def release_error(name: str) -> str:
    """What the error must say: the installed release and the parameter."""
    return rf"transformers {re.escape(transformers.__version__)}: .*'{name}'"


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values", "layer_past"])
def test_a_layer_call_is_taken_apart_by_the_layers_own_parameter_names(cache_name):
    parameters = layer_parameters(layer_class(cache_name, "attention_mask", "use_cache"))
    cache, mask, positions, rotary = object(), torch.zeros(1, 1, 3, 3), torch.arange(3)[None], object()
    # By position as GPT-2's backbone calls its blocks, the rest by keyword.
    call = Adapter.layer_call(parameters, (cache, mask), {"position_ids": positions, "position_embeddings": rotary,
                                                          "use_cache": True, "output_attentions": False})
    assert call.cache is cache and call.attention_mask is mask
    assert call.position_ids is positions and call.position_embeddings is rotary
    # Whatever is not one of LayerCall's own goes on to the attention function, as HF's layers pass it.
    assert call.kwargs == {"position_ids": positions, "use_cache": True, "output_attentions": False}
    # The cache under another release's name is not the cache: handed on, as the real layer would ignore it too.
    other = "past_key_values" if cache_name == "cache" else "cache"
    assert Adapter.layer_call(parameters, (), {other: cache}).cache is None


def test_an_unknown_layer_parameter_names_the_release_and_the_parameter():
    with pytest.raises(eigenfast.TransformersVersionError, match=release_error("kv_state")):
        layer_parameters(layer_class("attention_mask", "cache", "kv_state"))
    with pytest.raises(eigenfast.TransformersVersionError, match=release_error("layer_past")):
        layer_parameters(layer_class("cache", "layer_past"))  # two names for one argument
    with pytest.raises(eigenfast.TransformersVersionError, match="KV cache under none of the names"):
        layer_parameters(layer_class("attention_mask", "position_ids"))
    assert layer_parameters(layer_class("cache", "encoder_hidden_states"), ("encoder_hidden_states",)).cache == "cache"


def test_cache_rotary_and_attention_signatures_are_checked():
    class OldCache:  # transformers before 5.4: a static cache writes where cache_kwargs["cache_position"] says
        def update(self, key_states, value_states, layer_idx, cache_kwargs=None): ...

    class NewCache:
        def update(self, key_states, value_states, layer_idx, *args, **kwargs): ...

    with pytest.raises(eigenfast.TransformersVersionError, match=release_error("cache_kwargs")):
        check_cache_update(OldCache)
    check_cache_update(NewCache)

    def swapped(q, k, sin, cos, unsqueeze_dim=1): ...

    def needs_more(q, k, cos, sin, rotary_dim): ...

    for rotary, name in ((swapped, "sin"), (needs_more, "rotary_dim")):
        with pytest.raises(eigenfast.TransformersVersionError, match=release_error(name)):
            check_rotary(rotary)

    def ignores_scaling(module, query, key, value, attention_mask, **kwargs): ...

    def needs_sinks(module, query, key, value, attention_mask, scaling, sinks, **kwargs): ...

    for attention, name in ((ignores_scaling, "scaling"), (needs_sinks, "sinks")):
        with pytest.raises(eigenfast.TransformersVersionError, match=release_error(name)):
            check_attention_function(attention, ("dropout", "scaling"))


def test_a_release_that_renamed_a_layer_parameter_is_refused_before_any_work():
    model = make_model("llama")
    base = type(model.model.layers[0])

    class Renamed(base):  # what a future release's layer could look like
        def forward(self, hidden_states, attention_mask=None, position_ids=None, kv_cache=None, **kwargs):
            return super().forward(hidden_states, attention_mask, position_ids, kv_cache, **kwargs)

    for layer in model.model.layers:
        layer.__class__ = Renamed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(eigenfast.TransformersVersionError, match=release_error("kv_cache")):
        eigenfast.prune(model, make_data(), p=0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(layer) is Renamed for layer in model.model.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_installed_release_maps_for_every_family(family):
    model = make_model(family)
    adapter = get_adapter(model)  # checks every call (Adapter.check_calls)
    parameters = layer_parameters(type(adapter.layers()[0]), adapter.layer_arguments)
    forward = inspect.signature(type(adapter.layers()[0]).forward).parameters
    assert parameters.cache in forward
    for called, module in ((model, model), (adapter.backbone(), adapter.backbone()), (torch.compile(model), model)):
        assert cache_keyword(called) in inspect.signature(type(module).forward).parameters
