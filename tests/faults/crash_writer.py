"""What a fault-injection trial runs in its own process: one save, slowed down, that the test may kill.

Imported once by a forkserver (``forkserver_preload``: torch, transformers and both models
load once for all trials); each trial's process forks from it, says it is ready and saves.
"""
from __future__ import annotations

import functools
import resource
import signal
import time
import traceback
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from eigenfast.errors import EigenfastError
from eigenfast.saving import atomic
from eigenfast.saving.serialization import save_model

# Two saves of one architecture whose files have equal sizes: only their bytes tell them apart.
P = {"old": 0.3, "new": 0.5}


def tiny_model(which: str) -> torch.nn.Module:
    torch.manual_seed({"old": 0, "new": 1}[which])
    config = GPT2Config(vocab_size=40, bos_token_id=1, eos_token_id=2, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@functools.cache
def models() -> dict[str, torch.nn.Module]:
    """Both models, built once (in the forkserver, before it forks: a trial's process starts saving at once)."""
    return {which: tiny_model(which) for which in P}


def save(model: torch.nn.Module, folder: str, which: str) -> None:
    save_model(model, folder, kind="eigenpruned", report={"p": P[which]}, tensors={"p": torch.tensor([P[which]])})


def slowed_save(folder: str, which: str, delay: float, ready: Any, answer: Any, file_limit: int | None = None) -> None:
    """Save ``which`` into ``folder`` pausing ``delay`` s between steps; send what happened through ``answer``."""
    atomic.step = lambda where: time.sleep(delay)
    model = models()[which]
    if file_limit is not None:  # the kernel refuses writes past this size (EFBIG), as a full disk refuses them
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    ready.set()
    try:
        save(model, folder, which)
    except EigenfastError as err:
        answer.send(("error", f"{type(err).__name__}: {err}"))
    except BaseException:  # what the test counts as a traceback
        answer.send(("traceback", traceback.format_exc()))
    else:
        answer.send(("saved", which))
