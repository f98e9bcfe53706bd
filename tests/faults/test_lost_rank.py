"""A rank that never joins: the others stop after EIGENFAST_DIST_TIMEOUT with one error line naming their rank
and the timeout, instead of waiting in init_process_group for ever."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

TIMEOUT = 5  # seconds, through EIGENFAST_DIST_TIMEOUT
# The command line, timed from just before main(): the imports are not part of the wait.
ONE_RANK = """
import sys, time
import eigenfast.commands, eigenfast.runtime.distributed  # what main imports first: torch, the commands
from eigenfast.cli import main
start = time.monotonic()
status = main(["eval", "--model", "int_sum_gpt2", "--task", "int_sum"])
print(f"waited {time.monotonic() - start:.1f} s", flush=True)
sys.exit(status)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_missing_peer_is_an_error_naming_the_rank_and_the_timeout(rank, capsys):
    """Rank 0 alone waits for rank 1 to join its store; rank 1 alone cannot reach rank 0's."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "EIGENFAST_DIST_TIMEOUT": str(TIMEOUT), "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run([sys.executable, "-c", ONE_RANK], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("hang: the lone rank was still waiting after 300 s")
    with capsys.disabled():
        print(f"\nfault injection: rank {rank} alone in a group of 2, timeout {TIMEOUT} s: {done.stdout.strip()}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith(f"error: rank {rank} of 2: not all 2 processes joined within {TIMEOUT} s"), lines
    assert "EIGENFAST_DIST_TIMEOUT" in lines[-1]
