"""Hook-based references that tests of more than one folder compare changed models with.

``extracted`` gives a model with heads and MLPs physically removed and the logits the
hook-ablated original gives; ``assert_equals_hook_based_frozen_forward`` checks a pruned
model against the original with each frozen term's effect replaced by hooks (by its mean at
each position, or with ``over_positions`` by its mean over every token).
"""
from __future__ import annotations

import copy

import torch

from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.circuit import ablated, component_means
from eigenfast.data.task_data import TaskData
from eigenfast.rewrite.position_tables import TokenBiasLinear
from eigenfast.rewrite.removal import ComponentMeans, remove_components

# Layer 0 loses every head; layer 1 keeps heads 0, 2 and 3. With 2 KV heads (llama, qwen2)
# that keeps 1 and 2 query heads of the two groups: uneven, so K/V are gathered per query head.
HEADS = {0: [0, 1, 2, 3], 1: [1]}


def logits(model, data: TaskData) -> torch.Tensor:
    with torch.no_grad():
        return model(**data.model_inputs()).logits


def pairs(heads: dict[int, list[int]]) -> list[tuple[int, int]]:
    return [(layer, head) for layer, hs in heads.items() for head in hs]


def removed(model, data, heads=HEADS, mlps=(), ablation="mean", extrapolate="mean", positions="indexed"):
    """A copy of ``model`` with ``heads`` and ``mlps`` removed, means taken on ``data``."""
    means = component_means(model, data) if ablation == "mean" else None
    pruned = copy.deepcopy(model)
    remove_components(pruned, heads, list(mlps), means, ablation, extrapolate, positions)
    return pruned


def means_over_all_tokens(model, data: TaskData) -> ComponentMeans:
    """Every head's and MLP's mean output over all real tokens, by hooks (``ablated``), as one-position means:
    read at any position (extrapolate 'mean' or 'last'), the one row is what the hooks substitute."""
    per_position = component_means(model, data)
    mask = data.mask.bool()
    # The mean over tokens, straight from the per-position means and a count of the tokens at each position.
    counts = torch.stack([(mask & (data.position_ids == t)).sum() for t in range(per_position.calib_len)]).double()
    heads = (per_position.heads.double() * counts[:, None]).sum(2, keepdim=True) / counts.sum()
    mlps = (per_position.mlps.double() * counts[:, None]).sum(1, keepdim=True) / counts.sum()
    return ComponentMeans(heads.to(per_position.heads.dtype), mlps.to(per_position.mlps.dtype), counts.sum()[None])


def extracted(model, data, heads=HEADS, mlps=(), ablation="mean", extrapolate="mean", positions="indexed"):
    """A removed copy of ``model`` and the hook-ablated logits it must reproduce on ``data``."""
    if ablation == "mean":
        means = component_means(model, data) if positions == "indexed" else means_over_all_tokens(model, data)
    else:
        means = None
    with ablated(model, pairs(heads), mlps, means, ablation, extrapolate):
        reference = logits(model, data)
    return removed(model, data, heads, mlps, ablation, extrapolate, positions), reference


def mean_inputs(model, data: TaskData, path: str, over_positions: bool = False) -> torch.Tensor:
    """x̄[t] of one module's input, by hooks, over real tokens at each true position (``over_positions``: x̄ over
    every real token, ``(d_in,)``)."""
    seen = {}
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    logits(model, data)
    handle.remove()
    x, mask, pos = seen["x"].double(), data.mask.bool(), data.position_ids
    if over_positions:
        return x[mask].mean(0)
    return torch.stack([x[mask & (pos == t)].mean(0) for t in range(int(pos.max()) + 1)])


def frozen_delta(model, result, path: str) -> torch.Tensor:
    """Σ E_i over the frozen terms of every site living in ``path``, rebuilt from scratch."""
    adapter = get_adapter(model)
    A = projection_matrix(model.get_submodule(path)).detach().double()
    delta = torch.zeros_like(A)
    for (layer, component), mask in result.frozen.items():
        site = adapter.site(layer, component)
        if site.path != path:
            continue
        for h in range(site.heads):
            rows = site.in_index[h] if site.in_index is not None else torch.arange(A.shape[0])
            cols = site.out_index[h] if site.out_index is not None else torch.arange(A.shape[1])
            U, s, V = torch.linalg.svd(A[rows][:, cols], full_matrices=False)
            for i in mask[h].nonzero().flatten().tolist():
                delta[rows.unsqueeze(1), cols.unsqueeze(0)] += s[i] * torch.outer(U[:, i], V[i])
    return delta


def pruned_paths(result) -> list[str]:
    return [name for name, m in result.model.named_modules() if isinstance(m, TokenBiasLinear)]


def frozen_paths(model, result) -> list[str]:
    """The projections holding at least one frozen term."""
    adapter = get_adapter(model)
    return sorted({adapter.site(*key).path for key, mask in result.frozen.items() if bool(mask.any())})


def assert_equals_hook_based_frozen_forward(model, result, data: TaskData, over_positions: bool = False) -> None:
    """``result.model`` (pruned from ``model``) == ``model`` with each frozen term's live effect replaced, by hooks,
    with its mean effect at each true position (``over_positions``: over every real token)."""
    positions = data.position_ids
    # Means come from the untouched model, before any hook is in place.
    paths = frozen_paths(model, result) if over_positions else pruned_paths(result)
    edits = {path: (frozen_delta(model, result, path).float(), mean_inputs(model, data, path, over_positions).float())
             for path in paths}
    handles = []
    for path, (delta, xbar) in edits.items():

        def hook(mod, args, out, delta=delta, xbar=xbar):
            mean_effect = xbar @ delta  # (d_out,) over every token, else (calib_len, d_out) read at each position
            return out - args[0] @ delta + (mean_effect if over_positions else mean_effect[positions])

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    reference = logits(model, data)
    for h in handles:
        h.remove()
    torch.testing.assert_close(logits(result.model, data), reference, rtol=1e-4, atol=1e-4)
