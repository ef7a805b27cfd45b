"""``verge purge``: remove (or mark stale) cached objects by URL, prefix or tag, on one edge
through its admin API (--admin) or on every edge through the control plane (--control).

Through the control plane the command follows the edges' acknowledgements with a progress bar
and exits non-zero naming the edges that did not acknowledge within --timeout.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from verge.cli.common import console, done, fail, fail_line, print_json, session
from verge.cli.secrets import secret_option

if TYPE_CHECKING:
    from verge.control.client import ControlClient

POLL_INTERVAL = 0.2
"""Seconds between purge-status polls in `verge purge --control` once the server stopped
waiting (the purge timed out there)."""
STATUS_WAIT = 1.0
"""Longest purge-status long poll in `verge purge --control` (the progress bar's pace)."""

Targets = Annotated[
    list[str] | None, typer.Argument(help="URLs to purge (http://host/path?query).")
]
Admin = Annotated[str, typer.Option(envvar="VERGE_ADMIN", help="Admin URL of the edge node.")]
PurgeToken = Annotated[
    str | None,
    secret_option("VERGE_TOKEN", "Edge admin token (--admin), or control-plane token (--control)."),
]
Tags = Annotated[
    list[str] | None, typer.Option(help="Purge by surrogate key (Surrogate-Key / Cache-Tag).")
]
Prefixes = Annotated[
    list[str] | None, typer.Option(help="Purge every URL under this prefix (http://host/path/).")
]
Soft = Annotated[
    bool, typer.Option("--soft", help="Mark stale (revalidate on next use) instead of removing.")
]
RawJson = Annotated[bool, typer.Option("--json", help="Print the raw JSON result.")]
Control = Annotated[
    str | None,
    typer.Option(
        envvar="VERGE_CONTROL",
        help="Control plane URL: purge on every edge through it instead of one edge's --admin.",
    ),
]
Service = Annotated[
    str | None,
    typer.Option(help="With --control: the service whose --tag/--prefix objects to purge."),
]
Timeout = Annotated[
    float,
    typer.Option(min=0, help="With --control: seconds to wait for every edge to acknowledge."),
]


def purge(
    ctx: typer.Context,
    targets: Targets = None,
    admin: Admin = "http://127.0.0.1:8081",
    token: PurgeToken = None,
    tag: Tags = None,
    prefix: Prefixes = None,
    soft: Soft = False,
    as_json: RawJson = False,
    control: Control = None,
    service: Service = None,
    timeout: Timeout = 30.0,
) -> None:
    """Purge cached objects by URL, prefix or tag on one edge (--admin) or all edges (--control).

    With --control the purge goes to every edge through the control plane; a progress bar
    follows the edges' acknowledgements, and the command exits non-zero naming the edges that
    did not acknowledge within --timeout.
    """
    if not (targets or tag or prefix):
        fail("give URLs, --tag or --prefix")
    if _purge_through_control(ctx, control):
        purge_via_control(
            control,
            token,
            urls=targets or [],
            prefixes=prefix or [],
            tags=tag or [],
            soft=soft,
            service=service,
            timeout=timeout,
            as_json=as_json,
        )
        return
    if service is not None:
        fail("--service needs --control (an edge's admin API purges across all services)")
    if not token:
        fail("an admin token is required (--token or VERGE_TOKEN)")
    body = {"urls": targets or [], "tags": tag or [], "prefixes": prefix or [], "soft": soft}
    _purge_one_edge(admin, token, body, as_json)


def _purge_one_edge(admin: str, token: str, body: dict[str, Any], as_json: bool) -> None:
    """POST /purge to one edge's admin API; its counts (or the raw result) printed."""
    import httpx

    try:
        response = httpx.post(
            admin.rstrip("/") + "/purge",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach {admin}: {exc}")
    try:
        result = response.json()
    except ValueError:
        result = {"error": response.text}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif response.status_code == 200:
        kind = "soft-purged (marked stale)" if body["soft"] else "purged"
        typer.echo(
            f"{kind}: {result.get('disk', 0)} on disk, {result.get('memory', 0)} in memory "
            f"across {result.get('workers', 0)} workers"
        )
    if response.status_code != 200:
        fail(result.get("error", f"HTTP {response.status_code}"))


def _purge_through_control(ctx: typer.Context, control: str | None) -> bool:
    """--control wins unless --admin is on the command line; flags beat environment variables."""

    def given_as_flag(name: str) -> bool:  # typer vendors click: compare the source by name
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "COMMANDLINE"

    on_command_line = {name for name in ("admin", "control") if given_as_flag(name)}
    if on_command_line == {"admin", "control"}:
        fail("give --admin (one edge) or --control (all edges), not both")
    return bool(control) and "admin" not in on_command_line


def _wait_for_acks(
    client: ControlClient, seq: int, expected: int, timeout: float, show: bool
) -> dict[str, Any]:
    """Follow GET /purge/{seq} until nothing is pending or `timeout` passes; the last status.

    Each call long-polls (the control plane answers the moment the last edge acknowledges),
    at most STATUS_WAIT seconds so that the progress bar moves."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    columns = (
        TextColumn(f"purge #{seq}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("edges acknowledged"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console(stderr=True), disable=not show) as progress:
        task = progress.add_task("purge", total=expected)
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            status = client.purge_status(seq, wait=min(STATUS_WAIT, remaining))
            acked, pending = status.get("acked", []), status.get("pending", [])
            progress.update(task, completed=len(acked), total=len(acked) + len(pending))
            if not pending or time.monotonic() >= deadline:
                return status
            if status.get("done"):  # timed out on the server: it answers at once from now on
                time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))


def purge_via_control(
    control: str,
    token: str | None,
    *,
    urls: list[str],
    prefixes: list[str],
    tags: list[str],
    soft: bool,
    service: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """`verge purge --control`: queue the purge, then follow the edges' acknowledgements.

    Complete (exit 0) only when every registered, non-revoked edge has acknowledged, up or
    not; otherwise "incomplete" naming each edge that has not (exit 1): those apply the
    purge when they reach the control plane again (on a restart, before serving from cache).
    """
    with session(control, token) as client:
        job = client.purge(urls=urls, prefixes=prefixes, tags=tags, soft=soft, service=service)
        seq, expected = int(job["seq"]), len(job.get("nodes", []))
        show = not as_json and expected > 0
        status = _wait_for_acks(client, seq, expected, timeout, show)
    acked, pending = status.get("acked", []), status.get("pending", [])
    if as_json:
        print_json({**status, "seq": seq, "complete": not pending})
    elif not pending:
        kind = "soft purge (mark stale)" if soft else "purge"
        if acked:
            done(f"{kind} #{seq} acknowledged by all {len(acked)} edges: complete")
        else:
            done(f"{kind} #{seq} queued; no edge is up now (none is registered)")
    if pending:
        _fail_incomplete(status, seq, timeout)


def _fail_incomplete(status: dict[str, Any], seq: int, timeout: float) -> None:
    """Exit 1 naming the edges that did not acknowledge purge ``seq`` within ``timeout``."""
    acked, pending = status.get("acked", []), status.get("pending", [])
    down = set(status.get("down") or [])
    names = [f"{name} (down)" if name in down else name for name in sorted(pending)]
    fail_line(
        f"purge #{seq} incomplete: {len(pending)} of {len(acked) + len(pending)} edges "
        f"did not acknowledge within {timeout:g}s: {', '.join(names)}; they may still "
        "serve the purged objects and apply the purge when they reach the control plane "
        "again"
    )
