"""Calls between eigenfast and transformers, laid out by the installed release's signatures.

eigenfast swaps the classes of HF decoder layers and attentions (eigenfast/positional.py)
and calls transformers' own pieces: attention functions, rotary embeddings, KV-cache
updates, model forwards. transformers renames those parameters between releases (the
KV cache reached decoder layers as ``past_key_values``, GPT-NeoX's as ``layer_past``,
and from 5.24 as ``cache``), so nothing here is a fixed keyword list: each signature is
read once, its parameters are mapped onto what eigenfast passes or expects, and one it
does not know is a :class:`TransformersVersionError` naming the release and the
parameter, raised when the model is set up, before any work: never a silently wrong model.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable

import transformers
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import TransformersVersionError

# The names transformers releases have given each argument of a decoder layer that eigenfast reads.
LAYER_ARGUMENTS = {
    "attention_mask": ("attention_mask",),
    "cache": ("cache", "past_key_values", "layer_past"),
    "position_ids": ("position_ids",),
    "position_embeddings": ("position_embeddings",),
}
# A layer's parameters that eigenfast hands on to the attention function as they come, as HF's attentions do.
HANDED_ON = ("use_cache",)
# The attention interface's call: these by position, then keywords.
ATTENTION_POSITIONAL = ("module", "query", "key", "value", "attention_mask")
# Keywords an attention function must name itself: their values change the result (dropout is 0.0 in
# eval, and options such as a sliding window repeat what the mask already says, so those may fall into **kwargs).
ATTENTION_NAMED = ("scaling",)
ROTARY_POSITIONAL = ("q", "k", "cos", "sin")
CACHE_POSITIONAL = ("key_states", "value_states", "layer_idx")
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_BY_POSITION = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def transformers_version() -> str:
    return transformers.__version__


def _supported() -> str:
    """The transformers requirement eigenfast was installed with (its package metadata), for messages."""
    try:
        requirements = metadata.requires("eigenfast") or []
    except metadata.PackageNotFoundError:
        requirements = []
    declared = [r.split(";")[0].strip() for r in requirements if r.startswith("transformers")]
    return declared[0] if declared else "transformers (the release in eigenfast's pyproject.toml)"


def incompatible(where: str, problem: str) -> TransformersVersionError:
    """The error for a transformers signature eigenfast cannot map: ``problem`` names the parameter."""
    return TransformersVersionError(
        f"transformers {transformers_version()}: {where} {problem}, so eigenfast would call it wrongly; "
        f"install a release eigenfast supports: pip install '{_supported()}'"
    )


def _parameters(fn: Callable, where: str) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(_unwrapped(fn)).parameters.values())
    except (TypeError, ValueError) as error:  # a builtin or C function without a readable signature
        raise incompatible(where, f"has no readable signature ({error})") from error


def _unwrapped(fn: Callable) -> Callable:
    """The function behind a wrapper. Hugging Face's ``kernels`` turns a function that a hub kernel may
    replace (transformers' ``apply_rotary_pos_emb`` from 5.25) into an ``nn.Module`` whose forward takes
    ``*args, **kwargs`` and calls the function it closes over; ``functools.wraps`` wrappers say ``__wrapped__``."""
    if isinstance(fn, nn.Module):
        inner = [v for v in inspect.getclosurevars(type(fn).forward).nonlocals.values() if inspect.isfunction(v)]
        if len(inner) == 1:
            return inner[0]
    return fn


def _check_leading(params: list[inspect.Parameter], names: tuple[str, ...], where: str) -> list[inspect.Parameter]:
    """The parameters after ``names``, which must come first, by position, and so named."""
    for index, name in enumerate(names):
        if index >= len(params) or params[index].kind not in _BY_POSITION:
            raise incompatible(where, f"does not take {name!r} by position")
        if params[index].name != name:
            raise incompatible(where, f"takes {params[index].name!r} where eigenfast passes {name!r}")
    return params[len(names):]


# --- decoder layers --------------------------------------------------------------
@dataclass(frozen=True)
class LayerParameters:
    """How one decoder-layer class is called: the parameters after ``hidden_states`` that may come by
    position, in order, and the name this class gives each argument eigenfast reads (:data:`LAYER_ARGUMENTS`)."""

    positional: tuple[str, ...]
    attention_mask: str
    cache: str
    position_ids: str
    position_embeddings: str


@lru_cache(maxsize=None)
def layer_parameters(layer_class: type[nn.Module], own: tuple[str, ...] = ()) -> LayerParameters:
    """Read ``layer_class.forward``'s signature (once per class). ``own``: parameters the family's
    adapter deals with itself (GPT-2's cross-attention inputs). An argument that reaches the layer
    through ``**kwargs`` rather than a parameter of its own (GPT-2's ``position_ids``) keeps its usual
    name; the KV cache must be a parameter, since it is the one that gets renamed."""
    where = f"{layer_class.__name__}.forward"
    params = _check_leading(_parameters(layer_class.forward, where), ("self", "hidden_states"), where)
    alias = {name: argument for argument, names in LAYER_ARGUMENTS.items() for name in names}
    names: dict[str, str] = {}
    for param in params:
        if param.kind in _VARIADIC or param.name in HANDED_ON or param.name in own:
            continue
        argument = alias.get(param.name)
        if argument is None:
            raise incompatible(where, f"takes a parameter eigenfast does not know: {param.name!r}")
        if argument in names:
            raise incompatible(where, f"takes both {names[argument]!r} and {param.name!r} for its {argument}")
        names[argument] = param.name
    if "cache" not in names:
        raise incompatible(where, f"takes the KV cache under none of the names eigenfast knows ({_names('cache')})")
    positional = []
    for param in params:
        if param.kind not in _BY_POSITION:
            break
        positional.append(param.name)
    return LayerParameters(tuple(positional), **{argument: names.get(argument, argument) for argument in LAYER_ARGUMENTS})


def _names(argument: str) -> str:
    return ", ".join(map(repr, LAYER_ARGUMENTS[argument]))


# --- transformers' functions and caches that eigenfast's modules call ----------------
def attention_function(attention: nn.Module, eager: Callable) -> Callable:
    """The attention function ``attention``'s config selects from transformers' attention interface
    (``eager``, the family's own, by default), picked as HF's attentions pick it."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)


@lru_cache(maxsize=None)
def check_attention_function(fn: Callable, keywords: tuple[str, ...]) -> None:
    """An attention function (transformers' attention interface) takes what :class:`PositionalAttention`
    passes, as HF's attentions pass it: :data:`ATTENTION_POSITIONAL` by position, then ``keywords``."""
    where = f"the attention function {getattr(fn, '__name__', fn)!r}"
    params = _check_leading(_parameters(fn, where), ATTENTION_POSITIONAL, where)
    _check_required(params, keywords, where)
    named = {p.name for p in params if p.kind not in _VARIADIC}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    for keyword in keywords:
        if keyword not in named and (keyword in ATTENTION_NAMED or not takes_any):
            raise incompatible(where, f"does not take {keyword!r}")


@lru_cache(maxsize=None)
def check_rotary(fn: Callable) -> None:
    """A rotary embedding is called as HF's attentions call it: ``fn(q, k, cos, sin)``, the rest left at their defaults."""
    where = f"the rotary embedding {getattr(_unwrapped(fn), '__qualname__', fn)!r}"
    _check_required(_check_leading(_parameters(fn, where), ROTARY_POSITIONAL, where), (), where)


@lru_cache(maxsize=None)
def check_cache_update(cache_class: type) -> None:
    """``cache.update(key_states, value_states, layer_idx)`` is the whole call. A release whose caches
    take more (``cache_kwargs``, with the positions a static cache writes at) would be written wrongly."""
    where = f"{cache_class.__name__}.update"
    params = _check_leading(_parameters(cache_class.update, where), ("self", *CACHE_POSITIONAL), where)
    for param in params:
        if param.kind not in _VARIADIC:
            raise incompatible(where, f"takes a parameter eigenfast does not know: {param.name!r}")


def _check_required(params: list[inspect.Parameter], passed: tuple[str, ...], where: str) -> None:
    """Every parameter without a default is one of ``passed``."""
    for param in params:
        if param.kind not in _VARIADIC and param.default is inspect.Parameter.empty and param.name not in passed:
            raise incompatible(where, f"requires {param.name!r}, which eigenfast does not pass")


# --- model forwards ------------------------------------------------------------------
def cache_keyword(model: Any) -> str:
    """The keyword ``model`` (a HF model or backbone, or its ``torch.compile`` form) takes its KV cache under."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the model here
    return _cache_keyword(type(model).forward if isinstance(model, nn.Module) else model)


@lru_cache(maxsize=None)
def _cache_keyword(forward: Callable) -> str:
    where = getattr(forward, "__qualname__", repr(forward))
    names = [p.name for p in _parameters(forward, where) if p.name in LAYER_ARGUMENTS["cache"]]
    if len(names) != 1:
        raise incompatible(where, f"takes the KV cache under {len(names)} of the names eigenfast knows ({_names('cache')})")
    return names[0]
