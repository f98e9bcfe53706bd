"""The estimates beside the first-order one: integrated gradients against a float64 Riemann sum of
the exact path integral, the verified ΔL against freezing one term at a time and evaluating, and
what each costs in forwards and backwards."""
from __future__ import annotations

import copy

import pytest
import torch

import eigenfast
from eigenfast.builtin import heldout_task, load_builtin
from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.errors import ArgumentError
from eigenfast.eigenprune import scoring, verification
from eigenfast.eigenprune.freezing import freeze, select_frozen
from eigenfast.eigenprune.prune import NOTHING_BEAT_BASE
from eigenfast.runtime.hooks import Hooks
from eigenfast.testing.reference import head_terms

from conftest import make_data, make_model

SITES = ((0, "k"), (0, "mlp_out"), (1, "k"), (1, "mlp_out"))  # every k and mlp_out of the two-layer model


def test_ig_with_one_step_is_the_linear_estimate_exactly():
    model = make_model("gpt2")
    data = make_data(n=7, length=5, padded=True)
    linear = eigenfast.score(model, data, ("k", "o"), reduce="mean", batch_size=3, progress=False)
    ig = eigenfast.score(model, data, ("k", "o"), reduce="mean", batch_size=3, progress=False, estimate="ig", steps=1)
    moving = scoring.path_candidates(linear, scoring.DEFAULT_FRACTION)
    for key in linear:
        assert torch.equal(ig[key][moving[key]], linear[key][moving[key]])
        assert torch.isinf(ig[key][~moving[key]]).all()  # off the path: never frozen
    # So a prune at any p up to the path's fraction freezes what the linear estimate's does.
    pruned = {estimate: eigenfast.prune(model, data, p=0.2, components=("k", "o"), reduce="mean", batch_size=3,
                                        estimate=estimate, steps=1, progress=False) for estimate in ("linear", "ig")}
    for key, mask in pruned["linear"].frozen.items():
        assert torch.equal(pruned["ig"].frozen[key], mask)


def naive_path_integral(model, data, points: int, moving: dict) -> dict:
    """(1 / (N T)) ∫_0^1 ∂L/∂c_i dα at c = α·m (m_i = 1 for the terms ``moving`` marks, 0 for the rest), every
    term's coefficient c_i written out: a module's output gains Σ_i c_i (x̄[t] - x) E_i; midpoint rule over
    ``points`` in float64. Unpadded data: every position has all N partners, so the mean-over-pairs score is
    this over N·T."""
    model = copy.deepcopy(model).double()
    adapter = get_adapter(model)
    sites = [adapter.site(layer, component) for layer, component in SITES]
    inputs = {}
    with torch.no_grad(), Hooks(model) as hooks:
        for site in sites:
            hooks.on_input(site.path, lambda x, path=site.path: inputs.__setitem__(path, x.double()))
        model(**data.model_inputs())
    means = {path: x.mean(0, keepdim=True) for path, x in inputs.items()}  # x̄[t]: no padding, N at every t
    terms = {}
    for site in sites:
        A = projection_matrix(model.get_submodule(site.path)).detach()
        terms[site.key] = torch.stack([E for h in range(site.heads) for E in head_terms(A, site, h)])
    totals = {key: torch.zeros(len(E), dtype=torch.float64) for key, E in terms.items()}
    for k in range(points):
        alpha = (k + 0.5) / points
        c = {key: (alpha * moving[key].reshape(-1).double()).requires_grad_() for key in terms}
        with Hooks(model) as hooks:
            for site in sites:
                def shift(module, args, output, site=site):
                    diff = means[site.path] - args[0]
                    return output + torch.einsum("btd,i,ide->bte", diff, c[site.key], terms[site.key])
                hooks.post(site.path, shift)
            logits = model(**data.model_inputs()).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, data.labels, reduction="sum")
        grads = torch.autograd.grad(loss, [c[key] for key in terms])
        for key, grad in zip(terms, grads):
            totals[key] += grad / points
    n, t = data.input_ids.shape
    return {key: (total / (n * t)).view(-1) for key, total in totals.items()}


