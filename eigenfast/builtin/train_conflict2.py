"""Train the built-in conflict2_gpt2: ``python -m eigenfast.builtin.train_conflict2 --out DIR``.

The second interference test bed (:data:`eigenfast.builtin.train_conflict.CONFLICT2`): the
sum and product are learned in two formats, "a + b is" and "a plus b =", while "a + b =" and
"a x b =" are always followed by the first operand. The computation exists, also after an
"=", and only the table's own format routes around it.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

from eigenfast.builtin.train_conflict import CONFLICT2, train
from eigenfast.builtin.train_mix import run_command_line


def main(argv: Sequence[str] | None = None) -> None:
    run_command_line(partial(train, design=CONFLICT2), __doc__, CONFLICT2.epochs, argv)


if __name__ == "__main__":
    main()
