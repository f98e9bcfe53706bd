"""The one runner: options checked once, the registry, and the clean and corrupted forwards run once per run."""
from __future__ import annotations

from typing import Iterator
from unittest import mock

import pytest
import torch

import eigenfast
from eigenfast.edges import METHODS, EdgeOptions, run
from eigenfast.edges.compare import compare
from eigenfast.edges.masked_forward import EdgeForward
from eigenfast.errors import ArgumentError

from conftest import make_data, make_model

WRAPPERS = {"edge_prune": dict(steps=3, target_sparsity=0.5), "eap": dict(target_sparsity=0.5),
            "eap_ig_inputs": dict(target_sparsity=0.5, ig_steps=2), "eap_ig_activations": dict(target_sparsity=0.5, ig_steps=2),
            "ensemble": dict(target_sparsity=0.5, ig_steps=2), "edge_prune_warm": dict(steps=3, target_sparsity=0.5, ig_steps=2),
            "acdc": dict(threshold=0.01)}
# Registry methods with no public function: they run through eigenfast.edges.run only.
RUN_ONLY = ("ensemble", "edge_prune_warm")
# The registry names with no function of their own run through eigenfast.eap's method= keyword.
VARIANTS = {"eap_ig_inputs": "ig-inputs", "eap_ig_activations": "ig-activations"}


def wrapper(model, clean, corrupted, method: str, **options):
    """The public function that runs a registry method (EAP-IG through eigenfast.eap's method=)."""
    if method in VARIANTS:
        options["steps"] = options.pop("ig_steps")
        return eigenfast.eap(model, clean, corrupted, method=VARIANTS[method], **options)
    return getattr(eigenfast, method)(model, clean, corrupted, **options)


@pytest.fixture(scope="module")
def task():
    return make_model("gpt2"), make_data(5, 5, seed=0), make_data(5, 5, seed=1)


@pytest.fixture
def forwards() -> Iterator[list[int]]:
    """The rows of every ordinary model forward the edge machinery runs (clean or corrupted)."""
    rows: list[int] = []
    original = EdgeForward.context

    def counting(self: EdgeForward, batch):
        rows.append(len(batch))
        return original(self, batch)

    with mock.patch.object(EdgeForward, "context", counting):
        yield rows


@pytest.mark.parametrize("method", list(METHODS))
def test_a_run_with_its_evaluation_runs_each_forward_once(task, forwards, method):
    model, clean, corrupted = task
    if method in RUN_ONLY:
        circuit = run(model, clean, corrupted, method, EdgeOptions(batch_size=2, progress=False, **WRAPPERS[method]))
    else:
        circuit = wrapper(model, clean, corrupted, method, batch_size=2, progress=False, **WRAPPERS[method])
    assert circuit.report is not None
    assert forwards == [2, 2, 2, 2, 1, 1]  # three batches, clean and corrupted each once


def test_compare_prepares_once_for_every_method_and_setting(task, forwards):
    model, clean, corrupted = task
    result = compare(model, clean, corrupted, {"eap": (0.5, 0.9), "acdc": (0.01,)},
                     EdgeOptions(batch_size=5, progress=False))
    assert forwards == [5, 5]
    assert [r.method for _, r in result.reports] == ["EAP s=0.5", "EAP s=0.9", "ACDC τ=0.01"]
    assert result.reports[0][1].edges_kept > result.reports[1][1].edges_kept
    # Every circuit also gets its MIB curve on the same batches; EAP's scores do not depend on its sparsity.
    cprs = [f.cpr for f in result.faithfulness]
    assert len(cprs) == 3 and cprs[0] == cprs[1]
    assert result.faithfulness_table().splitlines()[1].startswith("EAP s=0.5")


@pytest.mark.parametrize("method", [m for m in METHODS if m not in RUN_ONLY])
def test_the_wrappers_are_the_runner(task, method):
    model, clean, corrupted = task
    wrapped = wrapper(model, clean, corrupted, method, batch_size=2, progress=False, **WRAPPERS[method])
    direct = run(model, clean, corrupted, method, EdgeOptions(batch_size=2, progress=False, **WRAPPERS[method]))
    assert torch.equal(wrapped.kept, direct.kept) and torch.equal(wrapped.scores, direct.scores)
    assert wrapped.method == direct.method == METHODS[method].label
    assert wrapped.report.kl == direct.report.kl


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", 2.5), ("target_sparsity", 1.5), ("target_sparsity", float("nan")),
    ("threshold", -1.0), ("threshold", float("nan")), ("steps", 0), ("ramp", 0.0), ("lr", 0.0),
    ("lambda_lr", float("inf")), ("init_log_alpha", float("nan")), ("faithfulness", 0.0), ("faithfulness", 1.5),
    ("kl", 0.0), ("kl", float("inf")), ("search_runs", 0), ("ig_steps", 0), ("init_scores", torch.ones(2, 2)),
])
def test_every_bad_option_names_its_field(field, value):
    with pytest.raises(ArgumentError, match=field):
        EdgeOptions(**{field: value})


def test_unknown_methods_and_settings_are_refused_before_any_work(task, forwards):
    model, clean, corrupted = task
    with pytest.raises(ArgumentError, match="unknown method 'magic'; choose from edge_prune, eap, eap_ig_inputs"):
        run(model, clean, corrupted, "magic")
    with pytest.raises(ArgumentError, match="target_sparsity"):
        compare(model, clean, corrupted, {"eap": (0.5, 2.0)}, EdgeOptions(progress=False))
    assert forwards == []


def test_a_target_and_a_knob_together_are_refused():
    for given in (dict(faithfulness=0.9, target_sparsity=0.5), dict(kl=0.1, threshold=0.01),
                  dict(faithfulness=0.9, kl=0.1)):
        with pytest.raises(ArgumentError, match="not several"):
            EdgeOptions(**given)
    assert EdgeOptions().target == ("faithfulness", 0.99) and EdgeOptions(kl=0.5).target == ("kl", 0.5)
