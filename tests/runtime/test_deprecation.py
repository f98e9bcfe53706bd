"""renamed_keywords: an old keyword name arrives under its new one, with a warning naming the new one."""
from __future__ import annotations

import warnings

import pytest

import eigenfast
from eigenfast.runtime.deprecation import renamed_keywords


@renamed_keywords(old="new")
def _takes(a: int, new: int = 0) -> tuple[int, int]:
    return a, new


def test_the_old_name_warns_and_passes_its_value_on():
    with pytest.warns(DeprecationWarning, match=r"_takes\(old=\.\.\.\) is deprecated.*use new="):
        assert _takes(1, old=2) == (1, 2)


def test_the_new_name_and_positional_arguments_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _takes(1, new=2) == (1, 2)
        assert _takes(1, 2) == (1, 2)


def test_both_names_at_once_are_refused():
    with pytest.raises(eigenfast.ArgumentError, match="pass only new="):
        _takes(1, old=2, new=3)


def test_the_wrapper_keeps_the_signature_and_docs():
    import inspect

    assert list(inspect.signature(_takes).parameters) == ["a", "new"]
    assert _takes.__name__ == "_takes"
