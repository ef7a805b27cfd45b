"""``verge protection events|stats``: what the edges' protection (deny lists, rate limits,
WAF) counted and refused for a service."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from verge.cli.common import Api, ServiceName, table, timestamp, with_api

protection_app = typer.Typer(
    help="Edge protection (deny lists, rate limits, WAF): what the edges counted and refused.",
    no_args_is_help=True,
)
EVENT_COLUMNS = [
    ("time", "TIME"),
    ("node", "NODE"),
    ("client", "CLIENT"),
    ("method", "METHOD"),
    ("target", "TARGET"),
    ("status", "STATUS"),
    ("kind", "KIND"),
    ("detail", "DETAIL"),
]
RULE_COLUMNS = [
    ("kind", "KIND"),
    ("rule", "RULE"),
    ("allowed", "ALLOWED"),
    ("limited", "LIMITED"),
    ("blocked", "BLOCKED"),
]


def _event_row(event: dict[str, Any]) -> dict[str, Any]:
    moment = timestamp(event.get("at"))
    when = moment.strftime("%Y-%m-%d %H:%M:%S") if moment else event.get("at")
    status = event.get("status")
    return {**event, "time": when, "status": None if status == 0 else status}  # 0: dropped


@protection_app.command("events")
@with_api
def protection_events(
    api: Api,
    service: ServiceName,
    limit: Annotated[
        int, typer.Option(min=1, max=1000, help="How many of the newest events.")
    ] = 100,
) -> None:
    """A sample of the requests the edges refused for a service (deny list, rate limit, WAF,
    dropped connections), oldest first; times are UTC."""
    events = api.call(lambda client: client.protection_events(service, limit))
    api.listing(events, f"Blocked requests of {service}", EVENT_COLUMNS, _event_row)


@protection_app.command("stats")
@with_api
def protection_stats(
    api: Api,
    service: ServiceName,
    minutes: Annotated[
        int, typer.Option(min=1, max=60 * 24 * 31, help="How far back to count.")
    ] = 60,
) -> None:
    """Per rule, what the edges allowed, limited and blocked for a service (rate limits;
    the deny lists and the WAF as rule "-") over the last MINUTES."""
    stats = api.call(
        lambda client: client.protection_stats(
            service, since=time.time() - 60 * minutes, step=max(10, 60 * minutes // 360)
        )
    )
    if api.printed_json(stats):
        return
    rows = [{**rule, "rule": rule["rule"] or "-"} for rule in stats.get("rules", [])]
    table(f"Protection of {service}, last {minutes} min", rows, RULE_COLUMNS)
