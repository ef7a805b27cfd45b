"""``verge kv put|get|list|rm``: Edge KV, namespaces replicated to every edge and read by
functions locally."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from verge.cli.common import EXIT_USAGE, Api, fail_line, with_api

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
@with_api
def kv_put(
    api: Api,
    namespace: Namespace,
    key: Key,
    value: Annotated[
        str | None, typer.Argument(help="The value (text); or use --file, or '-' for stdin.")
    ] = None,
    file: Annotated[Path | None, typer.Option(help="Read the value from this file.")] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Owner of a new namespace (admin tokens).")
    ] = None,
) -> None:
    """Write a value; every edge has it within seconds (eventual consistency)."""
    data = _kv_value(value, file)
    written = api.call(lambda client: client.kv_put(namespace, key, data, tenant))
    api.report(written, f"{namespace}/{key} = {len(data)} bytes (seq {written.get('seq')})")


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
@with_api(json_option=False)
def kv_get(api: Api, namespace: Namespace, key: Key) -> None:
    """Print a value (raw bytes on stdout)."""
    value = api.call(lambda client: client.kv_get(namespace, key))
    sys.stdout.buffer.write(value)
    sys.stdout.flush()


@kv_app.command("list")
@with_api
def kv_list(
    api: Api,
    namespace: Annotated[
        str | None, typer.Argument(help="Namespace whose keys to list; none: list namespaces.")
    ] = None,
    prefix: Annotated[str, typer.Option(help="Only keys starting with this.")] = "",
) -> None:
    """List namespaces, or the keys of one."""
    if namespace is None:
        api.list_all(lambda client: client.kv_namespaces, "KV namespaces", NAMESPACE_COLUMNS)
        return

    def keys(client: ControlClient) -> Callable[[int, int], Page]:
        return lambda limit, offset: client.kv_keys(namespace, prefix, limit, offset)

    api.list_all(keys, f"Keys in {namespace}", KEY_COLUMNS)


@kv_app.command("rm")
@with_api
def kv_rm(api: Api, namespace: Namespace, key: Key) -> None:
    """Delete a key (edges drop it with the next change they apply)."""
    deleted = api.call(lambda client: client.kv_delete(namespace, key))
    api.report(deleted, f"{namespace}/{key} deleted (seq {deleted.get('seq')})")
