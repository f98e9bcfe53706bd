"""The verified estimate (docs/MATH.md §2, "Estimates"): the lowest-scored terms, frozen one at a time, measured.

A first-order score can get the sign wrong: on a leading singular direction the estimate
may say freezing lowers the loss while freezing it raises the loss a lot. So the
``fraction`` lowest-scored terms of every component type (the ones any p up to that
fraction would freeze) are each frozen alone, exactly as :func:`~.freezing.freeze` would
(output ``+ (x̄[t] - x) E_i``), and the loss change is measured on the scoring data.

Cost: one forward of the data for the model plus one per candidate, no backward. The
candidates are stacked along the batch (as circuit discovery stacks its ablations):
replica ``c`` of a batch carries candidate ``c``'s change, so one forward of ``C × B``
rows measures ``C`` candidates. The layers below a candidate's own cannot see its change,
so a stack holds candidates of one layer only and is formed at that layer's input: the
layers below run on the ``B`` unstacked rows once per stack (the kept prefix), and only
the candidate's layer and those above it run on ``C × B`` rows.

Terms can help only together: one may raise the loss frozen alone and lower it once the others
are frozen. So :func:`recheck_dropped` measures the checked terms round one would keep (measured
ΔL > 0) again, each alone, on the model with every term round one accepted already frozen (the
model the largest p would give), and lets those that then lower the loss (or leave it) be frozen
too. Cost: one forward of the data plus one per re-checked term, on that frozen model.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, get_adapter, projection_matrix
from ..data.task_data import TaskData, model_data
from ..runtime.forward import eval_mode, last_logits
from ..runtime.hooks import Hooks
from ..runtime.progress import progress as with_progress
from .freezing import freeze, select_frozen
from .scoring import Attribution, Key
from .svd import placed_terms

# Examples per stacked forward, in units of the caller's batch size: C candidates x B examples.
STACK = 8


@dataclass
class Verification:
    """Measured ΔL (mean loss change per scoring example) of each checked term, ``+inf`` for the rest, and which
    terms may be frozen: those measured not to raise the loss alone (and, after :func:`recheck_dropped`, those
    that do not raise it once the others are frozen)."""

    scores: dict[Key, torch.Tensor]
    checked: int
    allowed: dict[Key, torch.Tensor]
    rechecked: int = 0


@dataclass
class _Candidate:
    key: Key
    head: int
    index: int


@torch.no_grad()
def verify_lowest(
    model: nn.Module, attribution: Attribution, data: "TaskData | dict", fraction: float, batch_size: int = 32,
    progress: bool = True,
) -> Verification:
    """Freeze each of the lowest ``fraction`` of every component type's terms alone and measure ΔL on ``data``."""
    data = model_data(data, model)
    candidates = _candidates(select_frozen(attribution.scores, fraction))
    scores = {key: torch.full_like(s, torch.inf) for key, s in attribution.scores.items()}
    for candidate, change in zip(candidates, _measure(model, attribution, data, candidates, batch_size, progress)):
        scores[candidate.key][candidate.head, candidate.index] = change
    return Verification(scores, len(candidates), {key: s <= 0 for key, s in scores.items()})


@torch.no_grad()
def recheck_dropped(
    model: nn.Module, attribution: Attribution, data: "TaskData | dict", verification: Verification,
    batch_size: int = 32, progress: bool = True,
) -> Verification:
    """Round two: each checked term round one keeps, frozen alone on ``model`` with every allowed term already
    frozen, and allowed too where ΔL on ``data`` is then not positive. Scores (the ranking) stay round one's."""
    data = model_data(data, model)
    kept = {key: torch.isfinite(s) & ~verification.allowed[key] for key, s in verification.scores.items()}
    dropped = _candidates(kept)
    if not dropped:
        return verification
    frozen = copy.deepcopy(model)
    freeze(frozen, attribution, verification.allowed)
    allowed = {key: mask.clone() for key, mask in verification.allowed.items()}
    changes = _measure(frozen, attribution, data, dropped, batch_size, progress, "recheck")
    for candidate, change in zip(dropped, changes):
        allowed[candidate.key][candidate.head, candidate.index] = change <= 0
    return Verification(verification.scores, verification.checked, allowed, len(dropped))


def _candidates(masks: dict[Key, torch.Tensor]) -> list[_Candidate]:
    """The marked terms, sorted by layer: a stack holds one layer's candidates."""
    return sorted(
        (_Candidate(key, int(h), int(i)) for key, mask in masks.items() for h, i in mask.nonzero().tolist()),
        key=lambda c: c.key[0],
    )


