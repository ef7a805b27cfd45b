"""``verge token ...``: API tokens (admin, tenant_admin, read_only) and edges' join tokens."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from verge.cli.common import Api, with_api

token_app = typer.Typer(
    help="API tokens: admin, tenant_admin, read_only, and join tokens for edge nodes.",
    no_args_is_help=True,
)
TOKEN_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("role", "ROLE"),
    ("tenant", "TENANT"),
    ("created_at", "CREATED"),
    ("revoked", "REVOKED"),
]


class Role(StrEnum):
    admin = "admin"
    tenant_admin = "tenant_admin"
    read_only = "read_only"
    join = "join"


@token_app.command("create")
@with_api
def token_create(
    api: Api,
    role: Annotated[Role, typer.Option(help="What the token may do.")],
    tenant: Annotated[
        str | None,
        typer.Option(
            help="Tenant it is limited to: required for tenant_admin; a read_only token "
            "without one reads every tenant; admin and join tokens have none. A tenant "
            "admin's tokens are always of its own tenant."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label to recognise the token by.")] = None,
) -> None:
    """Create a token. The secret is printed once, on stdout: store it now."""
    created = api.call(lambda client: client.create_token(role.value, tenant=tenant, name=name))
    if api.printed_json(created):
        return
    scope = f"tenant {created['tenant']}" if created.get("tenant") else "all tenants"
    typer.echo(
        f"token {created.get('id', '-')} ({created.get('role', role.value)}, {scope}); "
        "the secret below is shown only once:",
        err=True,
    )
    typer.echo(created["token"])


@token_app.command("list")
@with_api
def token_list(api: Api) -> None:
    """List tokens (never their secrets)."""
    api.list_all(lambda client: client.list_tokens, "Tokens", TOKEN_COLUMNS)


@token_app.command("revoke")
@with_api
def token_revoke(
    api: Api,
    token_id: Annotated[str, typer.Argument(metavar="ID", help="Token id (from token list).")],
) -> None:
    """Revoke a token: every call made with it is refused (401) from now on.

    Other replicas on the same PostgreSQL refuse it once its notification reaches them:
    milliseconds, and at most 1 s (how long a replica may remember a login).
    """
    api.call(lambda client: client.revoke_token(token_id))
    api.report({"revoked": token_id}, f"token {token_id} revoked")