def test_ig_approaches_the_exact_path_integral():
    model = make_model("gpt2")
    data = make_data(n=6, length=5)
    components = ("k", "mlp_out")
    linear = eigenfast.score(model, data, components, reduce="mean", batch_size=4, progress=False)
    moving = scoring.path_candidates(linear, scoring.DEFAULT_FRACTION)  # the lowest 30% of each type move
    assert 0 < sum(int(m.sum()) for m in moving.values()) < sum(m.numel() for m in moving.values())
    reference = naive_path_integral(model, data, 32, moving)  # midpoint rule: error O(1/points²)

    def error(steps: int) -> float:
        ig = eigenfast.score(model, data, components, reduce="mean", batch_size=4, progress=False, estimate="ig",
                             steps=steps)
        for key in ig:  # the terms that stand still are no candidates
            assert torch.isinf(ig[key][~moving[key]]).all() and torch.isfinite(ig[key][moving[key]]).all()
        on_path = {key: moving[key].reshape(-1) for key in moving}
        return max(float((ig[key].double().view(-1) - reference[key])[on_path[key]].abs().max()) for key in reference)

    scale = max(float(r[moving[key].reshape(-1)].abs().max()) for key, r in reference.items())
    coarse, fine = error(1), error(8)
    assert coarse > 0.02 * scale  # the path bends: the first-order estimate is not already the integral
    assert fine < coarse / 3  # a left Riemann sum converges as 1/steps
    assert fine < 0.05 * scale


def test_ig_needs_the_mean_over_all_pairs_and_checks_steps():
    model = make_model("gpt2")
    with pytest.raises(ArgumentError, match="reduce='mean'"):
        eigenfast.score(model, make_data(), estimate="ig")
    with pytest.raises(ArgumentError, match="steps"):
        eigenfast.score(model, make_data(), reduce="mean", estimate="ig", steps=0)
    with pytest.raises(ArgumentError, match="estimate must be one of"):
        eigenfast.prune(model, make_data(), estimate="exact")


class Counter:
    """Forwards (calls and rows through the first block) and backwards of a scoring run."""

    def __init__(self, model, monkeypatch):
        self.calls = self.rows = self.backwards = 0
        backward = torch.Tensor.backward

        def counted(tensor, *args, **kwargs):
            self.backwards += 1
            return backward(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "backward", counted)
        adapter = get_adapter(model)
        self.hooks = Hooks(model).pre(adapter.layers()[0], self.count)

    def count(self, module, args):
        self.calls += 1
        self.rows += args[0].shape[0]


@pytest.mark.parametrize("steps", [2, 5])
def test_ig_costs_steps_forward_backward_passes(monkeypatch, steps):
    model = make_model("gpt2")
    data = make_data(n=9, length=5, padded=True)
    runs = {}
    for estimate, m in (("linear", 1), ("ig", steps)):
        counter = Counter(model, monkeypatch)
        eigenfast.score(model, data, ("k",), reduce="mean", batch_size=4, progress=False, estimate=estimate, steps=m)
        counter.hooks.remove()
        runs[estimate] = (counter.calls, counter.backwards)  # now: the next run's counter wraps this one's
    linear, ig = runs["linear"], runs["ig"]
    batches = 3
    (linear_forwards, linear_backwards), (ig_forwards, ig_backwards) = linear, ig
    # The linear estimate's pass (it picks the terms the path moves), then the path's steps; pass 1's kept graphs
    # serve step 0 of each.
    assert linear_backwards == batches and ig_backwards == (1 + steps) * batches
    assert ig_forwards == 2 * linear_forwards + (steps - 1) * batches
    assert ig_forwards + ig_backwards <= (steps + 1) * (linear_forwards + linear_backwards)


