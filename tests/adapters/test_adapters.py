"""The adapters' head index tables mean what they claim, checked through the model's real forward."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.adapters import get_adapter, head_matrices, projection_matrix

from conftest import make_data, make_model


def perturb(model, site, head: int, generator: torch.Generator) -> None:
    """Add noise to the weight entries that belong to one head of one site."""
    module = model.get_submodule(site.path)
    A = projection_matrix(module)
    with torch.no_grad():
        if site.out_index is not None:
            cols = site.out_index[head]
            A[:, cols] += torch.randn(A.shape[0], cols.numel(), generator=generator)
        else:
            rows = site.in_index[head]
            A[rows, :] += torch.randn(rows.numel(), A.shape[1], generator=generator)


def silence(model, site, heads) -> None:
    """Zero the given heads' output-projection rows: nothing they compute reaches the residual."""
    A = projection_matrix(model.get_submodule(site.path))
    with torch.no_grad():
        for h in heads:
            A[site.in_index[h], :] = 0


def logits(model, data):
    with torch.no_grad():
        return model(**data.model_inputs()).logits


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_head_columns_feed_the_head_that_owns_them(config_name, component):
    model = make_model(config_name)
    adapter = get_adapter(model)
    data = make_data(n=3, length=5)
    site = adapter.site(0, component)
    group = adapter.n_heads // site.heads  # query heads reading each KV head
    g = torch.Generator().manual_seed(0)
    for head in range(site.heads):
        readers = range(head * group, (head + 1) * group) if component != "q" else [head]
        silenced = make_model(config_name)
        silence(silenced, adapter.site(0, "o"), readers)
        before = logits(silenced, data)
        perturb(silenced, get_adapter(silenced).site(0, component), head, g)
        torch.testing.assert_close(logits(silenced, data), before, rtol=0, atol=1e-6)
        other = (head + 1) % site.heads
        if other != head:
            perturb(silenced, get_adapter(silenced).site(0, component), other, g)
            assert not torch.allclose(logits(silenced, data), before, atol=1e-4)


def test_head_blocks_rebuild_the_matrix(config_name):
    model = make_model(config_name)
    adapter = get_adapter(model)
    for component in adapter.components():
        site = adapter.site(1, component)
        A = projection_matrix(model.get_submodule(site.path))
        blocks = head_matrices(A, site)
        assert blocks.shape[0] == site.heads
        if site.out_index is not None:
            torch.testing.assert_close(blocks[0], A[:, site.out_index[0]])
        elif site.in_index is not None:
            torch.testing.assert_close(torch.cat(list(blocks)), A)
        else:
            torch.testing.assert_close(blocks[0], A)


def test_unsupported_model_error_names_supported_types():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "bert"})()

    with pytest.raises(eigenfast.UnsupportedModelError, match="unsupported model type 'bert'.*gpt2.*phi"):
        get_adapter(Fake())


def test_missing_components_and_layers_are_named():
    adapter = get_adapter(make_model("gpt2"))
    with pytest.raises(ValueError, match="GPT-2 models have no 'mlp_gate'"):
        adapter.site(0, "mlp_gate")
    with pytest.raises(ValueError, match="layer 5 out of range: the model has 2 layers"):
        adapter.site(5, "k")
