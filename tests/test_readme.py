"""Every fenced code block of README.md runs as pasted.

Python blocks run in order in one fresh interpreter (a user's session) from an empty
folder; each ``eigenfast ...`` line of a bash block runs through the installed command,
the lines of one block in order from an empty folder. Lines that set up environments
are not run here, each for the reason in ``NOT_RUN``. The fast test checks that every
block is one of these kinds, every command parses and every Python block compiles;
running them is slow (a few minutes).
"""
from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from eigenfast.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
EIGENFAST = Path(sys.executable).with_name("eigenfast")
NOT_RUN = {  # first word of a shell line -> why this test does not run it
    "make": "builds its own virtual environment and runs the demo or the whole suite, which is what the suite is",
    "pip": "installs packages into the environment, which the environment running this test already has",
    "python3": "creates a virtual environment (python3 -m venv)",
    ".": "activates a virtual environment",
    "torchrun": "starts several processes; tests/test_distributed.py runs prune under torchrun",
}
KINDS = ("python", "bash", "text")  # text: layouts and other non-code


@dataclass
class Block:
    kind: str
    line: int  # of the opening fence
    code: str

    def commands(self) -> list[list[str]]:
        """The block's shell lines, continuation lines joined and comments dropped, split into words."""
        joined = re.sub(r"\\\n\s*", " ", self.code)
        return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def blocks(text: str) -> list[Block]:
    found = []
    for match in re.finditer(r"^```(\S*)\n(.*?)^```$", text, flags=re.S | re.M):
        found.append(Block(match.group(1), text.count("\n", 0, match.start()) + 1, match.group(2)))
    return found


README_BLOCKS = blocks(README.read_text(encoding="utf-8"))
BASH = [b for b in README_BLOCKS if b.kind == "bash" and any(words[0] == "eigenfast" for words in b.commands())]


def test_every_block_is_code_the_suite_runs_or_text():
    assert README_BLOCKS and all(b.kind in KINDS for b in README_BLOCKS), [(b.line, b.kind) for b in README_BLOCKS]
    parser = build_parser()
    for block in README_BLOCKS:
        if block.kind == "python":
            compile(block.code, f"README.md, line {block.line}", "exec")
        if block.kind != "bash":
            continue
        for words in block.commands():
            if words[0] == "eigenfast":
                parser.parse_args(words[1:])  # a usage error exits here, naming the option
            else:
                assert words[0] in NOT_RUN, f"README.md line {block.line}: {' '.join(words)} is neither run nor skipped"


def test_blocks_are_found_as_a_reader_sees_them():
    text = "intro\n```python\nx = 1\n```\n\n```bash\neigenfast demo \\\n  --seed 1   # a comment\n# only a comment\n```\n"
    python, bash = blocks(text)
    assert (python.kind, python.line, python.code) == ("python", 2, "x = 1\n")
    assert bash.commands() == [["eigenfast", "demo", "--seed", "1"]]


# Wall and CPU seconds of each block (on a machine shared with other jobs, CPU time is what a quiet one takes).
DRIVER = """
import json, sys, time
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    wall, cpu = time.perf_counter(), time.process_time()
    exec(compile(block["code"], f"README.md, line {block['line']}", "exec"), namespace)
    print(f"README.md line {block['line']}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU", flush=True)
"""


def _run(args: list[str], cwd: Path) -> str:
    wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**os.environ, "EIGENFAST_QUIET": "1"})
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    return f"{time.perf_counter() - wall:.1f} s wall, {cpu_s:.1f} s CPU: {' '.join(args)}\n{done.stdout}"


@pytest.mark.slow
def test_python_blocks_run_as_pasted(tmp_path):
    code = [{"line": b.line, "code": b.code} for b in README_BLOCKS if b.kind == "python"]
    (tmp_path / "blocks.json").write_text(json.dumps(code))
    (tmp_path / "driver.py").write_text(DRIVER)
    work = tmp_path / "work"
    work.mkdir()
    print(_run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "blocks.json")], work))
    for folder in ("pruned", "circuit", "nodes"):
        assert (work / folder).is_dir(), folder


@pytest.mark.slow
@pytest.mark.parametrize("block", BASH, ids=[f"line{b.line}" for b in BASH])
def test_commands_run_as_pasted(tmp_path, block):
    for words in block.commands():
        if words[0] == "eigenfast":
            print(_run([str(EIGENFAST), *words[1:]], tmp_path))
