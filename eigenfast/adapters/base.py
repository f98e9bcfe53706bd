"""The common view every architecture adapter provides.

Everything above the adapters is architecture-blind: it sees layers, and for
each layer a *site* per component — the projection module that holds the
component's matrix plus which of that module's inputs/outputs belong to each
head. A weight matrix ``A`` maps a row activation ``x`` (d_in) to ``x A + b``
(d_out); ``nn.Linear`` stores ``A^T`` and GPT-2's ``Conv1D`` stores ``A``:
:func:`projection_matrix` hides that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.pytorch_utils import Conv1D

from ..errors import ArgumentError, ArgumentTypeError
from .calls import (
    LayerParameters,
    attention_function,
    check_attention_function,
    check_cache_update,
    check_rotary,
    layer_parameters,
)
from .projection import PositionalModule, project

COMPONENTS = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")
HEAD_OUTPUT_COMPONENTS = ("q", "k", "v")  # each head owns some output columns
HEAD_INPUT_COMPONENTS = ("o",)  # each head owns some input rows


@dataclass(frozen=True)
class Site:
    """Where one component of one layer lives inside the HF model.

    ``out_index[h]`` lists the projection's output columns that belong to head
    ``h`` (q/k/v), ``in_index[h]`` its input features (o); ``None`` means the
    head sees all of them (MLP matrices have a single "head").
    """

    layer: int
    component: str
    path: str
    heads: int
    out_index: torch.Tensor | None = None
    in_index: torch.Tensor | None = None

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.component)


@dataclass
class LayerCall:
    """The arguments a backbone called one decoder layer with, named the same for every family."""

    attention_mask: Any
    cache: Any
    position_ids: torch.Tensor | None
    position_embeddings: Any
    kwargs: dict[str, Any] = field(default_factory=dict)  # the rest, handed on to the attention function


def projection_matrix(module: nn.Module) -> torch.Tensor:
    """The math-orientation matrix ``A`` (d_in, d_out) of a projection module (a view, no copy).

    eigenfast's own projections (a position-indexed bias instead of a plain one) store
    their weight as ``nn.Linear`` or as ``Conv1D`` does and say which with ``linear_layout``.
    """
    if isinstance(module, Conv1D) or getattr(module, "linear_layout", None) is False:
        return module.weight
    if isinstance(module, nn.Linear) or getattr(module, "linear_layout", False):
        return module.weight.T
    raise ArgumentTypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def head_matrices(A: torch.Tensor, site: Site) -> torch.Tensor:
    """Per-head blocks ``(heads, d_in_h, d_out_h)`` of a site's matrix."""
    if site.out_index is not None:
        return A[:, site.out_index].permute(1, 0, 2)
    if site.in_index is not None:
        return A[site.in_index, :]
    return A.unsqueeze(0)


def head_inputs(x: torch.Tensor, site: Site) -> torch.Tensor:
    """Rows ``(R, d_in_total)`` → per-head inputs ``(R, heads, d_in_h)`` (a stride-0 view when shared)."""
    if site.in_index is not None:
        return x[:, site.in_index]
    return x.unsqueeze(1).expand(x.shape[0], site.heads, x.shape[1])


def head_outputs(y: torch.Tensor, site: Site) -> torch.Tensor:
    """Rows ``(R, d_out_total)`` → per-head outputs ``(R, heads, d_out_h)`` (a stride-0 view when shared)."""
    if site.out_index is not None:
        return y[:, site.out_index]
    return y.unsqueeze(1).expand(y.shape[0], site.heads, y.shape[1])


def contiguous_heads(n_heads: int, d_head: int, offset: int = 0, stride: int | None = None) -> torch.Tensor:
    """Index ``(n_heads, d_head)``: head ``h`` owns ``offset + h*stride + [0, d_head)``."""
    stride = d_head if stride is None else stride
    return offset + torch.arange(n_heads).unsqueeze(1) * stride + torch.arange(d_head).unsqueeze(0)


