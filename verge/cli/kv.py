"""``verge kv put|get|list|rm``: Edge KV, namespaces replicated to every edge and read by
functions locally."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from verge.cli.common import (
    DEFAULT_CONTROL,
    EXIT_USAGE,
    AsJson,
    ControlUrl,
    Token,
    call,
    fail_line,
    list_all,
    report,
)

if TYPE_CHECKING:
    from verge.control.client import ControlClient, Page

kv_app = typer.Typer(
    help="Edge KV: namespaces replicated to every edge, read by functions locally.",
    no_args_is_help=True,
)
Namespace = Annotated[str, typer.Argument(help="KV namespace (lower-case slug).")]
Key = Annotated[str, typer.Argument(help="Key (UTF-8, up to 512 bytes).")]
NAMESPACE_COLUMNS = [("namespace", "NAMESPACE"), ("tenant", "TENANT"), ("keys", "KEYS")]
KEY_COLUMNS = [("key", "KEY"), ("size", "BYTES"), ("seq", "SEQ"), ("updated_at", "UPDATED")]


@kv_app.command("put")
def kv_put(
    namespace: Namespace,
    key: Key,
    value: Annotated[
        str | None, typer.Argument(help="The value (text); or use --file, or '-' for stdin.")
    ] = None,
    file: Annotated[Path | None, typer.Option(help="Read the value from this file.")] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Owner of a new namespace (admin tokens).")
    ] = None,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Write a value; every edge has it within seconds (eventual consistency)."""
    data = _kv_value(value, file)
    written = call(control, token, lambda client: client.kv_put(namespace, key, data, tenant))
    report(as_json, written, f"{namespace}/{key} = {len(data)} bytes (seq {written.get('seq')})")


def _kv_value(value: str | None, file: Path | None) -> bytes:
    if (value is None) == (file is None):
        fail_line("give the value as an argument or with --file (one of them)", EXIT_USAGE)
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as exc:
            fail_line(f"{file}: cannot read: {exc.strerror or exc}", EXIT_USAGE)
    if value == "-":
        return sys.stdin.buffer.read()
    return str(value).encode()


@kv_app.command("get")
def kv_get(
    namespace: Namespace,
    key: Key,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
) -> None:
    """Print a value (raw bytes on stdout)."""
    value = call(control, token, lambda client: client.kv_get(namespace, key))
    sys.stdout.buffer.write(value)
    sys.stdout.flush()


@kv_app.command("list")
def kv_list(
    namespace: Annotated[
        str | None, typer.Argument(help="Namespace whose keys to list; none: list namespaces.")
    ] = None,
    prefix: Annotated[str, typer.Option(help="Only keys starting with this.")] = "",
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List namespaces, or the keys of one."""
    if namespace is None:
        list_all(
            control,
            token,
            as_json,
            lambda client: client.kv_namespaces,
            "KV namespaces",
            NAMESPACE_COLUMNS,
        )
        return

    def keys(client: ControlClient) -> Callable[[int, int], Page]:
        return lambda limit, offset: client.kv_keys(namespace, prefix, limit, offset)

    list_all(control, token, as_json, keys, f"Keys in {namespace}", KEY_COLUMNS)


@kv_app.command("rm")
def kv_rm(
    namespace: Namespace,
    key: Key,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Delete a key (edges drop it with the next change they apply)."""
    deleted = call(control, token, lambda client: client.kv_delete(namespace, key))
    report(as_json, deleted, f"{namespace}/{key} deleted (seq {deleted.get('seq')})")
