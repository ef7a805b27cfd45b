"""``verge node ...``: the edge nodes registered with the control plane."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from verge.cli.common import Api, timestamp, with_api

node_app = typer.Typer(help="Edge nodes registered with the control plane.", no_args_is_help=True)

STATUS_STYLE = {"up": "green", "down": "red", "revoked": "dim"}
NODE_COLUMNS = [
    ("name", "NAME"),
    ("url", "URL"),
    ("region", "REGION"),
    ("status", "STATUS"),
    ("heartbeat", "LAST HEARTBEAT"),
    ("config_version", "CONFIG"),
    ("purge_seq", "PURGE SEQ"),
]


def _age(value: Any, now: datetime | None = None) -> str:
    """'4s ago', '3m 10s ago', '2h 5m ago', '3d ago'; 'never' without a heartbeat."""
    moment = timestamp(value)
    if moment is None:
        return "never" if not value else str(value)
    seconds = max(0, int(((now or datetime.now(UTC)) - moment).total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 60:
        text = f"{seconds}s"
    elif seconds < 3600:
        text = f"{minutes}m {seconds % 60}s"
    elif seconds < 86400:
        text = f"{hours}h {minutes % 60}m"
    else:
        text = f"{days}d"
    return f"{text} ago"


def _node_row(node: dict[str, Any]) -> dict[str, Any]:
    from rich.text import Text

    status = str(node.get("status", "-"))
    return {
        **node,
        "status": Text(status, style=STATUS_STYLE.get(status, "")),
        "heartbeat": _age(node.get("last_heartbeat")),
    }


@node_app.command("list")
@with_api
def node_list(api: Api) -> None:
    """List edge nodes: status, last heartbeat, config version and purge sequence they run."""
    api.list_all(lambda client: client.list_nodes, "Nodes", NODE_COLUMNS, _node_row)


@node_app.command("revoke")
@with_api
def node_revoke(api: Api, name: Annotated[str, typer.Argument(help="Node name.")]) -> None:
    """Revoke a node's credential: no more config or purges until it joins again (join token)."""
    api.call(lambda client: client.revoke_node(name))
    api.report({"revoked": name}, f"node {name} revoked")
