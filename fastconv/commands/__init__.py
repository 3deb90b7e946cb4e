"""Subcommands of the ``fastconv`` CLI, one module each (``add_arguments``, ``run``)."""
