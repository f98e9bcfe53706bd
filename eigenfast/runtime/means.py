"""Mean contributions of every head and MLP to the residual stream, per token position.

Mean ablation (docs/MATH.md §4) replaces a component's output by its mean over the
patching set D_a at the same true position. A head's output is its slice of
the attention output projection, ``z_h W_O^h`` (the projection's bias belongs
to no head and stays). That is linear in ``z_h``, so the mean contribution is
the mean input ``z̄_h[t]`` times ``W_O^h``: one forward collects per-position
sums of the o-projection inputs and of the MLP outputs, nothing per example.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters import Adapter, get_adapter, head_inputs, head_matrices, projection_matrix
from ..data.task_data import TaskData, model_data
from ..errors import ArgumentError
from ..rewrite.removal import ComponentMeans
from . import distributed
from .forward import eval_mode, model_device
from .hooks import Hooks


@torch.no_grad()
def component_means(model: nn.Module, patch_data: "TaskData | dict", batch_size: int = 32) -> ComponentMeans:
    """Mean output of every head and MLP at each true position of the patching set (one forward pass)."""
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
    data = model_data(patch_data, model)
    adapter = get_adapter(model)
    device = model_device(model)
    calib_len = data.max_length
    n_layers, d_model = adapter.n_layers, adapter.d_model
    o_paths = [adapter.site(layer, "o").path for layer in range(n_layers)]
    A_o = projection_matrix(model.get_submodule(o_paths[0]))
    # float64 sums: long data sets must not lose the small per-position means.
    z_sums = torch.zeros(n_layers, calib_len, A_o.shape[0], dtype=torch.float64, device=device)
    mlp_sums = torch.zeros(n_layers, calib_len, d_model, dtype=torch.float64, device=device)
    counts = torch.zeros(calib_len, dtype=torch.float64, device=device)

    with eval_mode(model):
        for batch in distributed.local_batches(data, batch_size):
            # Padding is weighted 0 rather than dropped: a boolean selection would
            # make the shapes depend on the data and cost a host sync per batch.
            # (padded slots have position 0; torch.where, not a product, so whatever they hold adds nothing).
            real = batch.mask.to(device).reshape(-1, 1).bool()
            pos = batch.position_ids.to(device).reshape(-1)
            counts.index_add_(0, pos, real[:, 0].double())

            def add(sums: torch.Tensor, x: torch.Tensor) -> None:
                sums.index_add_(0, pos, torch.where(real, x.reshape(-1, x.shape[-1]).double(), 0.0))

            with Hooks(adapter.model) as hooks:
                for layer, path in enumerate(o_paths):
                    hooks.on_input(path, lambda z, _l=layer: add(z_sums[_l], z))
                    hooks.on_output(adapter.mlp(layer), lambda y, _l=layer: add(mlp_sums[_l], y))
                adapter.backbone()(**batch.model_inputs(device), use_cache=False)

    distributed.all_sum_([z_sums, mlp_sums, counts])
    counts = counts.unsqueeze(1)
    heads = torch.stack([
        _head_contributions(adapter, layer, z_sums[layer] / counts) for layer in range(n_layers)
    ])
    return ComponentMeans(heads.to(A_o.dtype), (mlp_sums / counts).to(A_o.dtype), counts[:, 0])


def _head_contributions(adapter: Adapter, layer: int, z_mean: torch.Tensor) -> torch.Tensor:
    """Mean o-projection inputs ``(T, d_o)`` → each head's mean contribution ``(heads, T, d_model)``."""
    site = adapter.site(layer, "o")
    A = head_matrices(projection_matrix(adapter.model.get_submodule(site.path)).double(), site)
    return torch.einsum("thd,hdm->htm", head_inputs(z_mean, site), A)

