"""Keyword names the public API renamed: the old ones keep working for one release, with a warning."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

from ..errors import ArgumentError

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorate an entry point so ``old=value`` arrives as ``new=value`` (``renamed_keywords(old="new")``).

    The old name raises a ``DeprecationWarning`` that names the new one; passing
    both is an error rather than a silent choice between them.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise ArgumentError(f"{function.__name__} got both {old}= and {new}=; pass only {new}= ({old}= is its old name)")
                warnings.warn(
                    f"{function.__name__}({old}=...) is deprecated and will be removed in the next release; use {new}=...",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
