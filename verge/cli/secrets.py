"""Secrets on the command line without showing them in `ps`.

Every token option of the CLI (``--admin-token``, ``--join-token``, ``--token``) also reads
its environment variable (VERGE_ADMIN_TOKEN, VERGE_JOIN_TOKEN, VERGE_TOKEN), and takes
``@PATH`` to read the token from a file (a systemd credential, a Kubernetes secret volume),
as curl does for ``-d @file``: the value then never appears in any process's arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

MAX_SECRET_FILE = 64 * 1024


def secret_value(value: str | None) -> str | None:
    """Typer callback: ``@PATH`` -> the file's first line; anything else as given."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read the token file {path}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_FILE:
        raise typer.BadParameter(f"the token file {path} is over {MAX_SECRET_FILE} bytes")
    token = data.decode("utf-8", "replace").strip().splitlines()
    if not token or not token[0].strip():
        raise typer.BadParameter(f"the token file {path} is empty")
    return token[0].strip()


def secret_option(envvar: str, description: str, *param_decls: str) -> Any:
    """A token option (for ``Annotated[str | None, ...]``): the value, ENVVAR or ``@PATH``."""
    return typer.Option(
        *param_decls,
        envvar=envvar,
        callback=secret_value,
        help=f"{description} @FILE reads it from a file.",
    )
