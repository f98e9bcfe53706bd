"""Circuit discovery: means, hook ablation, and the fast search against a literal Algorithm 1
(eigenfast.testing.naive_discovery)."""
from __future__ import annotations

import pytest
import torch

from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.circuit import Component, ablated, component_means, discover
from eigenfast.circuit.discovery import kl_divergence
from eigenfast.circuit.synthetic import head_rates, synthetic_task
from eigenfast.forward import last_logits
from eigenfast.modules import PositionIndexError
from eigenfast.testing.naive_discovery import naive_discover

from conftest import make_data, make_model


def median_alpha(model, patch, val, ablation, include_mlps) -> float:
    """A threshold that prunes some components and keeps others: midway between the middle two
    steps of pruning everything (never equal to a step's delta, where rounding could flip a decision)."""
    steps = discover(model, patch, val, float("inf"), ablation=ablation, include_mlps=include_mlps, progress=False).kl_trace
    deltas = sorted(s.delta for s in steps)
    middle = len(deltas) // 2
    return (deltas[middle - 1] + deltas[middle]) / 2


# --- means and hook ablation --------------------------------------------------


def test_ablating_nothing_changes_nothing(family):
    model, data = make_model(family), make_data(8, 7, seed=1, padded=True)
    adapter = get_adapter(model)
    means = component_means(model, make_data(10, 6, padded=True))
    base = last_logits(adapter, data)
    for ablation in ("mean", "zero"):
        with torch.no_grad(), ablated(model, [], [], means, ablation):
            assert torch.equal(last_logits(adapter, data), base)


def test_mean_ablation_on_its_own_data_is_exact(family):
    """With D_a one example, every mean is that example's own output: ablating everything changes nothing."""
    model, one = make_model(family), make_data(1, 6, seed=3)
    adapter = get_adapter(model)
    means = component_means(model, one)
    everything = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]
    with torch.no_grad(), ablated(model, everything, range(adapter.n_layers), means):
        logits = last_logits(adapter, one)
    torch.testing.assert_close(logits, last_logits(adapter, one), atol=1e-5, rtol=0)


def test_zero_ablating_a_head_is_zeroing_its_output_weights(family):
    model, data = make_model(family), make_data(6, 5, padded=True)
    adapter = get_adapter(model)
    with torch.no_grad(), ablated(model, [(1, 2), (0, 0)], [], ablation="zero"):
        hooked = last_logits(adapter, data)
    with torch.no_grad():
        for layer, head in [(1, 2), (0, 0)]:
            site = adapter.site(layer, "o")
            projection_matrix(model.get_submodule(site.path))[site.in_index[head]] = 0.0
        torch.testing.assert_close(hooked, last_logits(adapter, data), atol=1e-5, rtol=0)


def test_means_past_the_calibration_length():
    model = make_model("llama")
    adapter = get_adapter(model)
    means = component_means(model, make_data(6, 4))
    longer = make_data(4, 7, seed=2)
    with torch.no_grad():
        with pytest.raises(PositionIndexError, match="calibration length 4"):
            with ablated(model, [(0, 1)], [1], means, extrapolate="error"):
                last_logits(adapter, longer)
        for rule in ("mean", "last"):
            with ablated(model, [(0, 1)], [1], means, extrapolate=rule):
                assert torch.isfinite(last_logits(adapter, longer)).all()


def test_bad_arguments():
    model, data = make_model("gpt2"), make_data()
    with pytest.raises(ValueError, match="no such component"):
        with ablated(model, [(5, 0)], [], ablation="zero"):
            pass
    with pytest.raises(ValueError, match="needs the component means"):
        with ablated(model, [(0, 0)]):
            pass
    with pytest.raises(ValueError, match="ablation must be one of"):
        discover(model, data, data, 0.1, ablation="resample", progress=False)
    with pytest.raises(ValueError, match="patch_data"):
        discover(model, None, data, 0.1, progress=False)


# --- discovery ----------------------------------------------------------------


