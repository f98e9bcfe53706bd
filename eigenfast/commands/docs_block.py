"""A measured table written into a Markdown page between two markers, with the command that produced it.

The block is replaced in place when its markers are there and appended at the end of
the page when they are not, so a page keeps its prose and each rerun of the command
refreshes only its own numbers. Markers are HTML comments (invisible when rendered):

    <!-- begin NAME: written by the command below; rerun it instead of editing -->
    ...
    <!-- end NAME -->
"""
from __future__ import annotations

import os
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ArgumentError


def markers(name: str) -> tuple[str, str]:
    return f"<!-- begin {name}: written by the command below; rerun it instead of editing -->", f"<!-- end {name} -->"


def check_page(path: str | Path, name: str) -> None:
    """Refuse a page the block cannot go into, before the measurement runs: a folder, or one marker without the other."""
    path = Path(path)
    if path.is_dir():
        raise ArgumentError(f"{path} is a folder; give the Markdown file to write the table into (e.g. docs/EDGES.md)")
    if not path.exists():
        return
    begin, end = markers(name)
    text = path.read_text(encoding="utf-8")
    if (begin in text) != (end in text) or text.find(begin) > text.find(end):
        raise ArgumentError(f"{path} has a broken block {name!r}: it needs the line {begin!r} followed by {end!r}; "
                            "restore the missing marker or delete both to have the block appended")


def measured(command: Sequence[str], body: str, seconds: float, device: str = "cpu") -> str:
    """The command line, when, how long, on which device and under what load it ran, and its output, as Markdown."""
    one, five, fifteen = os.getloadavg()
    return (f"```\n{shlex.join(command)}\n```\n\n"
            f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {seconds:.0f} s on {device} "
            f"({torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores; load average {one:.2f}, {five:.2f}, "
            f"{fifteen:.2f} at the end):\n\n```\n{body.rstrip()}\n```\n")


def write_block(path: str | Path, name: str, content: str) -> Path:
    """Put ``content`` between the page's markers ``name`` (replacing what was there), or append it with them."""
    path = Path(path)
    check_page(path, name)
    begin, end = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{begin}\n{content.rstrip()}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text else f"{block}\n"
    # A whole new page renamed over the old one: an interrupted write leaves the old page, never half of one.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path
