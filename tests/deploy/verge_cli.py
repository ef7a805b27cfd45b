"""What the `verge` command accepts, read from the CLI itself (for checking deploy files)."""

from __future__ import annotations

from functools import cache

import typer.main


@cache
def cli_options() -> dict[str, frozenset[str]]:
    """`verge` sub-command -> the options it takes (`--listen`, ...)."""
    from verge.cli import app

    group = typer.main.get_command(app)
    return {
        name: frozenset(opt for param in command.params for opt in param.opts)
        for name, command in group.commands.items()
    }


def unknown_options(argv: list[str]) -> list[str]:
    """The options in `verge SUBCOMMAND ARGS...` (argv without `verge`) that it does not take."""
    command, *args = argv
    if command not in cli_options():
        return [command]
    known = cli_options()[command]
    return [arg for arg in args if arg.startswith("--") and arg.split("=", 1)[0] not in known]