def freeze_and_evaluate(model, attribution, data, key, head, index) -> float:
    """ΔL (mean per example) of freezing one term alone, through the production freezing and a full evaluation."""
    mask = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in attribution.scores.items()}
    mask[key][head, index] = True
    frozen = copy.deepcopy(model)
    freeze(frozen, attribution, mask)
    return eigenfast.evaluate(frozen, data).loss - eigenfast.evaluate(model, data).loss


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_verified_measures_each_candidate_as_freezing_it_alone_does(family, monkeypatch):
    model = make_model(family)
    data = make_data(n=7, length=5, padded=True)
    attribution = scoring.attribute(model, data, ("k", "o", "mlp_in"), reduce="mean", batch_size=3, progress=False)
    monkeypatch.setattr(verification, "STACK", 2)  # several stacked forwards per batch: 2 candidates each
    layers = get_adapter(model).layers()
    rows = [0] * len(layers)

    def count(j):
        def hook(module, args, output):
            rows[j] += (output[0] if isinstance(output, tuple) else output).shape[0]
        return hook

    with Hooks(model) as hooks:
        for j, layer in enumerate(layers):
            hooks.post(layer, count(j))
        checked = verification.verify_lowest(model, attribution, data, 0.1, batch_size=3, progress=False)
    lowest = select_frozen(attribution.scores, 0.1)
    n = sum(int(m.sum()) for m in lowest.values())
    assert checked.checked == n > 3
    per_layer = [sum(int(m.sum()) for (layer, _), m in lowest.items() if layer == j) for j in range(len(layers))]
    assert min(per_layer) > 0  # both layers hold candidates: the stacks start at different layers
    stacks = [-(-c // 2) for c in per_layer]
    # The cost: one forward of the data plus one per candidate from the candidate's layer up; below it a stack's
    # rows run once unstacked (the kept prefix).
    for j in range(len(layers)):
        assert rows[j] == len(data) * (1 + sum(per_layer[:j + 1]) + sum(stacks[j + 1:]))
    assert rows[-1] == (1 + n) * len(data)
    for key, mask in lowest.items():
        assert torch.isinf(checked.scores[key][~mask]).all()
        for head, index in mask.nonzero().tolist():
            expected = freeze_and_evaluate(model, attribution, data, key, head, index)
            assert checked.scores[key][head, index].item() == pytest.approx(expected, abs=2e-5, rel=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recheck_measures_each_dropped_term_with_the_accepted_ones_frozen(family, monkeypatch):
    model = make_model(family)
    data = make_data(n=10, length=5, padded=family == "llama")
    # Ranked by the paper's max, a third of the checked terms raise the loss when frozen alone.
    attribution = scoring.attribute(model, data, ("k", "v"), reduce="max", batch_size=4, progress=False)
    first = verification.verify_lowest(model, attribution, data, 0.3, batch_size=4, progress=False)
    dropped = {key: torch.isfinite(s) & (s > 0) for key, s in first.scores.items()}
    assert sum(int(m.sum()) for m in dropped.values()) > 0
    calls = []
    measure = verification._measure

    def recorded(model, attribution, data, candidates, *args):
        changes = measure(model, attribution, data, candidates, *args)
        calls.append((candidates, changes))
        return changes

    monkeypatch.setattr(verification, "_measure", recorded)
    second = verification.recheck_dropped(model, attribution, data, first, batch_size=4, progress=False)
    # The cost: one measuring pass over exactly the dropped terms (one forward of the data plus one per term,
    # counted by the test above), on the model with the accepted terms frozen.
    [(candidates, changes)] = calls
    assert len(candidates) == second.rechecked == sum(int(m.sum()) for m in dropped.values())
    accepted = copy.deepcopy(model)
    freeze(accepted, attribution, first.allowed)
    base = eigenfast.evaluate(accepted, data).loss
    for candidate, change in zip(candidates, changes):
        key, head, index = candidate.key, candidate.head, candidate.index
        assert dropped[key][head, index]
        both = {k: m.clone() for k, m in first.allowed.items()}
        both[key][head, index] = True
        again = copy.deepcopy(model)
        freeze(again, attribution, both)
        assert change == pytest.approx(eigenfast.evaluate(again, data).loss - base, abs=2e-5, rel=1e-3)
        assert bool(second.allowed[key][head, index]) == (change <= 0)
    for key, mask in first.allowed.items():  # round one's verdicts on the other terms stand, and its ranking
        assert torch.equal(second.allowed[key] & ~dropped[key], mask)
        assert second.scores[key] is first.scores[key]


def test_verified_prune_freezes_only_terms_measured_not_to_raise_the_loss():
    model = make_model("gpt2")
    data = make_data(n=10, length=5)
    result = eigenfast.prune(model, data, p=0.3, components=("k", "v"), reduce="max", estimate="verified",
                             progress=False)
    attribution = scoring.attribute(model, data, ("k", "v"), reduce="max", progress=False)
    first = verification.verify_lowest(model, attribution, data, 0.3, progress=False)
    second = verification.recheck_dropped(model, attribution, data, first, progress=False)
    measured = torch.cat([s.flatten() for s in result.scores.values()])
    raises = torch.isfinite(measured) & (measured > 0)
    frozen = sum(int(m.sum()) for m in result.frozen.values())
    readmitted = sum(int((second.allowed[k] & ~first.allowed[k]).sum()) for k in first.allowed)
    assert bool(raises.any()) and 0 < frozen == int((measured <= 0).sum()) + readmitted
    assert int(raises.sum()) > readmitted  # some checked terms still raise the loss with the rest frozen: kept
    for key, mask in result.frozen.items():
        assert torch.equal(mask, second.allowed[key])  # p = 0.3 freezes every checked term allowed
    assert result.report.timings["recheck"] > 0


def test_auto_counts_the_unpruned_model_and_says_when_nothing_beat_it():
    model, tokenizer = load_builtin("int_sum_gpt2")
    data = heldout_task("int_sum_gpt2", "int_sum", tokenizer).subset(range(120))
    score, val = data.split(0.5, seed=0)
    # The mean over pairs at p = 0.3 of k wrecks this model (docs/EIGENPRUNING_TABLE.md): validation must refuse it.
    result = eigenfast.prune(model, score, p="auto", candidates=(0.3,), reduce="mean", val_data=val, progress=False)
    report = result.report
    assert [c.p for c in report.candidates] == [0.0, 0.3]
    assert report.candidates[1].evaluation.accuracy < report.baseline.accuracy
    assert report.p == 0.0 and report.note == NOTHING_BEAT_BASE and NOTHING_BEAT_BASE in report.table()
    assert not any(bool(m.any()) for m in result.frozen.values())
    assert eigenfast.evaluate(result.model, val, batch_size=32).loss == report.baseline.loss  # prune's batches


@pytest.mark.parametrize("estimate", ["linear", "verified"])
def test_auto_is_never_worse_on_validation_than_the_unpruned_model(estimate):
    model = make_model("llama")
    data = make_data(n=24, length=5, padded=True)
    report = eigenfast.prune(model, data, p="auto", components=("q", "mlp_out"), reduce="mean", estimate=estimate,
                             candidates=(0.05, 0.3, 0.6), progress=False).report
    chosen = next(c for c in report.candidates if c.p == report.p)
    base = report.baseline
    assert (chosen.evaluation.accuracy, -chosen.evaluation.loss) >= (base.accuracy, -base.loss)
    assert report.candidates[0].p == 0.0 and report.candidates[0].evaluation == base


def test_prune_moves_the_terms_the_largest_tried_p_could_freeze_along_the_ig_path():
    model = make_model("gpt2")
    data = make_data(n=8, length=5)
    common = dict(components=("k", "v"), reduce="mean", batch_size=4, progress=False)
    linear = eigenfast.score(model, data, **common)
    for p, tried in ((0.2, 0.2), ("auto", 0.3)):
        result = eigenfast.prune(model, data, p=p, estimate="ig", steps=3, candidates=(0.1, 0.3),
                                 val_data=make_data(n=6, length=5, seed=1), **common)
        moving = scoring.path_candidates(linear, tried)
        expected = scoring.attribute(model, data, ("k", "v"), "all", 4, progress=False, reduce="mean", steps=3,
                                     moving=moving).scores
        for key in expected:
            torch.testing.assert_close(result.scores[key], expected[key], rtol=1e-5, atol=1e-7)
    moved_all = scoring.attribute(model, data, ("k", "v"), "all", 4, progress=False, reduce="mean", steps=3).scores
    assert any(torch.isinf(expected[key]).any() for key in expected)  # off the path: never frozen
    # The path matters: on it, every term moving gives other scores.
    assert any(not torch.allclose(moved_all[key][moving[key]], expected[key][moving[key]]) for key in expected)
    with pytest.warns(DeprecationWarning, match="use fraction="):
        old = eigenfast.score(model, data, estimate="ig", steps=2, verify=0.2, **common)
    new = eigenfast.score(model, data, estimate="ig", steps=2, fraction=0.2, **common)
    assert all(torch.equal(old[key], new[key]) for key in new)
