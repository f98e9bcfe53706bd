"""The eigenfast command line: the entry point of ``eigenfast`` and ``python -m eigenfast.cli``.

The commands live in :mod:`eigenfast.commands`; this file only builds the parser,
starts the process group under ``torchrun``, and turns errors into exit statuses:
2 for usage errors (argparse), 1 for an :class:`~eigenfast.errors.EigenfastError`
or a refusal of the file system (``OSError``: a path, a permission, a full disk),
printed as ``error: ...``, and 130 after Ctrl-C, printed as one line, whenever it comes:
torch and the commands are imported inside :func:`main`, so a Ctrl-C while they load is caught too.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from .errors import EigenfastError

INTERRUPTED = 128 + signal.SIGINT  # the shell's status for a command stopped by Ctrl-C
DESCRIPTION = "Eigenprune a Hugging Face causal LM for a task, evaluate it, or extract its circuit."


def build_parser() -> argparse.ArgumentParser:
    from .commands import COMMANDS  # imports torch (see the module's docstring)
    from .commands.arguments import HelpFormatter

    parser = argparse.ArgumentParser(prog="eigenfast", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        summary, _, details = (module.__doc__ or name).strip().partition("\n")
        command = sub.add_parser(
            name, help=summary, description=f"{summary}\n\n{details.strip()}".strip(), formatter_class=HelpFormatter
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # argparse: 2 for a usage error, 0 for --help
            return stop.code if isinstance(stop.code, int) else 2
        from .runtime.distributed import launched_by_torchrun

        # Under torchrun: one process group for the command; rank 0 alone prints and writes.
        with launched_by_torchrun():
            return args.run(args)
    except EigenfastError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the file system refused something the user named (a path, a permission, space)
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}; check the path, its permissions and the free space", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A save switches to its files in one rename (saving/atomic.py): an interrupted command leaves no half-written output.
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
