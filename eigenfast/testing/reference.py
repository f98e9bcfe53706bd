"""Slow, obvious references for attribution scores (docs/MATH.md §2), shared by tests and benches.

One module, so that the tests that prove the fast paths right and the benchmarks
that time them run the very same reference code. Nothing here is fast or streamed:
everything is materialised, in float64 where the point is exactness.

* :func:`pair_statistics` — row level: every (row, partner) pair tried explicitly.
* :func:`per_singular_value_loop` — row level, "shift" pairs, the eigenpruning
  reference code's way: one rank-one term at a time, a (rows, heads, d_out) tensor each.
* :func:`naive_scores` — model level: the data set's x and g captured whole, every
  term as an explicit full-size matrix E_i, every allowed pair of token rows.
* :func:`reference_pipeline` — model level, as the reference code runs: cache every
  activation, full backward with parameter gradients through the batch-mean loss,
  then :func:`per_singular_value_loop` per site (what ``benches/bench_score.py`` times).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from ..adapters import Site, get_adapter, head_inputs, head_matrices, head_outputs, projection_matrix
from ..data.task_data import TaskData
from ..errors import DataError
from ..runtime.hooks import Hooks


def pair_statistics(
    x: torch.Tensor,
    g: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    s: torch.Tensor,
    pos: torch.Tensor,
    T: int,
    partner: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduce: str = "max",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pmax, pmin, score)`` of ``eigenfast.eigenprune.attribution`` from every pair, in float64.

    x (R, H, d_in), g (R, H, d_out), U (H, d_in, r), V (H, r, d_out), s (H, r), pos (R,).
    "all" (partner None): every row at the same position is a partner (the row itself
    included). "shift": ``partner[row]`` is the one partner. weight (R,): "max" skips
    rows of weight 0; "mean" gives ``Σ_row weight · mean over the row's partners``.
    Computed on the CPU.
    """
    x, g, U, V, s = (t.double().cpu() for t in (x, g, U, V, s))
    pos = pos.cpu()
    weight = torch.ones(len(pos), dtype=torch.float64) if weight is None else weight.double().cpu()
    P = torch.einsum("rhk,hki->rhi", x, U)
    G = torch.einsum("rho,hio->rhi", g, V)
    at_t = (pos[None, :] == torch.arange(T)[:, None])[..., None, None]
    pmax = torch.where(at_t, P, -torch.inf).amax(1)
    pmin = torch.where(at_t, P, torch.inf).amin(1)
    if partner is None:
        same_pos = (pos[:, None] == pos[None, :])[..., None, None]
        gain = s * (P[None, :] - P[:, None]) * G[:, None]  # [row, partner, h, i]
        best = torch.where(same_pos, gain, -torch.inf).amax(1)
        mean = torch.where(same_pos, gain, 0).sum(1) / same_pos.sum(1)
    else:
        Pp = torch.einsum("rhk,hki->rhi", partner.double().cpu(), U)
        best = mean = s * (Pp - P) * G  # one partner per row
    w = weight[:, None, None]
    if reduce == "max":
        score = torch.where(w != 0, best, -torch.inf).amax(0)
    else:
        score = (w * mean).sum(0)
    return pmax, pmin, score


def per_singular_value_loop(
    x: torch.Tensor,
    g: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    s: torch.Tensor,
    partner: torch.Tensor,
    terms: int | None = None,
) -> torch.Tensor:
    """Shift-pair scores ``(H, terms)`` the way the eigenpruning reference code computes
    them: for each singular value i, ``(x' - x) · u_i``, scaled and expanded to a full
    ``(rows, heads, d_out)`` change along ``v_i``, dotted with the gradient, max over rows.
    Shapes as in :func:`pair_statistics`; computes in the inputs' dtype; ``terms`` limits
    the loop to the first few singular values (each costs the same)."""
    delta = partner - x
    n = s.shape[1] if terms is None else terms
    out = torch.empty(s.shape[0], n, dtype=x.dtype, device=x.device)
    for i in range(n):
        along_u = torch.einsum("hd,rhd->rh", U[:, :, i], delta) * s[:, i]
        change = torch.einsum("rh,hd->rhd", along_u, V[:, i, :])
        out[:, i] = torch.einsum("rhd,rhd->rh", g, change).amax(0)
    return out