@pytest.mark.parametrize("include_mlps", [False, True], ids=["heads", "mlps"])
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_discover_matches_algorithm_1(family, ablation, include_mlps):
    model = make_model(family)
    patch, val = make_data(12, 6, padded=True), make_data(8, 7, seed=1, padded=True)
    alpha = median_alpha(model, patch, val, ablation, include_mlps)
    # Small groups so that speculation goes wrong and re-runs happen.
    found = discover(model, patch, val, alpha, ablation=ablation, include_mlps=include_mlps, batch_size=24, progress=False)
    heads, mlps, trace = naive_discover(model, patch, val, alpha, ablation=ablation, include_mlps=include_mlps)
    assert (found.heads, found.mlps) == (heads, mlps)
    assert 0 < len(found.kl_trace) - sum(s.pruned for s in found.kl_trace) < len(found.kl_trace)
    assert [s.component for s in found.kl_trace] == [c for c, *_ in trace]
    assert [s.pruned for s in found.kl_trace] == [p for *_, p in trace]
    torch.testing.assert_close(
        torch.tensor([s.kl_after for s in found.kl_trace]), torch.tensor([k for _, _, k, _ in trace]), atol=1e-6, rtol=1e-4
    )


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_discover_matches_algorithm_1_other_llamas(name):
    model = make_model(name)
    patch, val = make_data(12, 6, padded=True), make_data(8, 7, seed=1, padded=True)
    alpha = median_alpha(model, patch, val, "mean", True)
    found = discover(model, patch, val, alpha, include_mlps=True, progress=False)
    assert (found.heads, found.mlps) == naive_discover(model, patch, val, alpha, include_mlps=True)[:2]


def test_discover_does_not_depend_on_batch_size():
    """Chunks of D_v one candidate at a time, uneven stacks, a whole layer per forward: one answer."""
    model = make_model("neox")
    patch, val = make_data(12, 6, padded=True), make_data(8, 7, seed=1, padded=True)
    alpha = median_alpha(model, patch, val, "mean", True)
    runs = [discover(model, patch, val, alpha, include_mlps=True, batch_size=b, progress=False) for b in (3, 8, 24, 1000)]
    for run in runs[1:]:
        assert (run.heads, run.mlps) == (runs[0].heads, runs[0].mlps)
        torch.testing.assert_close(
            torch.tensor([s.kl_after for s in run.kl_trace]), torch.tensor([s.kl_after for s in runs[0].kl_trace])
        )
    assert runs[0].evaluations == len(runs[0].kl_trace)  # one candidate per forward: nothing to re-run


def test_kl_trace_is_consistent():
    model = make_model("gpt2")
    patch, val = make_data(12, 6, padded=True), make_data(8, 7, seed=1, padded=True)
    alpha = median_alpha(model, patch, val, "zero", True)
    found = discover(model, patch, val, alpha, ablation="zero", include_mlps=True, batch_size=16, progress=False)
    adapter = get_adapter(model)
    order = [Component(l, h) for l in reversed(range(2)) for h in [*range(adapter.n_heads), None]]
    assert [s.component for s in found.kl_trace] == order
    kl = 0.0
    for step in found.kl_trace:
        assert step.kl_before == kl
        assert step.delta == step.kl_after - step.kl_before
        assert step.pruned == (step.delta < alpha)
        kl = step.kl_after if step.pruned else kl
    assert found.kl == kl
    pruned = {(s.component.layer, s.component.head) for s in found.kl_trace if s.pruned and s.component.head is not None}
    assert pruned == found.pruned_heads and not pruned & set(found.heads)
    assert len(pruned) + len(found.heads) == 2 * adapter.n_heads
    # The final KL is that of the hook-ablated model.
    logp_f = torch.log_softmax(last_logits(adapter, val), dim=-1)
    with torch.no_grad(), ablated(model, found.pruned_heads, found.pruned_mlps, ablation="zero"):
        kl_final = float(kl_divergence(logp_f, last_logits(adapter, val)).mean())
    assert kl_final == pytest.approx(found.kl, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_synthetic_task_recovers_its_circuit(model_type, ablation):
    task = synthetic_task(model_type)
    found = discover(task.model, task.patch_data, task.val_data, 1e-6, ablation=ablation, progress=False)
    assert found.heads == task.true_heads
    assert head_rates(found.heads, task.true_heads, 3, 4) == (1.0, 0.0)
    # The heads outside the circuit write nothing: ablating them is exactly free.
    assert all(s.delta == 0.0 for s in found.kl_trace if s.pruned)
    assert found.evaluations > len(found.kl_trace)  # each true head broke a speculated group


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_pruning_everything_matches_algorithm_1(family, ablation):
    """Whole layers and MLPs pruned: discovery skips their work, the KL must not notice."""
    model = make_model(family)
    patch, val = make_data(12, 6, padded=True), make_data(8, 7, seed=1, padded=True)
    found = discover(model, patch, val, float("inf"), ablation=ablation, include_mlps=True, batch_size=24, progress=False)
    *_, trace = naive_discover(model, patch, val, float("inf"), ablation=ablation, include_mlps=True)
    assert found.heads == [] and found.mlps == []
    torch.testing.assert_close(
        torch.tensor([s.kl_after for s in found.kl_trace]), torch.tensor([k for _, _, k, _ in trace]), atol=1e-6, rtol=1e-4
    )
