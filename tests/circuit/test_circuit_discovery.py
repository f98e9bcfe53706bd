"""Circuit discovery: means, hook ablation, and the fast search against a literal Algorithm 1
(eigenfast.testing.naive_discovery)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.circuit import Component, ablated, component_means, discover, extract_circuit
from eigenfast.circuit import discovery as discovery_module
from eigenfast.circuit.options import CircuitOptions
from eigenfast.circuit.synthetic import head_rates, synthetic_task
from eigenfast.rewrite.position_tables import PositionIndexError
from eigenfast.runtime.forward import last_logits
from eigenfast.runtime.metrics import kl_divergence
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
    with pytest.raises(ValueError, match="extrapolate must be one of"):
        discover(model, data, data, 0.1, extrapolate="wrap", progress=False)
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        discover(model, data, data, float("nan"), progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        discover(model, data, data, 0.1, batch_size=0, progress=False)
    with pytest.raises(TypeError):
        discover(model, data, data, 0.1, "zero")  # the options are keyword-only


def test_discovery_and_extraction_share_one_options_check():
    model, data = make_model("gpt2"), make_data()
    with pytest.raises(ValueError, match="ablation must be one of"):
        extract_circuit(model, data, data, 0.1, ablation="resample", progress=False)
    with pytest.raises(ValueError, match="extrapolate must be one of"):
        CircuitOptions(0.1, extrapolate="wrap")
    assert CircuitOptions(1).threshold == 1.0 and isinstance(CircuitOptions(1).threshold, float)


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


@pytest.mark.parametrize("n_val", [1, 5, 40])
def test_discover_matches_algorithm_1_as_D_v_grows(n_val):
    """A whole layer stacked per forward (|D_v| = 1), a few candidates (5), uneven chunks one candidate at a time (40)."""
    model = make_model("llama")
    patch, val = make_data(12, 6, padded=True), make_data(n_val, 7, seed=4, padded=True)
    alpha = median_alpha(model, patch, val, "mean", True)
    found = discover(model, patch, val, alpha, include_mlps=True, batch_size=16, progress=False)
    heads, mlps, trace = naive_discover(model, patch, val, alpha, include_mlps=True)
    assert (found.heads, found.mlps) == (heads, mlps)
    assert [s.pruned for s in found.kl_trace] == [p for *_, p in trace]
    torch.testing.assert_close(
        torch.tensor([s.kl_after for s in found.kl_trace]), torch.tensor([k for _, _, k, _ in trace]), atol=1e-6, rtol=1e-4
    )



@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_last_position_only_below_a_dead_top_layer(family, ablation):
    """The top layer's heads write nothing, so all are pruned: layer 0's candidates then run their output
    projection and both MLPs at the last position alone, and must still agree with Algorithm 1."""
    model = make_model(family)
    adapter = get_adapter(model)
    with torch.no_grad():
        projection_matrix(model.get_submodule(adapter.site(1, "o").path)).zero_()
    patch, val = make_data(12, 6, padded=True), make_data(8, 7, seed=1, padded=True)
    found = discover(model, patch, val, 1e-6, ablation=ablation, include_mlps=True, batch_size=24, progress=False)
    heads, mlps, trace = naive_discover(model, patch, val, 1e-6, ablation=ablation, include_mlps=True)
    assert (found.heads, found.mlps) == (heads, mlps)
    assert not any(layer == 1 for layer, _ in found.heads) and any(layer == 0 for layer, _ in found.heads)
    torch.testing.assert_close(
        torch.tensor([s.kl_after for s in found.kl_trace]), torch.tensor([k for _, _, k, _ in trace]), atol=1e-6, rtol=1e-4
    )

# --- host synchronisation and hooks ---------------------------------------------

# Ops whose result the host must wait for, or whose output shape depends on the data.
SYNC_OPS = {
    "aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default", "aten.equal.default",
    "aten.nonzero.default", "aten.nonzero_static.default", "aten.masked_select.default", "aten._unique2.default",
    "aten.unique_consecutive.default", "aten.unique_dim.default", "aten.repeat_interleave.Tensor",
}


class SyncCounter(TorchDispatchMode):
    """Counts host-synchronising / data-dependent ops, boolean-mask indexing included, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNC_OPS or (name.startswith("aten.index") and _bool_index(args)):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    return any(
        isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a)
        for a in args
    )


def test_sync_counter_sees_syncs():
    x = torch.arange(4.0)
    with SyncCounter() as counter:
        float(x.sum()), x[x > 1], x.nonzero(), bool(x[1])
    assert sum(counter.counts.values()) == 4


@pytest.mark.parametrize("batch_size", [4, 24], ids=["chunked", "speculative"])
def test_search_reads_the_device_once_per_group(family, batch_size, monkeypatch):
    """The search's only host syncs are one read of each stacked group's decisions: none per chunk of D_v,
    per candidate, per layer or per hook. (The final copy of the KL values is not an op on a CPU tensor.)"""
    model = make_model(family)
    patch, val = make_data(12, 6, padded=True), make_data(8, 7, seed=1, padded=True)
    counter = SyncCounter()
    search = discovery_module._search

    def counted(*args, **kwargs):
        with counter:
            return search(*args, **kwargs)

    monkeypatch.setattr(discovery_module, "_search", counted)
    found = discover(model, patch, val, 0.05, include_mlps=True, batch_size=batch_size, progress=False)
    assert counter.counts == {"aten._local_scalar_dense.default": found.rounds}
    if batch_size == 4:  # two chunks of D_v, one candidate per group
        assert found.rounds == found.evaluations == len(found.kl_trace)
    else:
        assert found.rounds < len(found.kl_trace)


def test_discovery_leaves_the_modules_alone(family):
    """Skipping pruned blocks is done with hooks: no module's forward is replaced, and no hook outlives the call."""
    model = make_model(family)
    patch, val = make_data(12, 6, padded=True), make_data(8, 7, seed=1, padded=True)
    patched = []

    def check(module, args, output):
        patched.extend(name for name, m in model.named_modules() if "forward" in vars(m))

    handle = model.get_output_embeddings().register_forward_hook(check)
    found = discover(model, patch, val, float("inf"), include_mlps=True, progress=False)
    handle.remove()
    assert found.heads == [] and not patched
    assert not any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules()
    ), "a hook outlived discovery"