def capture(model: nn.Module, data: TaskData, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input x (N, T, d_in) and output gradient g (N, T, d_out) of one module, whole data at once,
    each example's gradient that of its own (summed) loss."""
    seen = {}

    def at_forward(x):
        seen["x"] = x
        return lambda g: seen.__setitem__("g", g)

    with Hooks(model) as hooks:
        hooks.on_backward(path, at_forward)
        logits = model(**data.model_inputs()).logits[:, -1]
        torch.nn.functional.cross_entropy(logits, data.labels, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return seen["x"].double(), seen["g"].double()


def head_terms(A: torch.Tensor, site: Site, head: int) -> Iterator[torch.Tensor]:
    """Every rank-one term of one head, each embedded in a full-size (d_in, d_out) matrix."""
    rows = site.in_index[head] if site.in_index is not None else torch.arange(A.shape[0])
    cols = site.out_index[head] if site.out_index is not None else torch.arange(A.shape[1])
    U, s, V = torch.linalg.svd(A[rows][:, cols], full_matrices=False)
    for i in range(s.shape[0]):
        E = torch.zeros_like(A)
        E[rows.unsqueeze(1), cols.unsqueeze(0)] = s[i] * torch.outer(U[:, i], V[i])
        yield E


def partner_matrix(data: TaskData, pairs: str, batch_size: int) -> torch.Tensor:
    """allowed[a, b]: token row b may stand in for token row a (rows flattened over (N, T))."""
    mask, pos = data.mask.bool(), data.position_ids
    N, T = mask.shape
    example = torch.arange(N).repeat_interleave(T)
    column = torch.arange(T).repeat(N)
    real = mask.flatten()
    if pairs == "all":
        allowed = pos.flatten().unsqueeze(1) == pos.flatten().unsqueeze(0)
    else:  # the previous example of the same batch (wrapping), same column
        first = example - example % batch_size
        size = torch.clamp(N - first, max=batch_size)
        previous = first + (example - first - 1) % size
        allowed = (previous.unsqueeze(1) == example.unsqueeze(0)) & (column.unsqueeze(1) == column.unsqueeze(0))
    return allowed & real.unsqueeze(1) & real.unsqueeze(0)


def naive_scores(
    model: nn.Module, data: TaskData, layer: int, component: str, pairs: str, batch_size: int, reduce: str = "max"
) -> torch.Tensor:
    """``(heads, r)`` scores of one site: ΔL of every allowed pair of token rows, max or mean."""
    site = get_adapter(model).site(layer, component)
    x, g = capture(model, data, site.path)
    x, g = x.flatten(0, 1), g.flatten(0, 1)
    A = projection_matrix(model.get_submodule(site.path)).detach().double()
    allowed = partner_matrix(data, pairs, batch_size)
    rows = []
    for h in range(site.heads):
        row = []
        for E in head_terms(A, site, h):
            # delta[a, b] = g_a · ((x_b - x_a) E): the loss change of swapping row a's input for row b's.
            Y = x @ E
            delta = g @ Y.T - (g * Y).sum(-1, keepdim=True)
            row.append(delta[allowed].max() if reduce == "max" else delta[allowed].mean())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def reference_pipeline(
    model: nn.Module, data: TaskData, components: Sequence[str], batch_size: int
) -> dict[tuple[int, str], torch.Tensor]:
    """Shift-pair scores of every layer's sites the reference code's way (see the module
    docstring), rescaled by the batch size so they equal ``eigenfast.score(pairs="shift")``'s.
    Float32 like the reference code; unpadded data only, as it assumes."""
    if data.attention_mask is not None:
        raise DataError("reference_pipeline takes unpadded data only (its pairs include padding)")
    adapter = get_adapter(model)
    sites = [adapter.site(layer, c) for layer in range(adapter.n_layers) for c in components]
    factors = {}
    for site in sites:
        A = head_matrices(projection_matrix(model.get_submodule(site.path)).detach(), site)
        factors[site.key] = torch.linalg.svd(A, full_matrices=False)
    scores = {site.key: torch.full_like(factors[site.key][1], -torch.inf) for site in sites}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    for batch in data.batches(batch_size):
        cache, grads = {}, {}

        # Every module, kept undetached, as run_with_cache does: not Hooks.on_backward's pattern.
        def save(name):
            def hook(module, args, out):
                if isinstance(out, torch.Tensor):
                    cache[name] = out
                    if out.requires_grad:
                        out.register_hook(lambda g: grads.__setitem__(name, g))
                if args and isinstance(args[0], torch.Tensor):
                    cache[name + ".in"] = args[0]

            return hook

        with Hooks(model) as hooks:
            for name, module in model.named_modules():
                if name:
                    hooks.post(module, save(name))
            model.zero_grad()
            logits = model(**batch.model_inputs()).logits
            torch.nn.functional.cross_entropy(logits[:, -1], batch.labels).backward()
        B, T = batch.input_ids.shape
        for site in sites:
            x = cache[site.path + ".in"].detach()
            partner = x.roll(1, dims=0).reshape(B * T, -1)
            x, g = x.reshape(B * T, -1), grads[site.path].reshape(B * T, -1)
            U, s, V = factors[site.key]
            found = per_singular_value_loop(
                head_inputs(x, site), head_outputs(g, site), U, V, s, head_inputs(partner, site)
            )
            scores[site.key] = torch.maximum(scores[site.key], found * B)
        del cache, grads
    model.zero_grad(set_to_none=True)
    for p, flag in flags:
        p.requires_grad_(flag)
    return scores
