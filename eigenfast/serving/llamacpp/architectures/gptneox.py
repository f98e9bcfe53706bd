"""GPT-NeoX / Pythia as llama.cpp's ``gptneox``: partial rotary, parallel or sequential residual, an untied LM head."""
from __future__ import annotations

from typing import Any

from ..blocks import Block
from .base import FixedHeads


class GPTNeoX(FixedHeads):
    name = "gptneox"
    tied_output = False  # the loader needs output.weight

    def metadata(self, writer: Any, blocks: list[Block]) -> None:
        super().metadata(writer, blocks)
        self.rotary(writer)
        writer.add_parallel_residual(bool(self.adapter.parallel))