def _measure(
    model: nn.Module, attribution: Attribution, data: TaskData, candidates: list[_Candidate], batch_size: int,
    progress: bool, what: str = "verify",
) -> list[float]:
    """The mean loss change over ``data`` of freezing each candidate alone in ``model``, in exact forwards."""
    if not candidates:
        return []
    adapter = get_adapter(model)
    vectors = _vectors(adapter.model, attribution, candidates)
    modules = _module_keys(attribution, candidates)
    means = {path: _mean_rows(attribution, key) for path, key in modules.items()}
    sums = torch.zeros(len(candidates), dtype=torch.float64)
    chunk = max(1, STACK * batch_size // min(batch_size, len(data)))
    stacks = [(layer, start, min(stop, start + chunk)) for layer, (first, stop) in _layer_runs(candidates).items()
              for start in range(first, stop, chunk)]
    batches = list(data.batches(batch_size))
    with eval_mode(model):
        for batch in with_progress(batches, len(batches), f"{what}: exact forwards" if progress else None):
            base = _losses(adapter, batch).sum()
            for layer, start, stop in stacks:
                in_layer = {path: v for path, v in vectors.items() if modules[path][0] == layer}
                sums[start:stop] += _stacked_losses(adapter, batch, in_layer, means, layer, start, stop) - base
    return (sums / len(data)).tolist()


def _layer_runs(candidates: list[_Candidate]) -> dict[int, tuple[int, int]]:
    """Per layer, the ``[start, stop)`` range its candidates fill in the layer-sorted list."""
    runs: dict[int, tuple[int, int]] = {}
    for c, candidate in enumerate(candidates):
        start, _ = runs.get(candidate.key[0], (c, c))
        runs[candidate.key[0]] = (start, c + 1)
    return runs


def _module_keys(attribution: Attribution, candidates: list[_Candidate]) -> dict[str, Key]:
    """One key per module the candidates live in (every site of a module reads the same mean input)."""
    return {attribution.stats[c.key].site.path: c.key for c in candidates}


def _mean_rows(attribution: Attribution, key: Key) -> torch.Tensor:
    """x̄[t] with one more row of zeros for padding (its change is masked out anyway)."""
    mean = attribution.mean_input(key).float()
    return torch.cat([mean, mean.new_zeros(1, mean.shape[1])])


def _vectors(
    model: nn.Module, attribution: Attribution, candidates: list[_Candidate]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: ``u (C, d_in)`` and ``w (C, d_out)``, row ``c`` zero unless candidate ``c`` lives there."""
    rows: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for c, candidate in enumerate(candidates):
        st = attribution.stats[candidate.key]
        d_in, d_out = projection_matrix(model.get_submodule(st.site.path)).shape
        u, w = placed_terms(st.site, st.factors, candidate.head, torch.tensor([candidate.index]), d_in, d_out)
        rows[st.site.path].append((c, u[0], w[0]))
    vectors = {}
    for path, entries in rows.items():
        u = entries[0][1].new_zeros(len(candidates), entries[0][1].numel())
        w = entries[0][2].new_zeros(len(candidates), entries[0][2].numel())
        for c, u_c, w_c in entries:
            u[c], w[c] = u_c, w_c
        weight = model.get_submodule(path).weight
        vectors[path] = (u.to(weight.device, torch.float32), w.to(weight.device, torch.float32))
    return vectors


def _losses(adapter: Adapter, batch: TaskData, replicas: int = 1) -> torch.Tensor:
    """Cross-entropy of each example's next token, float64 on the CPU (``replicas`` stacked copies of ``batch``
    come out of the forward when the hooks stack it)."""
    logits = last_logits(adapter, batch)
    labels = batch.labels.repeat(replicas).to(logits.device)
    return nn.functional.cross_entropy(logits, labels, reduction="none").double().cpu()


def _stacked_losses(
    adapter: Adapter, batch: TaskData, vectors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    means: dict[str, torch.Tensor], layer: int, start: int, stop: int,
) -> torch.Tensor:
    """Summed loss over ``batch`` with candidate ``c`` frozen in replica ``c``, for ``c`` in ``[start, stop)``
    (every one of them in ``layer``): the batch runs unstacked up to ``layer`` and ``C`` times from there."""
    C, B = stop - start, len(batch)
    mask = batch.mask
    trash = next(iter(means.values())).shape[0] - 1  # padding reads the extra zero row
    pos = batch.position_ids.masked_fill(~mask.bool(), trash)
    with Hooks(adapter.model) as hooks:
        for later in adapter.layers()[layer:]:
            hooks.pre(later, _stacker(B, C), with_kwargs=True)
        for path, (u, w) in vectors.items():
            hooks.post(path, _freezer(means[path], pos, mask, u[start:stop], w[start:stop]))
        losses = _losses(adapter, batch, C)
    return losses.view(C, B).sum(1)


def _stacker(B: int, C: int):
    """A decoder-layer pre-hook repeating, replica-major, every per-example input still of ``B`` rows ``C`` times:
    the residual stream at the stack's first layer, and at every layer the per-example attention mask and
    position tensors (those of two or more dimensions; one-dimensional ones such as cache positions are not
    per example, and those shared by the batch have one row and broadcast)."""

    def repeat(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == B and C > 1:
            return value.repeat(C, *([1] * (value.dim() - 1)))
        if isinstance(value, tuple):
            return tuple(repeat(v) for v in value)
        return value

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return tuple(repeat(a) for a in args), {name: repeat(v) for name, v in kwargs.items()}

    return hook


def _freezer(mean: torch.Tensor, pos: torch.Tensor, real: torch.Tensor, u: torch.Tensor, w: torch.Tensor):
    """A forward hook adding ``((x̄[t] - x) · u_c) w_c`` to replica ``c`` of the module's output."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        C = u.shape[0]
        at = x.device
        rows = mean.to(at).index_select(0, pos.reshape(-1).to(at))  # (B*T, d_in)
        x = x.reshape(C, -1, x.shape[-1]).float()
        coefficient = (rows.unsqueeze(0) - x).mul_(real.reshape(1, -1, 1).to(at)) @ u.unsqueeze(-1)  # (C, B*T, 1)
        change = coefficient * w.unsqueeze(1)  # (C, B*T, d_out)
        return output + change.view(output.shape).to(output.dtype)

    return hook
