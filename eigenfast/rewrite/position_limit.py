"""The longest sequence a model can read, and an error that names it.

A model with a learned table of absolute positions (GPT-2's ``wpe``, ``n_positions`` rows)
cannot read position ``n_positions`` or later; the rotary families (Llama, NeoX, Phi) have
no such table and no hard limit. Past the table PyTorch raises a bare ``IndexError: index
out of range in self``. eigenfast checks data lengths before any work (``check_fits_model``
in :mod:`eigenfast.data`), and in the models it loads or changes the table's forward turns
that error into a :class:`PositionLimitError` naming the limit: a long forward, or a
``generate`` asked for more tokens than fit.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters.position_table import position_table
from ..errors import PositionLimitError


def limit_message(longest: int, limit: int) -> str:
    return (
        f"a sequence reaches position {longest}, but the model reads at most {limit} positions (0..{limit - 1}; "
        f"its config's max_position_embeddings): a prompt plus the tokens generated after it must fit in {limit}; "
        "shorten the prompt or ask for fewer new tokens"
    )


class LimitedPositionEmbedding(nn.Embedding):
    """The same table and state dict; a position past its rows raises :class:`PositionLimitError`.

    Checked only when the lookup fails (the happy path costs nothing, no host sync), and not
    while ``torch.compile`` or ``torch.export`` traces, which see no values.
    """

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(positions)
        try:
            return super().forward(positions)
        except IndexError:
            if int(positions.max()) < self.num_embeddings:
                raise
            raise PositionLimitError(limit_message(int(positions.max()), self.num_embeddings)) from None


def guard_positions(model: nn.Module) -> nn.Module:
    """Give ``model``'s learned position table (if it has one) the clear error; idempotent."""
    table = position_table(model)
    if table is not None and type(table) is nn.Embedding:
        table.__class__ = LimitedPositionEmbedding
    return model