class Adapter:
    """Maps one HF causal-LM family onto the common view. Subclasses fill in the names."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    layers_path: str = ""
    backbone_path: str = ""
    lm_head_path: str = ""
    # Relative to one decoder layer:
    attn_path: str = ""
    mlp_path: str = ""
    attn_norm_path: str = ""
    mlp_norm_path: str | None = None  # None: attention and MLP share one norm (parallel block)
    final_norm_path: str = ""  # relative to the backbone: the norm between the last layer and the LM head
    parallel: bool = False
    projections: dict[str, str] = {}
    layer_arguments: tuple[str, ...] = ()  # a decoder layer's parameters the family's layer_call deals with itself
    mlp_activation: str = "act"  # the MLP's activation attribute
    # The HF config flag that gives each projection a bias when the class builds it (absent: always built with
    # one, or never); folding a constant into a missing bias turns the flag on (eigenfast/rewrite/plain_bias.py).
    bias_flags: dict[str, str] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    def check_calls(self) -> None:
        """Raise :class:`TransformersVersionError` unless the installed transformers' decoder layers, attention
        functions, rotary embedding and caches take the calls eigenfast makes (eigenfast/adapters/calls.py:
        each signature is read once), so that a release that renamed one fails here, before any work."""
        for cache_class in (DynamicCache, StaticCache):  # what generate() and eigenfast's serving decode with
            check_cache_update(cache_class)
        rotary = self.rotary_embedding()
        if rotary is not None:
            check_rotary(rotary)
        for index, layer in enumerate(self.layers()):
            if not hasattr(layer, "eigenfast_layer"):  # a layer eigenfast already swapped was read when it was
                layer_parameters(type(layer), self.layer_arguments)
            attention = self.attention(index)
            if isinstance(attention, PositionalModule):  # eigenfast's stand-in for a removed attention
                continue
            keywords = tuple(sorted(("dropout", "scaling", *self.attention_options(attention))))
            for function in {self.eager_attention(), attention_function(attention, self.eager_attention())}:
                check_attention_function(function, keywords)

    # --- sizes -----------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers())

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_head(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)

    # --- modules ---------------------------------------------------------
    def backbone(self) -> nn.Module:
        return self.model.get_submodule(self.backbone_path)

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    def layer_path(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}"

    def attention(self, layer: int) -> nn.Module:
        return self.model.get_submodule(f"{self.layer_path(layer)}.{self.attn_path}")

    def mlp(self, layer: int) -> nn.Module:
        return self.model.get_submodule(f"{self.layer_path(layer)}.{self.mlp_path}")

    def attn_norm(self, layer: int) -> nn.Module:
        return self.model.get_submodule(f"{self.layer_path(layer)}.{self.attn_norm_path}")

    def mlp_norm(self, layer: int) -> nn.Module:
        """The norm the MLP reads (the attention's own, for a block whose two share one)."""
        return self.model.get_submodule(f"{self.layer_path(layer)}.{self.mlp_norm_path or self.attn_norm_path}")

    def final_norm(self) -> nn.Module:
        return self.backbone().get_submodule(self.final_norm_path)

    # --- components ------------------------------------------------------
    def components(self) -> tuple[str, ...]:
        """The components this model has (``mlp_gate`` only for gated MLPs)."""
        return tuple(c for c in COMPONENTS if c in self.projections)

    def site(self, layer: int, component: str) -> Site:
        path = self._path(layer, component)
        if not self.has_component(layer, component):
            raise ArgumentError(
                f"layer {layer} has no {component!r} matrix any more: circuit extraction removed it; "
                "leave the layer out (layers=None skips removed components)"
            )
        if component in HEAD_OUTPUT_COMPONENTS:
            n_heads, n_kv_heads = self.layer_heads(layer)
            heads = n_heads if component == "q" else n_kv_heads
            return Site(layer, component, path, heads, out_index=self.head_columns(component, n_heads, n_kv_heads))
        if component in HEAD_INPUT_COMPONENTS:
            n_heads = self.layer_heads(layer)[0]
            return Site(layer, component, path, n_heads, in_index=contiguous_heads(n_heads, self.d_head))
        return Site(layer, component, path, 1)

    def _path(self, layer: int, component: str) -> str:
        if component not in COMPONENTS:
            raise ArgumentError(f"unknown component {component!r}; choose from {COMPONENTS}")
        if component not in self.projections:
            raise ArgumentError(
                f"{self.family} models have no {component!r} matrix; available: {self.components()}"
            )
        if not 0 <= layer < self.n_layers:
            raise ArgumentError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        return f"{self.layer_path(layer)}.{self.projections[component]}"

    def has_component(self, layer: int, component: str) -> bool:
        """Whether the layer still has this matrix (circuit extraction may have removed it)."""
        path = self._path(layer, component)  # a ValueError for names this family does not have
        try:
            module = self.model.get_submodule(path)
            projection_matrix(module)
        except (AttributeError, TypeError):
            return False
        return True

    def layer_heads(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads) the layer's attention has now: the config's, or fewer after extraction,
        read off the projections' widths."""
        width = lambda c: projection_matrix(self.model.get_submodule(self._path(layer, c))).shape[1]  # noqa: E731
        if self.projections["q"] == self.projections["k"]:  # one fused [q|k|v] projection
            heads = width("q") // (3 * self.d_head)
            return heads, heads
        return width("q") // self.d_head, width("k") // self.d_head

    def head_columns(self, component: str, n_heads: int, n_kv_heads: int) -> torch.Tensor:
        """Output columns of the q/k/v projection owned by each head (separate projections by default)."""
        return contiguous_heads(n_heads if component == "q" else n_kv_heads, self.d_head)

    def bias_flag(self, component: str) -> str | None:
        """The config flag that makes this family's HF class build ``component``'s projection with a bias."""
        return self.bias_flags.get(component)

    # --- head removal ----------------------------------------------------
    def kv_head(self, head: int) -> int:
        """The KV head that query head ``head`` reads (HF ``repeat_kv``: consecutive query heads share one)."""
        return head // (self.n_heads // self.n_kv_heads)

    def head_count_attributes(self, n_heads: int, n_kv_heads: int) -> dict[str, int]:
        """The attention module's attributes to set once it keeps ``n_heads`` query and ``n_kv_heads`` KV heads.

        Most HF attentions infer head counts from the projections' shapes and only
        need the GQA repeat factor; families that store more override this.
        """
        return {"num_key_value_groups": n_heads // n_kv_heads}

    # --- the positional forward (eigenfast/rewrite/positional.py) ----------------
    # Class methods: they describe how one module of the family computes, whatever model it is in.
    @classmethod
    def layer_call(cls, parameters: LayerParameters, args: tuple, kwargs: dict[str, Any]) -> LayerCall:
        """Name the arguments a decoder layer was called with, by its class's parameter names (``parameters``,
        read off the installed transformers: eigenfast/adapters/calls.py)."""
        if len(args) > len(parameters.positional):
            raise ArgumentTypeError(f"a decoder layer takes {len(parameters.positional) + 1} arguments by position, got {len(args) + 1}")
        rest = {**dict(zip(parameters.positional, args)), **kwargs}
        return LayerCall(
            attention_mask=rest.pop(parameters.attention_mask, None),
            cache=rest.pop(parameters.cache, None),
            position_ids=rest.get(parameters.position_ids),  # also handed on: flash attention reads it
            position_embeddings=rest.pop(parameters.position_embeddings, None),
            kwargs=rest,
        )

    @classmethod
    def parallel_layer(cls, layer: nn.Module) -> bool:
        """Whether this decoder layer runs attention and MLP side by side on the same input."""
        return cls.parallel

    @classmethod
    def _local(cls, component: str, parent: str) -> str | None:
        path = cls.projections.get(component)
        return None if path is None else path.removeprefix(parent + ".")

    @classmethod
    def output_projection(cls) -> str:
        """The output projection's name inside the attention module."""
        return cls._local("o", cls.attn_path)

    @classmethod
    def mlp_parts(cls) -> tuple[str, str | None, str]:
        """The MLP's (in, gate or None, out) projection names inside the MLP module."""
        return (cls._local("mlp_in", cls.mlp_path), cls._local("mlp_gate", cls.mlp_path), cls._local("mlp_out", cls.mlp_path))

    @classmethod
    def project_qkv(
        cls, attention: nn.Module, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V as ``(B, heads, T, d_head)`` from separate projections (fused families override)."""
        shape = (*x.shape[:-1], -1, attention.head_dim)
        q, k, v = (
            project(attention.get_submodule(cls._local(c, cls.attn_path)), x, positions).view(shape).transpose(1, 2)
            for c in "qkv"
        )
        return q, k, v

    @classmethod
    def rotary_embedding(cls) -> Callable | None:
        """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` of the family; None: learned absolute positions."""
        return None

    @classmethod
    def rotate(
        cls, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, position_embeddings: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Q and K with the family's rotary embedding applied (a partial one says how much in cos/sin)."""
        rotary = cls.rotary_embedding()
        if rotary is None:
            return q, k
        cos, sin = position_embeddings
        return rotary(q, k, cos, sin)

    @classmethod
    def eager_attention(cls) -> Callable:
        """The family's eager attention function (the fallback of transformers' attention interface)."""
        raise NotImplementedError

    @classmethod
    def attention_options(cls, attention: nn.Module) -> dict[str, Any]:
        """Extra keyword arguments the family's attention passes to the attention function."""
        return {}
