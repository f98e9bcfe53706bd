"""Slow, obvious references for the edge methods: a hook-per-edge forward, literal ACDC, finite differences."""
from __future__ import annotations

import torch

from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.data.task_data import TaskData
from eigenfast.edges.graph import EdgeGraph


def _attention_calls(model, batch: TaskData) -> tuple[torch.Tensor, list]:
    adapter = get_adapter(model)
    calls, emb = [], []
    hooks = [adapter.layers()[0].register_forward_pre_hook(
        lambda m, a, k: emb.append(a[0] if a else k["hidden_states"]), with_kwargs=True)]
    for layer in range(adapter.n_layers):
        hooks.append(adapter.attention(layer).register_forward_pre_hook(
            lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True))
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=batch.input_ids.to(device), attention_mask=batch.mask.to(device),
              position_ids=batch.position_ids.to(device), use_cache=False)
    for h in hooks:
        h.remove()
    return emb[0], calls


def naive_run(model, batch: TaskData, edge_value, counterfactual: dict | None) -> tuple[torch.Tensor, dict, dict]:
    """Logits (B, V), every writer's output and every reader's input, mixing inputs edge by edge in Python.

    ``edge_value(writer, reader)`` is the edge's mask; a mask below 1 needs ``counterfactual``.
    """
    adapter = get_adapter(model)
    emb, calls = _attention_calls(model, batch)
    emb = emb.detach().requires_grad_(torch.is_grad_enabled())  # every reader input then has a gradient
    writers = {"emb": emb}
    const = torch.zeros_like(emb)  # the output projections' biases, which belong to no head
    inputs = {}

    def read(names, reader, base):
        x = base.clone()
        for w in names:
            z = edge_value(w, reader)
            x = x + z * writers[w] + ((1 - z) * counterfactual[w] if z != 1 else 0)
        if x.requires_grad:
            x.retain_grad()
        inputs[reader] = x
        return x

    for layer in range(adapter.n_layers):
        before = list(writers)
        norm = adapter.attn_norm(layer)
        outputs = {}
        for component in ("q", "k", "v"):
            site = adapter.site(layer, component)
            module = model.get_submodule(site.path)
            out = outputs.setdefault(site.path, emb.new_zeros(*emb.shape[:2], projection_matrix(module).shape[1]))
            for head in range(site.heads):
                y = module(norm(read(before, f"L{layer}.H{head}.{component}", const)))
                out[..., site.out_index[head]] = y[..., site.out_index[head]]
        o_site = adapter.site(layer, "o")
        o_proj = model.get_submodule(o_site.path)
        taken = []
        hooks = [model.get_submodule(path).register_forward_hook(lambda m, a, o, _v=value: _v)
                 for path, value in outputs.items()]
        hooks.append(o_proj.register_forward_pre_hook(lambda m, a: taken.append(a[0])))
        args, kwargs = calls[layer]
        if args:
            adapter.attention(layer)(torch.zeros_like(emb), *args[1:], **kwargs)
        else:
            adapter.attention(layer)(**{**kwargs, "hidden_states": torch.zeros_like(emb)})
        for h in hooks:
            h.remove()
        z = taken[0]
        bias = o_proj(torch.zeros_like(z))
        for head in range(adapter.n_heads):
            only = torch.zeros_like(z)
            only[..., o_site.in_index[head]] = z[..., o_site.in_index[head]]
            writers[f"L{layer}.H{head}"] = o_proj(only) - bias
        # A parallel block's MLP reads the layer's input: neither its heads nor their bias.
        mlp_reads, mlp_base = (before, const) if adapter.parallel else (list(writers), const + bias)
        x = read(mlp_reads, f"L{layer}.MLP", mlp_base)
        writers[f"L{layer}.MLP"] = adapter.mlp(layer)(adapter.mlp_norm(layer)(x))
        const = const + bias
    x = read(list(writers), "logits", const)
    return adapter.lm_head()(adapter.final_norm()(x[:, -1])), writers, inputs


def naive_masked_logits(model, clean: TaskData, corrupted: TaskData, edges: torch.Tensor) -> torch.Tensor:
    graph = EdgeGraph.of(get_adapter(model))
    values = dict(zip(graph.edge_names, edges.tolist()))
    with torch.no_grad():
        _, cf, _ = naive_run(model, corrupted, lambda w, r: 1.0, None)
        logits, _, _ = naive_run(model, clean, lambda w, r: values[(w, r)], cf)
    return logits


def naive_eap(model, clean: TaskData, corrupted: TaskData) -> torch.Tensor:
    """(ỹ_j − y_j)·∂L/∂x_i for every edge, with ∂L/∂x_i from autograd on each reader's input."""
    graph = EdgeGraph.of(get_adapter(model))
    with torch.no_grad():
        _, cf, _ = naive_run(model, corrupted, lambda w, r: 1.0, None)
    logits, writers, inputs = naive_run(model, clean, lambda w, r: 1.0, None)
    torch.nn.functional.cross_entropy(logits, clean.labels).backward()
    return torch.tensor([float(((cf[w] - writers[w].detach()) * inputs[r].grad).sum()) for w, r in graph.edge_names])


def naive_integrated(model, clean: TaskData, corrupted: TaskData, nodes: list[set[str]], alphas: list[float]) -> torch.Tensor:
    """EAP-IG written out: for each node set and α, that set's writers read ``ỹ + α(y − ỹ)`` everywhere,
    ∂L/∂x of every reader is taken by autograd, averaged, and dotted with the clean-minus-corrupted difference."""
    graph = EdgeGraph.of(get_adapter(model))
    with torch.no_grad():
        _, cf, _ = naive_run(model, corrupted, lambda w, r: 1.0, None)
        _, full, _ = naive_run(model, clean, lambda w, r: 1.0, None)
    gradients: dict[str, torch.Tensor] = {}
    for moving in nodes:
        for alpha in alphas:
            logits, _, inputs = naive_run(model, clean, lambda w, r: alpha if w in moving else 1.0, cf)
            torch.nn.functional.cross_entropy(logits, clean.labels).backward()
            for reader, x in inputs.items():
                gradients[reader] = gradients.get(reader, 0) + x.grad / (len(nodes) * len(alphas))
    return torch.tensor([float(((cf[w] - full[w]) * gradients[r]).sum()) for w, r in graph.edge_names],
                        dtype=torch.float64)


def naive_exact_patching(model, clean: TaskData, corrupted: TaskData) -> torch.Tensor:
    """Per edge: the mean cross-entropy of the label with that edge alone at its counterfactual, minus the
    unpatched one, each a whole hook-per-edge forward."""
    graph = EdgeGraph.of(get_adapter(model))

    def loss(edges: torch.Tensor) -> float:
        logits = naive_masked_logits(model, clean, corrupted, edges)
        return float(torch.nn.functional.cross_entropy(logits.double(), clean.labels))

    full = loss(torch.ones(graph.n_edges))
    return torch.tensor([loss(1.0 - torch.nn.functional.one_hot(torch.tensor(e), graph.n_edges).double()) - full
                         for e in range(graph.n_edges)], dtype=torch.float64)
