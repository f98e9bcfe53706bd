"""Train the built-in conflict2_gpt2: ``python -m eigenfast.builtin.train_conflict2 --out DIR``.

The second interference test bed (:data:`eigenfast.builtin.train_conflict.CONFLICT2`): the
sum and product are learned in two formats, "a + b is" and "a plus b =", while "a + b =" and
"a x b =" are always followed by the first operand. The computation exists, also after an
"=", and only the table's own format routes around it.
"""
from __future__ import annotations

from typing import Sequence

from eigenfast.builtin.train_conflict import CONFLICT2, command_line


def main(argv: Sequence[str] | None = None) -> None:
    command_line(CONFLICT2, __doc__, argv)


if __name__ == "__main__":
    main()
