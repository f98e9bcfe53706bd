"""PruneOptions: every setting checked once, up front, with an error naming the field and the fix; old keywords warn."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.eigenprune.options import DEFAULT_CANDIDATES, PruneOptions
from eigenfast.eigenprune.scoring import attribute

from conftest import make_data, make_model


@pytest.mark.parametrize(
    "field, value, fix",
    [
        ("p", "most", "'auto'"),
        ("p", 1.5, r"\[0, 1\]"),
        ("p", True, r"\[0, 1\]"),
        ("extrapolate", "clamp", "'mean', 'last', 'error'"),
        ("val_fraction", 1.0, "val_data"),
        ("val_fraction", 0.0, "val_data"),
    ],
)
def test_a_bad_setting_is_an_eigenfast_error_naming_the_field_and_the_fix(field, value, fix):
    with pytest.raises(eigenfast.ArgumentError, match=rf"{field} must .*{fix}"):
        PruneOptions(**{field: value})


def test_auto_checks_its_candidates_and_refuses_inplace():
    with pytest.raises(eigenfast.ArgumentError, match=r"candidate p must be a fraction in \[0, 1\]"):
        PruneOptions(p="auto", candidates=(0.1, 2.0))
    with pytest.raises(eigenfast.ArgumentError, match="inplace=True needs a fixed p"):
        PruneOptions(p="auto", inplace=True)


def test_estimate_options_are_checked_with_the_fix_named():
    with pytest.raises(eigenfast.ArgumentError, match="estimate must be one of"):
        PruneOptions(estimate="exact")
    with pytest.raises(eigenfast.ArgumentError, match="pass pairs='all', reduce='mean'"):
        PruneOptions(estimate="ig")
    with pytest.raises(eigenfast.ArgumentError, match="steps"):
        PruneOptions(estimate="ig", reduce="mean", steps=0)
    with pytest.raises(eigenfast.ArgumentError, match="candidate p above 0"):
        PruneOptions(p="auto", candidates=(0.0,))
    assert PruneOptions(estimate="verified", reduce="max", pairs="shift").estimate == "verified"


def test_options_normalise_what_prune_reads():
    auto = PruneOptions(p="auto", components="k", candidates=[0.3, 0.1, 0.3], layers=[1, 0])
    assert auto.components == ("k",) and auto.layers == (1, 0)
    assert auto.tried == (0.0, 0.1, 0.3)  # the unpruned model is always a choice
    fixed = PruneOptions(p=0, candidates=[2.0])  # candidates are unused under a fixed p, as before
    assert fixed.p == 0.0 and fixed.tried == (0.0,)
    assert PruneOptions().candidates == DEFAULT_CANDIDATES


def test_prune_refuses_a_bad_extrapolate_before_any_work():
    model = make_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(eigenfast.ArgumentError, match="extrapolate must be one of"):
        eigenfast.prune(model, make_data(), p=0.1, extrapolate="clamp", inplace=True, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_progress_bar_still_works_with_a_warning_and_gives_the_same_results():
    model, data = make_model("gpt2", seed=3), make_data(n=8)
    new = eigenfast.prune(model, data, p=0.2, components=("k", "mlp_in"), progress=False)
    with pytest.warns(DeprecationWarning, match=r"prune\(progress_bar=\.\.\.\).*use progress="):
        old = eigenfast.prune(model, data, p=0.2, components=("k", "mlp_in"), progress_bar=False)
    assert old.report.as_dict() | {"timings": None} == new.report.as_dict() | {"timings": None}
    for key, mask in new.frozen.items():
        assert torch.equal(old.frozen[key], mask)
        torch.testing.assert_close(old.scores[key], new.scores[key], rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match=r"score\(progress_bar="):
        scores = eigenfast.score(model, data, ("k",), progress_bar=False)
    with pytest.warns(DeprecationWarning, match=r"attribute\(progress_bar="):
        attribute(model, data, ("k",), progress_bar=False)
    for key, value in eigenfast.score(model, data, ("k",), progress=False).items():
        torch.testing.assert_close(scores[key], value, rtol=0, atol=0)


def test_layers_limits_scoring_and_freezing_to_those_layers():
    model, data = make_model("gpt2", seed=3), make_data(n=8)
    result = eigenfast.prune(model, data, p=0.5, components=("k",), layers=[1], progress=False)
    assert set(result.scores) == set(result.frozen) == {(1, "k")}
    full = eigenfast.score(model, data, ("k",), progress=False)
    torch.testing.assert_close(result.scores[(1, "k")], full[(1, "k")])
