"""Progress for long work: a bar on a terminal, plain log lines otherwise, nothing when asked.

Silent when ``desc`` is None, ``EIGENFAST_QUIET=1``, or on any rank but 0 of a process
group. When stderr is not a terminal (a log file, CI, a pipe) a bar's carriage returns
would fill the log with partial lines, so each ``desc`` prints a line at the start,
about every tenth of the way and at the end.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

from tqdm.auto import tqdm

from .distributed import is_main_process

T = TypeVar("T")
LOG_STEPS = 10


def progress(items: Iterable[T], total: int | None = None, desc: str | None = None) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar (terminal) or line logs (anything else) labelled ``desc``."""
    if _silent(desc):
        return iter(items)
    if not sys.stderr.isatty():
        return log_lines(items, total, desc, sys.stderr)
    return iter(tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True))


def _silent(desc: str | None) -> bool:
    return desc is None or os.environ.get("EIGENFAST_QUIET") == "1" or not is_main_process()


def log_lines(items: Iterable[T], total: int | None, desc: str, stream: TextIO) -> Iterator[T]:
    """Yield ``items``, writing ``desc: done/total`` lines to ``stream`` at about every tenth of ``total``."""
    every = max(1, (total or 0) // LOG_STEPS) if total else None
    of = f"/{total}" if total else ""
    started = time.perf_counter()
    print(f"{desc}: 0{of}", file=stream, flush=True)
    done = 0
    for done, item in enumerate(items, start=1):
        yield item
        if every is not None and done % every == 0 and done != total:
            print(f"{desc}: {done}{of}", file=stream, flush=True)
    print(f"{desc}: {done}{of} done in {time.perf_counter() - started:.1f} s", file=stream, flush=True)


class _LineBar:
    """What :func:`progress_bar` gives when stderr is not a terminal: a log line about every tenth of the way."""

    def __init__(self, total: int, desc: str, stream: TextIO) -> None:
        self.total, self.desc, self.stream, self.done, self.postfix = total, desc, stream, 0, ""
        self.every = max(1, total // LOG_STEPS)
        self.started = time.perf_counter()
        print(f"{desc}: 0/{total}", file=stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every == 0 and self.done != self.total:
            print(f"{self.desc}: {self.done}/{self.total} {self.postfix}".rstrip(), file=self.stream, flush=True)

    def set_postfix(self, **values: object) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        took = time.perf_counter() - self.started
        print(f"{self.desc}: {self.done}/{self.total} {self.postfix} done in {took:.1f} s", file=self.stream, flush=True)


def progress_bar(total: int, desc: str | None = None) -> "tqdm | _LineBar | None":
    """A bar advanced by hand (``update``, ``set_postfix``, ``close``): tqdm on a terminal, log lines otherwise,
    None under the rules that silence :func:`progress`."""
    if _silent(desc):
        return None
    if not sys.stderr.isatty():
        return _LineBar(total, desc, sys.stderr)
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' own progress bars (a "Loading weights" bar on every ``from_pretrained``) off for the block.

    eigenfast's loads take a fraction of a second; the switch is put back as it was, so a
    user's own transformers calls keep their bars.
    """
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()
