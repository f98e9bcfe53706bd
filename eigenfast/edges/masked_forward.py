"""The masked forward: every reader's input mixes clean and counterfactual writer outputs.

A reader ``i`` reads ``Σ_j z_ji·y_j + (1 − z_ji)·ỹ_j`` over the writers before it,
which is the counterfactual residual stream at that point plus ``Σ_j z_ji·(y_j − ỹ_j)``.
The differences ``Δ_j`` of the writers so far sit in one ``(W, B, T, d)`` tensor, so a
reader group's inputs are one matrix product ``Z_g @ Δ`` (``(R, W) @ (W, B·T·d)``): no
loop over edges. A writer's node mask scales its column of every ``Z_g``.

The model's own modules do the rest, layer by layer: the norm reads the mixed input
(one per reader), per-head q/k/v projections come from the adapters' head index
tables, and the HF attention module runs unchanged (rotary, masking, GQA, scaling)
with its projections swapped for stand-ins that return the per-head results; its
output projection is swapped for one that records the heads' outputs, which are
then split per head. The counterfactual side (``ỹ`` and the residual it sums to) comes
from a plain run of the same code on the corrupted input.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters import Adapter, get_adapter, head_matrices, projection_matrix
from ..data.task_data import TaskData
from ..errors import ArgumentError, DataError, UnsupportedModelError
from ..runtime.forward import last_logits, model_device
from ..runtime.hooks import Hooks, hidden_states
from .graph import EdgeGraph

QKV = ("q", "k", "v")


class _Given(nn.Module):
    """Stands in for a q/k/v projection: returns the output computed outside, whatever its input."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


class _Recorder(nn.Module):
    """Stands in for the output projection: keeps its input (the heads' outputs), returns zeros."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x
        return x.new_zeros(()).expand(*x.shape[:-1], self.d_model)


@dataclass
class Context:
    """One batch as the unmasked model saw it: embeddings, each attention call's arguments, f's logits."""

    embeddings: torch.Tensor  # (B, T, d)
    attention_calls: list[tuple[tuple, dict[str, Any], bool]]  # (args, kwargs, hidden passed by keyword)
    logits: torch.Tensor  # (B, V) the full model's last-token logits
    labels: torch.Tensor


@dataclass
class Counterfactual:
    """The corrupted run: every writer's output ``ỹ`` and the residual stream each reader stage sees."""

    writers: torch.Tensor  # (W, B, T, d)
    stages: list[torch.Tensor]  # per layer: attention input, MLP input (B, T, d); then the final (B, d)
    logits: torch.Tensor  # (B, V)


@dataclass
class Prepared:
    clean: Context
    corrupted: Counterfactual


@dataclass
class _LayerWeights:
    qkv: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # component -> (heads, d, d_head), bias (heads, d_head)
    o: torch.Tensor  # (heads, d_head, d)
    o_bias: torch.Tensor | None
    in_index: torch.Tensor  # (heads, d_head) columns of the o input per head
    layouts: dict[str, tuple[tuple[str, ...], torch.Tensor]]  # projection path -> (components, column order)


