"""eigenfast.score against the slow, obvious algorithm (eigenfast.testing.reference): hooks,
explicit E_i, every pair; the SVD cache; and a per-batch loop free of host synchronisation."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import eigenfast
from eigenfast.adapters import get_adapter
from eigenfast.eigenprune import graph_budget, scoring, svd
from eigenfast.testing.reference import naive_scores, reference_pipeline

from conftest import make_data, make_model


def assert_close(ours: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> None:
    scale = ref.abs().max().item() if scale is None else scale
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


@pytest.mark.parametrize("pairs", ["all", "shift"])
def test_mean_score_equals_naive_mean_over_pairs(pairs):
    model = make_model("llama")  # GQA: shared k/v heads
    data = make_data(n=7, length=5, padded=True)
    components = ("q", "k", "o", "mlp_out")
    scores = eigenfast.score(model, data, components=components, pairs=pairs, batch_size=3, reduce="mean")
    for layer in range(2):
        for component in components:
            ref = naive_scores(model, data, layer, component, pairs, batch_size=3, reduce="mean")
            # A mean of ΔL cancels a lot: compare at the scale of the max, not of the mean.
            top = naive_scores(model, data, layer, component, pairs, batch_size=3).abs().max().item()
            assert_close(scores[(layer, component)], ref, scale=top)
            assert ref.abs().max() > 1e-3 * top  # a real check, not zeros against zeros


def test_reference_pipeline_equals_shift_scores():
    model = make_model("gpt2")
    data = make_data(n=6, length=5)
    ours = eigenfast.score(model, data, components=("k", "mlp_in"), pairs="shift", batch_size=3)
    ref = reference_pipeline(model, data, ("k", "mlp_in"), batch_size=3)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-3, atol=1e-3 * ref[key].abs().max().item())


def test_scores_do_not_depend_on_batch_size(family):
    model = make_model(family)
    data = make_data(n=10, length=6, padded=True)
    one = eigenfast.score(model, data, components=("k", "o", "mlp_out"), batch_size=1)
    many = eigenfast.score(model, data, components=("k", "o", "mlp_out"), batch_size=4)
    for key in one:
        assert_close(many[key], one[key].double())


def test_singular_values_are_ordered_and_heads_follow_gqa():
    model = make_model("mistral")  # one KV head for four query heads
    attribution = scoring.attribute(model, make_data(), components=("q", "k", "v"), progress=False)
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
        ({"reduce": "sum"}, "reduce must be one of"),
    ],
)
def test_score_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eigenfast.score(make_model("gpt2"), make_data(), **kwargs)


# --------------------------------------------------------------------------- SVD cache


@pytest.fixture
def svd_calls(monkeypatch):
    calls = []
    real = svd.thin_svd

    def counting(A):
        calls.append(tuple(A.shape))
        return real(A)

    monkeypatch.setattr(svd, "thin_svd", counting)
    return calls


def test_second_score_call_does_no_svd(svd_calls):
    model, data = make_model("gpt2", seed=3), make_data()
    first = eigenfast.score(model, data, components=("q", "o", "mlp_in"))
    assert len(svd_calls) == 6  # 2 layers x 3 sites
    second = eigenfast.score(model, data, components=("q", "o", "mlp_in"))
    assert len(svd_calls) == 6
    for key in first:
        assert torch.equal(first[key], second[key])


def test_prune_auto_does_one_svd_per_site(svd_calls):
    eigenfast.prune(make_model("gpt2", seed=4), make_data(n=16), p="auto", components=("k",), progress=False)
    assert len(svd_calls) == 2


def test_inplace_weight_edit_or_new_module_recomputes(svd_calls):
    model, data = make_model("gpt2", seed=5), make_data()
    before = eigenfast.score(model, data, components=("k",), layers=[0])
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(1.5)
    after = eigenfast.score(model, data, components=("k",), layers=[0])
    assert len(svd_calls) == 2
    assert not torch.allclose(before[(0, "k")], after[(0, "k")])
    # The edited scores are the fresh ones, not a stale mix: equal to a cold cache's.
    svd._CACHE.clear()
    torch.testing.assert_close(eigenfast.score(model, data, components=("k",), layers=[0])[(0, "k")], after[(0, "k")])
    model.transformer.h[0].attn.c_attn = copy.deepcopy(model.transformer.h[0].attn.c_attn)
    eigenfast.score(model, data, components=("k",), layers=[0])
    assert len(svd_calls) == 4


# --------------------------------------------------------------------------- no host synchronisation

# Ops whose output shape or host value depends on tensor data: each one waits for the device.
DATA_DEPENDENT = {"nonzero", "item", "_local_scalar_dense", "masked_select", "unique", "is_nonzero", "equal"}


class CountDataDependent(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in DATA_DEPENDENT or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def watch_batches(monkeypatch, make_mode):
    """Run every per-batch pass of ``score`` inside a fresh ``make_mode()``; return the modes."""
    modes = []
    for name in ("_pass1_batch", "_pass2_batch"):
        real = getattr(scoring, name)

        def watched(*args, _real=real, **kwargs):
            mode = make_mode()
            modes.append(mode)
            with mode:
                return _real(*args, **kwargs)

        monkeypatch.setattr(scoring, name, watched)
    return modes


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("pairs", ["all", "shift"])
def test_batch_loop_has_no_data_dependent_ops(monkeypatch, pairs, reduce):
    model = make_model("llama")
    data = make_data(n=10, length=6, padded=True)
    modes = watch_batches(monkeypatch, CountDataDependent)
    eigenfast.score(model, data, components=("q", "o", "mlp_out"), pairs=pairs, batch_size=4, reduce=reduce)
    assert len(modes) >= 3
    assert [m.seen for m in modes] == [[] for _ in modes]


def test_watcher_sees_boolean_indexing():
    """The check above can fail: a boolean-mask selection or a nonzero is caught."""
    with CountDataDependent() as mode:
        x = torch.arange(6.0)
        x[x > 2].sum()
        x.nonzero()
    assert mode.seen == ["index", "nonzero"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("pairs", ["all", "shift"])
def test_batch_loop_never_syncs_on_gpu(monkeypatch, pairs, reduce):
    model = make_model("llama").cuda()
    data = make_data(n=10, length=6, padded=True)

    @contextlib.contextmanager
    def sync_errors():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    watch_batches(monkeypatch, sync_errors)
    eigenfast.score(model, data, components=("q", "o", "mlp_out"), pairs=pairs, batch_size=4, reduce=reduce)


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("pairs", ["all", "shift"])
def test_kept_pass1_graphs_give_the_same_scores(monkeypatch, pairs, reduce):
    """Pass 2 on graphs pass 1 kept (all, the first only, none) equals the naive scores."""
    model = make_model("gpt2")
    data = make_data(n=7, length=5, padded=True)
    results = []
    for budget in (1 << 40, 1, 0):
        monkeypatch.setattr(graph_budget, "GRAPH_BYTES", budget)
        attribution = scoring.attribute(model, data, ("k", "o"), pairs, batch_size=3, progress=False, reduce=reduce)
        results.append(attribution.scores)
    for key in results[0]:
        ref = naive_scores(model, data, key[0], key[1], pairs, batch_size=3, reduce=reduce)
        top = naive_scores(model, data, key[0], key[1], pairs, batch_size=3).abs().max().item()
        for scores in results:
            assert_close(scores[key], ref, scale=top)


def test_graph_size_counter_keeps_no_reference_cycle():
    """Kept graphs must die with their loss, without waiting for the garbage collector."""
    import gc
    import weakref

    x = torch.randn(50, 50, requires_grad=True)
    counter = scoring._SavedBytes()
    gc.disable()
    try:
        with counter:
            y = torch.exp(x)  # exp saves its own output
            loss = y.sum()
        alive = weakref.ref(y)
        del y, loss
        assert alive() is None
    finally:
        gc.enable()
    assert counter.nbytes == 50 * 50 * 4


def test_prune_passes_reduce_through():
    model, data = make_model("gpt2", seed=6), make_data()
    result = eigenfast.prune(model, data, p=0.1, components=("k",), reduce="mean", progress=False)
    mean = eigenfast.score(model, data, components=("k",), reduce="mean")
    for key in mean:
        torch.testing.assert_close(result.scores[key], mean[key])
    with pytest.raises(ValueError, match="reduce must be one of"):
        eigenfast.prune(model, data, p=0.1, reduce="median")
