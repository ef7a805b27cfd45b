"""``verge sign-url``: a URL with a signed, expiring token for a rule with `signed:`."""

from __future__ import annotations

from typing import Annotated

import typer

from verge.cli.common import fail


def sign_url(
    url: Annotated[str, typer.Argument(help="The URL to sign (http://HOST/live/show.m3u8).")],
    secret: Annotated[
        str,
        typer.Option(
            envvar="VERGE_SIGNING_SECRET", help="The rule's signed.secret (at least 16 characters)."
        ),
    ],
    prefix: Annotated[
        str | None,
        typer.Option(
            help="Path prefix the token grants (default: the URL's path), e.g. /live/show."
        ),
    ] = None,
    ttl: Annotated[
        str, typer.Option(help="How long the token is valid (3600, 90s, 2h, 1d).")
    ] = "3600",
    param: Annotated[str, typer.Option(help="The rule's signed.param.")] = "token",
) -> None:
    """Print URL with a signed token (HMAC, expiring) for a rule with `signed:`."""
    from verge.config import parse_duration
    from verge.edge.signing import sign_url as signed

    try:
        typer.echo(signed(url, secret, prefix=prefix, ttl=parse_duration(ttl), param=param))
    except ValueError as exc:
        fail(str(exc))
