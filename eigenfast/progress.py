"""Progress bars for long work; silent when ``desc`` is None or when disabled globally."""
from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str | None = None) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar labelled ``desc`` (no bar without a label or with EIGENFAST_QUIET=1)."""
    if desc is None or os.environ.get("EIGENFAST_QUIET") == "1":
        return iter(items)
    return iter(tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True))


def progress_bar(total: int, desc: str | None = None) -> "tqdm | None":
    """A bar advanced by hand (``update``, ``set_postfix``), or None under the rules that silence :func:`progress`."""
    if desc is None or os.environ.get("EIGENFAST_QUIET") == "1":
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
