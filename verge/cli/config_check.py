"""``verge config-check``: validate a config file without starting anything."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from verge.cli.common import fail


def config_check(path: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Validate a config file: prints file:line: reason and exits non-zero when it is wrong."""
    from verge.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        fail(str(exc))
    typer.echo(f"{path}: ok ({len(cfg.services)} services)")
