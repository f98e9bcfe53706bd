"""The subcommands of the ``eigenfast`` command line, one module each.

A command module has a docstring (first line: the one-line help; the rest: the
description shown by ``eigenfast COMMAND --help``, plain text), and two functions:

* ``add_arguments(parser)`` adds its options, each with help text; defaults are
  shown by the formatter, so give them as the string a user would type;
* ``run(args) -> int`` checks every argument that needs the file system (model,
  task, output folder) before any work, does the work and returns the exit status.
  It raises :class:`eigenfast.errors.EigenfastError` for anything the user can fix;
  the entry point prints it as ``error: ...`` and exits with 1.

To add a command, write its module and list it in ``COMMANDS``.
"""
from __future__ import annotations

from types import ModuleType

from . import bench, demo, edges, export, extract, prune, table
from . import eval as evaluate

COMMANDS: dict[str, ModuleType] = {"demo": demo, "prune": prune, "eval": evaluate, "extract": extract, "table": table, "edges": edges, "bench": bench,
                                   "export": export}
