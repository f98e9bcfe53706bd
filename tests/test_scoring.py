"""eigenfast.score against the slow, obvious algorithm: hooks, explicit E_i, every pair."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.data import TaskData

from conftest import make_data, make_model


def capture(model, data: TaskData, path: str):
    """Input x (N, T, d_in) and output gradient g (N, T, d_out) of one module, whole data at once."""
    module = model.get_submodule(path)
    seen = {}

    def hook(mod, args, out):
        seen["x"] = args[0].detach()
        out.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    handle = module.register_forward_hook(hook)
    logits = model(**data.model_inputs()).logits[:, -1]
    torch.nn.functional.cross_entropy(logits, data.labels, reduction="sum").backward()
    handle.remove()
    model.zero_grad()
    return seen["x"].double(), seen["g"].double()


def head_terms(A: torch.Tensor, site, head: int):
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


def naive_scores(model, data: TaskData, layer: int, component: str, pairs: str, batch_size: int) -> torch.Tensor:
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
            row.append(delta[allowed].max())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("pairs", ["all", "shift"])
def test_score_equals_naive_loop(config_name, pairs):
    model = make_model(config_name)
    data = make_data(n=7, length=5, padded=True)
    components = get_adapter(model).components()
    scores = eigenfast.score(model, data, components=components, pairs=pairs, batch_size=3)
    for layer in range(2):
        for component in components:
            ref = naive_scores(model, data, layer, component, pairs, batch_size=3)
            assert scores[(layer, component)].shape == ref.shape
            assert_close(scores[(layer, component)], ref)


def test_scores_do_not_depend_on_batch_size(family):
    model = make_model(family)
    data = make_data(n=10, length=6, padded=True)
    one = eigenfast.score(model, data, components=("k", "o", "mlp_out"), batch_size=1)
    many = eigenfast.score(model, data, components=("k", "o", "mlp_out"), batch_size=4)
    for key in one:
        assert_close(many[key], one[key].double())


def test_singular_values_are_ordered_and_heads_follow_gqa():
    model = make_model("mistral")  # one KV head for four query heads
    attribution = eigenfast.scoring.attribute(model, make_data(), components=("q", "k", "v"), progress_bar=False)
    scores = attribution.scores
    assert scores[(0, "q")].shape == (4, 8)
    assert scores[(0, "k")].shape == (1, 8)
    assert scores[(1, "v")].shape == (1, 8)
    attention = model.model.layers[0].self_attn
    for (layer, component), stats in attribution.stats.items():
        s = stats.factors.s
        assert s.shape == scores[(layer, component)].shape
        assert bool((s[:, 1:] <= s[:, :-1]).all()), f"{component}: singular values not descending"
    # Score i belongs to the i-th largest singular value of that head's own slice of the weight.
    for component, heads in (("q", 4), ("k", 1)):
        weight = getattr(attention, f"{component}_proj").weight.detach().double()  # (heads * 8, d_model) = Aᵀ
        for head in range(heads):
            expected = torch.linalg.svdvals(weight[head * 8 : (head + 1) * 8].T)
            torch.testing.assert_close(attribution.stats[(0, component)].factors.s[head], expected)


def test_score_leaves_model_untouched(family):
    model = make_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    eigenfast.score(model, make_data(), components=("q", "mlp_in"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pairs": "some"}, "pairs must be one of"),
        ({"components": ("nope",)}, "unknown component"),
        ({"components": ("mlp_gate",)}, "no 'mlp_gate' matrix"),
        ({"batch_size": 0}, "batch_size must be"),
    ],
)
def test_score_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eigenfast.score(make_model("gpt2"), make_data(), **kwargs)
