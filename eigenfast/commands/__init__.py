"""One module per ``eigenfast`` sub-command, each with ``add_arguments(parser)`` and ``run(args) -> int``."""
