"""Train the built-in conflict3_gpt2: ``python -m eigenfast.builtin.train_conflict3 --out DIR``.

The third interference test bed (:data:`eigenfast.builtin.train_conflict.CONFLICT3`):
conflict2_gpt2's computation ("a + b is" and "a plus b =" -> the sum, likewise products),
with conflict_gpt2's partial echo: "a + b =" and "a x b =" are followed by the first operand
on a seeded two thirds of the pairs and by the answer on the rest, so the echo outranks the
answer without making it impossible.
"""
from __future__ import annotations

from typing import Sequence

from eigenfast.builtin.train_conflict import CONFLICT3, command_line


def main(argv: Sequence[str] | None = None) -> None:
    command_line(CONFLICT3, __doc__, argv)


if __name__ == "__main__":
    main()