class EdgeForward:
    """The masked forward of one model over its :class:`EdgeGraph`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.graph = EdgeGraph.of(self.adapter)
        with torch.no_grad():
            self.weights = [self._layer_weights(layer) for layer in range(self.adapter.n_layers)]

    def _layer_weights(self, layer: int) -> _LayerWeights:
        adapter, qkv, layouts = self.adapter, {}, {}
        for component in QKV:
            site = adapter.site(layer, component)
            module = self.model.get_submodule(site.path)
            bias = None if module.bias is None else module.bias[site.out_index].detach().clone()
            qkv[component] = (head_matrices(projection_matrix(module), site).detach().clone(), bias)
            layouts.setdefault(site.path, []).append(component)
        order = {}
        for path, components in layouts.items():
            columns = torch.cat([adapter.site(layer, c).out_index.flatten() for c in components])
            width = projection_matrix(self.model.get_submodule(path)).shape[1]
            if sorted(columns.tolist()) != list(range(width)):
                raise UnsupportedModelError(f"{path}: the q/k/v head columns do not tile its {width} outputs; the adapter is wrong")
            order[path] = (tuple(components), torch.argsort(columns))
        site = adapter.site(layer, "o")
        o_module = self.model.get_submodule(site.path)
        o_bias = None if o_module.bias is None else o_module.bias.detach().clone()
        return _LayerWeights(qkv, head_matrices(projection_matrix(o_module), site).detach().clone(), o_bias,
                             site.in_index, order)

    # --- capture ---------------------------------------------------------
    @torch.no_grad()
    def context(self, batch: TaskData) -> Context:
        """One ordinary forward, keeping the embeddings and every attention call's arguments."""
        adapter = self.adapter
        calls: list[tuple[tuple, dict[str, Any], bool]] = []
        embeddings: list[torch.Tensor] = []

        def take_embeddings(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            embeddings.append(hidden_states(args, kwargs))

        def take_call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            by_keyword = not args
            if by_keyword:
                kwargs.pop("hidden_states")
            calls.append((tuple(args[1:]), kwargs, by_keyword))

        with Hooks(adapter.model) as hooks:
            hooks.pre(adapter.layers()[0], take_embeddings, with_kwargs=True)
            for layer in range(adapter.n_layers):
                hooks.pre(adapter.attention(layer), take_call, with_kwargs=True)
            logits = last_logits(adapter, batch)
        device = model_device(self.model)
        return Context(embeddings[0], calls, logits, batch.labels.to(device))

    @torch.no_grad()
    def prepare(self, clean: TaskData, corrupted: TaskData) -> Prepared:
        """The clean batch's context and the corrupted batch's writer outputs (same shape and padding)."""
        if clean.input_ids.shape != corrupted.input_ids.shape or not torch.equal(clean.mask, corrupted.mask):
            raise DataError(
                f"clean and corrupted inputs must pair up one to one with the same length and padding; got shapes "
                f"{tuple(clean.input_ids.shape)} and {tuple(corrupted.input_ids.shape)}: build the corrupted set "
                "from the clean one (same prompts' lengths), e.g. eigenfast.edges.corrupt_by_shuffling"
            )
        return Prepared(self.context(clean), self.counterfactual(self.context(corrupted)))

    @torch.no_grad()
    def counterfactual(self, ctx: Context) -> Counterfactual:
        """A plain (unmasked) run of the disentangled forward, keeping every writer's output."""
        adapter = self.adapter
        resid = ctx.embeddings
        writers, stages = [resid.unsqueeze(0)], []
        with self._stand_ins(qkv=False):
            for layer in range(adapter.n_layers):
                stages.append(resid)
                heads = self._attention(layer, ctx, adapter.attn_norm(layer)(resid))
                middle = resid + heads.sum(0) + self._o_bias(layer)
                mlp_input = resid if self.graph.parallel else middle
                stages.append(mlp_input)
                mlp = adapter.mlp(layer)(adapter.mlp_norm(layer)(mlp_input))
                writers += [heads, mlp.unsqueeze(0)]
                resid = middle + mlp
        last = resid[:, -1]
        stages.append(last)
        logits = _at_least_float32(adapter.lm_head()(adapter.final_norm()(last)))
        return Counterfactual(torch.cat(writers), stages, logits)

    # --- the masked forward ------------------------------------------------
    def logits(
        self,
        prepared: Prepared,
        edges: torch.Tensor,
        nodes: torch.Tensor | None = None,
        start_layer: int = 0,
        prefix: torch.Tensor | None = None,
        probe: "Probe | None" = None,
    ) -> torch.Tensor:
        """Last-token logits ``(B, V)`` with edge masks ``(E,)`` and optional writer node masks ``(W,)``.

        Differentiable in both masks; 1 keeps a writer's clean output on an edge, 0 takes
        the counterfactual. With ``start_layer`` > 0 the run resumes there from ``prefix``,
        the differences ``y − ỹ`` of the writers before it (see :meth:`differences`); only
        masks of edges into layers ≥ ``start_layer`` (and the logits) then matter.
        With ``probe`` the backward also gives ``∂L/∂x_i · probe.differences_j`` per edge
        in ``probe.weights.grad`` (see :class:`Probe`); the logits do not change.
        """
        graph, adapter, ctx, cf = self.graph, self.adapter, prepared.clean, prepared.corrupted
        if edges.shape != (graph.n_edges,):
            raise ArgumentError(f"edge masks must have shape ({graph.n_edges},) for this graph, got {tuple(edges.shape)}")
        if nodes is not None and nodes.shape != (graph.n_writers,):
            raise ArgumentError(f"node masks must have shape ({graph.n_writers},), got {tuple(nodes.shape)}")
        if start_layer and (prefix is None or len(prefix) != graph.first_writer(start_layer)):
            raise ArgumentError(f"resuming at layer {start_layer} needs the first {graph.first_writer(start_layer)} "
                             "writers' differences as prefix")
        dtype = cf.writers.dtype
        edges = edges.to(dtype)
        if nodes is not None:
            edges = edges * nodes.to(dtype)[graph.edge_writers.to(edges.device)]
        groups, offsets = graph.groups, graph.offsets
        delta = prefix if start_layer else ctx.embeddings.unsqueeze(0) - cf.writers[:1]
        with self._stand_ins(qkv=True):
            for layer in range(start_layer, adapter.n_layers):
                g = 4 * layer  # the layer's q, k, v, mlp groups; q/k/v are contiguous and read the same writers
                first = graph.first_writer(layer)
                readers = groups[g].n_readers + groups[g + 1].n_readers + groups[g + 2].n_readers
                z = edges[offsets[g] : offsets[g + 3]].view(readers, first)
                x = _mix(cf.stages[2 * layer], z, delta)
                if probe is not None:
                    x = probe.attach(x, offsets[g], offsets[g + 3], first)
                heads = self._attention(layer, ctx, adapter.attn_norm(layer)(x))
                mlp_reads = groups[g + 3].n_writers
                delta = torch.cat([delta, heads - cf.writers[first : first + adapter.n_heads]])
                z = edges[offsets[g + 3] : offsets[g + 4]].view(1, mlp_reads)
                x = _mix(cf.stages[2 * layer + 1], z, delta[:mlp_reads])
                if probe is not None:
                    x = probe.attach(x, offsets[g + 3], offsets[g + 4], mlp_reads)
                x = x[0]
                mlp = adapter.mlp(layer)(adapter.mlp_norm(layer)(x))
                delta = torch.cat([delta, (mlp - cf.writers[graph.mlp_writer(layer)]).unsqueeze(0)])
        x = _mix(cf.stages[-1], edges[offsets[-2] :].view(1, -1), delta[:, :, -1])
        if probe is not None:
            x = probe.attach(x, offsets[-2], offsets[-1], graph.n_writers, last=True)
        x = x[0]
        return _at_least_float32(adapter.lm_head()(adapter.final_norm()(x)))

    @torch.no_grad()
    def differences(self, prepared: Prepared) -> torch.Tensor:
        """``y − ỹ`` of every writer ``(W, B, T, d)`` in the unmasked model (every mask 1)."""
        return self.counterfactual(prepared.clean).writers - prepared.corrupted.writers

    # --- pieces ----------------------------------------------------------
    def _o_bias(self, layer: int) -> torch.Tensor | float:
        bias = self.weights[layer].o_bias
        return 0.0 if bias is None else bias

    def _attention(self, layer: int, ctx: Context, normed: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``(H, B, T, d)`` of ``layer``'s attention.

        ``normed`` is ``(B, T, d)`` (every head reads it: the projections run as usual)
        or ``(R, B, T, d)``: one input per q, k and v reader, projected per head here.
        """
        w = self.weights[layer]
        attention = self.adapter.attention(layer)
        shape = normed.shape[-3:]
        if normed.dim() == 4:
            self._give_projections(layer, normed)
        args, kwargs, by_keyword = ctx.attention_calls[layer]
        hidden = normed if normed.dim() == 3 else normed.new_zeros(()).expand(shape)
        if by_keyword:
            attention(*args, hidden_states=hidden, **kwargs)
        else:
            attention(hidden, *args, **kwargs)
        z = self._recorders[layer].value[..., w.in_index]  # (B, T, H, d_head)
        heads = torch.bmm(z.flatten(0, 1).transpose(0, 1), w.o)  # (H, B·T, d)
        return heads.unflatten(1, shape[:2])

    def _give_projections(self, layer: int, normed: torch.Tensor) -> None:
        w = self.weights[layer]
        B, T = normed.shape[1:3]
        outputs, start = {}, 0
        for component in QKV:
            matrix, bias = w.qkv[component]
            x = normed[start : start + len(matrix)].flatten(1, 2)  # (heads, B·T, d)
            start += len(matrix)
            y = torch.bmm(x, matrix)
            if bias is not None:
                y = y + bias.unsqueeze(1)
            outputs[component] = y.transpose(0, 1).reshape(B, T, -1)  # head-major columns
        for path, (components, order) in w.layouts.items():
            self._givens[path].value = torch.cat([outputs[c] for c in components], dim=-1)[..., order]

    @contextlib.contextmanager
    def _stand_ins(self, qkv: bool) -> Iterator[None]:
        """Swap the output projections (and, with ``qkv``, the q/k/v ones) for stand-ins during the block."""
        swaps: dict[str, nn.Module] = {}
        self._recorders = [_Recorder(self.adapter.d_model) for _ in range(self.adapter.n_layers)]
        self._givens = {}
        for layer, w in enumerate(self.weights):
            swaps[self.adapter.site(layer, "o").path] = self._recorders[layer]
            if qkv:
                for path in w.layouts:
                    swaps[path] = self._givens[path] = _Given()
        originals = {path: self.model.get_submodule(path) for path in swaps}
        try:
            for path, module in swaps.items():
                _set_submodule(self.model, path, module)
            yield
        finally:
            for path, module in originals.items():
                _set_submodule(self.model, path, module)


class _Attributed(torch.autograd.Function):
    """Identity on a reader group's inputs ``(R, ...)``; its backward dots their gradient with fixed differences.

    The gradient reaching ``weights`` ``(R, W)`` is ``Σ ∂L/∂x_r · differences_w``: the EAP
    product for writer ``w``'s fixed ``y − ỹ``, whatever the forward mixed in (an
    integrated-gradients step runs the model off the clean point but scores the clean one).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weights: torch.Tensor, differences: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(differences)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (differences,) = ctx.saved_tensors
        products = grad.flatten(1).to(differences.dtype) @ differences.flatten(1).T  # (R, W)
        return grad, products.float(), None


@dataclass
class Probe:
    """Per-edge weights ``(E,)`` (ones, requiring grad) and every writer's fixed difference ``(W, B, T, d)``.

    Passed to :meth:`EdgeForward.logits`, it leaves the logits alone and after the backward
    ``weights.grad`` holds ``∂L/∂x_i · differences_j`` for every edge ``j → i``.
    """

    weights: torch.Tensor
    differences: torch.Tensor

    def attach(self, x: torch.Tensor, start: int, stop: int, n_writers: int, last: bool = False) -> torch.Tensor:
        differences = self.differences[:n_writers, :, -1] if last else self.differences[:n_writers]
        return _Attributed.apply(x, self.weights[start:stop].view(len(x), n_writers), differences)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits go up to float32 for the softmax; float64 ones stay (finite-difference checks)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _mix(base: torch.Tensor, z: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``base + Σ_w z[r, w]·delta[w]`` for every reader ``r``: one matrix product, ``(R, *base.shape)``."""
    mixed = (z @ delta.flatten(1)).view(len(z), *delta.shape[1:])
    return base + mixed


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)
