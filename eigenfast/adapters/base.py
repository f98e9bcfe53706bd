"""The common view every architecture adapter provides.

Everything above the adapters is architecture-blind: it sees layers, and for
each layer a *site* per component — the projection module that holds the
component's matrix plus which of that module's inputs/outputs belong to each
head. A weight matrix ``A`` maps a row activation ``x`` (d_in) to ``x A + b``
(d_out); ``nn.Linear`` stores ``A^T`` and GPT-2's ``Conv1D`` stores ``A``:
:func:`projection_matrix` hides that.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

COMPONENTS = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")
HEAD_OUTPUT_COMPONENTS = ("q", "k", "v")  # each head owns some output columns
HEAD_INPUT_COMPONENTS = ("o",)  # each head owns some input rows


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


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


def projection_matrix(module: nn.Module) -> torch.Tensor:
    """The math-orientation matrix ``A`` (d_in, d_out) of a projection module (a view, no copy)."""
    if isinstance(module, Conv1D):
        return module.weight
    if isinstance(module, nn.Linear):
        return module.weight.T
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


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
    cache_argument: str = "past_key_values"  # the keyword a decoder layer hands its attention the KV cache under

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

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
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; choose from {COMPONENTS}")
        if component not in self.projections:
            raise ValueError(
                f"{self.family} models have no {component!r} matrix; available: {self.components()}"
            )
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        path = f"{self.layer_path(layer)}.{self.projections[component]}"
        if component in HEAD_OUTPUT_COMPONENTS:
            heads = self.n_heads if component == "q" else self.n_kv_heads
            return Site(layer, component, path, heads, out_index=self.head_columns(component))
        if component in HEAD_INPUT_COMPONENTS:
            return Site(layer, component, path, self.n_heads, in_index=contiguous_heads(self.n_heads, self.d_head))
        return Site(layer, component, path, 1)

    def head_columns(self, component: str) -> torch.Tensor:
        """Output columns of the q/k/v projection owned by each head (separate projections by default)."""
        heads = self.n_heads if component == "q" else self.n_kv_heads
        return contiguous_heads(heads, self.d_head)

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
