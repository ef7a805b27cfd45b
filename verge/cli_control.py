"""Operator commands for the control plane: `verge tenant|token|service|origin|node|fn|kv ...`,
`verge protection events` and `verge hostnames`.

An operator runs these against `verge control` instead of editing YAML on every edge. Each
command is a thin shell over `verge.control.client.ControlClient`: read flags (and files), make
one or a few API calls, print rich tables for people or `--json` for scripts. Any failure is
one line on stderr (the control plane's own message, with the field it names) and a non-zero
exit, never a traceback. `verge purge --control` also lives here (`purge_via_control`) so that
cli.py only wires it up. Heavy imports (httpx, rich, yaml) happen inside the commands so that
`verge edge` does not pay for them at start.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from verge.cli_secrets import secret_value

if TYPE_CHECKING:
    from rich.console import Console

    from verge.control.client import ControlClient, ControlError, Page

DEFAULT_CONTROL = "http://127.0.0.1:7000"
POLL_INTERVAL = 0.2
"""Seconds between purge-status polls in `verge purge --control` once the server stopped
waiting (the purge timed out there)."""
STATUS_WAIT = 1.0
"""Longest purge-status long poll in `verge purge --control` (the progress bar's pace)."""

EXIT_FAILED = 1
"""The control plane refused or could not be reached."""
EXIT_USAGE = 2
"""The operator's input (flags, files) is wrong before anything was sent."""

ControlUrl = Annotated[
    str,
    typer.Option(
        "--control",
        envvar="VERGE_CONTROL",
        help="Base URL of the control plane (`verge control`).",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="VERGE_TOKEN", callback=secret_value,
        help="API token (vrg_...) sent as Authorization: Bearer. @FILE reads it from a file.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class Role(StrEnum):
    admin = "admin"
    tenant_admin = "tenant_admin"
    read_only = "read_only"
    join = "join"


# ---------------------------------------------------------------------------------------------
# Shared plumbing: errors, the client session, output
# ---------------------------------------------------------------------------------------------


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """One line on stderr and a non-zero exit."""
    line = " ".join(message.split())
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def _session(control: str, token: str | None) -> Iterator[ControlClient]:
    """A ControlClient whose errors end the command with the server's message."""
    from verge.control.client import ControlClient, ControlError

    if not token:
        _fail("a control-plane token is required (--token or VERGE_TOKEN)", EXIT_USAGE)
    try:
        client = ControlClient(control, token)
    except ValueError as exc:  # --control / VERGE_CONTROL: one URL or several, comma-separated
        _fail(f"--control: {exc}", EXIT_USAGE)
    try:
        yield client
    except ControlError as exc:
        _fail(_explain(exc))
    finally:
        client.close()


def _explain(exc: ControlError) -> str:
    """The server's message, with the field and a hint for the statuses operators meet."""
    text = str(exc)
    if exc.status == 401:
        return f"the control plane refused the token: {text}"
    if exc.status == 403:
        return f"this token may not do that: {text}"
    return text


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _console(stderr: bool = False) -> Console:
    """A rich console; wide when piped so that tables are not wrapped at 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    console = Console(file=stream, stderr=stderr)
    if not console.is_terminal:
        console = Console(file=stream, stderr=stderr, width=200)
    return console


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _table(title: str, items: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Print `items` as a table with (key, heading) columns; missing values show as '-'."""
    from rich.table import Table
    from rich.text import Text

    if not items:
        typer.echo(f"(no {title[0].lower()}{title[1:]})")
        return
    table = Table(title=title, title_justify="left")
    for _key, heading in columns:
        table.add_column(heading, overflow="fold")
    for item in items:
        values = (item.get(key) for key, _heading in columns)
        table.add_row(*(v if isinstance(v, Text) else Text(_cell(v)) for v in values))
    _console().print(table)


def _every(fetch: Callable[[int, int], Page]) -> list[dict[str, Any]]:
    from verge.control.client import iter_all

    return list(iter_all(fetch))


def _done(message: str) -> None:
    """A success line (plain text: names and URLs such as http://[::1]/ are not markup)."""
    typer.echo(message)


def _report(as_json: bool, result: Any, message: str) -> None:
    """A command's outcome: the raw result with --json, else one line for people."""
    if as_json:
        _print_json(result)
    else:
        _done(message)


# ---------------------------------------------------------------------------------------------
# verge tenant
# ---------------------------------------------------------------------------------------------

tenant_app = typer.Typer(
    help="Tenants: the owners of services and tokens, and the DNS zones their services may "
    "claim hosts in (only admins create tenants and delegate zones).",
    no_args_is_help=True,
)
zone_app = typer.Typer(
    help="A tenant's zones: its tokens may create services only for hosts inside them.",
    no_args_is_help=True,
)
tenant_app.add_typer(zone_app, name="zone")

TENANT_COLUMNS = [("id", "ID"), ("name", "NAME"), ("zones", "ZONES"), ("created_at", "CREATED")]


def _tenant_line(tenant: dict[str, Any]) -> str:
    zones = ", ".join(tenant.get("zones") or []) or "no zones yet"
    return f"tenant {tenant.get('name', '-')}: {zones}"


def _warn_conflicts(conflicts: list[str]) -> None:
    """Hosts a zone change leaves in conflict (they keep working until an admin acts)."""
    for conflict in conflicts:
        typer.secho(f"warning: {conflict}", fg=typer.colors.YELLOW, err=True)
    if conflicts:
        typer.secho(
            "see `verge hostnames --conflicts`; move or delete those services to resolve",
            fg=typer.colors.YELLOW,
            err=True,
        )


@tenant_app.command("add")
def tenant_add(
    name: Annotated[str, typer.Argument(help="Tenant name.")],
    zone: Annotated[
        list[str] | None,
        typer.Option(
            "--zone",
            help="DNS zone delegated to the tenant, e.g. example.com (repeat): its tokens may "
            "create services for that name, names below it and *.NAME wildcards inside it.",
        ),
    ] = None,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Create a tenant, with the zones its services may claim hosts in."""
    with _session(control, token) as client:
        tenant = client.create_tenant(name, zone or [])
    _report(
        as_json,
        tenant,
        f"tenant {tenant.get('name', name)} created (id {tenant.get('id', '-')}); zones: "
        f"{', '.join(tenant.get('zones') or []) or 'none (its tokens can claim no host yet)'}",
    )


@tenant_app.command("show")
def tenant_show(
    name: Annotated[str, typer.Argument(help="Tenant name.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Show a tenant and its zones."""
    with _session(control, token) as client:
        tenant = client.get_tenant(name)
    _report(as_json, tenant, _tenant_line(tenant))


def _report_zones(as_json: bool, tenant: dict) -> None:
    """A tenant after a zone change, and the hosts now in conflict with its zones."""
    _report(as_json, tenant, _tenant_line(tenant))
    if not as_json:
        _warn_conflicts(tenant.get("conflicts") or [])


@zone_app.command("add")
def zone_add(
    tenant: Annotated[str, typer.Argument(help="Tenant name.")],
    zones: Annotated[list[str], typer.Argument(metavar="ZONE...", help="DNS zones to delegate.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Delegate zones to a tenant (refused when one nests in another tenant's zone)."""
    with _session(control, token) as client:
        _report_zones(as_json, client.add_zones(tenant, zones))


@zone_app.command("rm")
def zone_rm(
    tenant: Annotated[str, typer.Argument(help="Tenant name.")],
    zone: Annotated[str, typer.Argument(help="The zone to take back.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Take a zone back: the tenant can claim no new host there (its services keep theirs)."""
    with _session(control, token) as client:
        _report_zones(as_json, client.remove_zone(tenant, zone))


@zone_app.command("list")
def zone_list(
    tenant: Annotated[
        str | None, typer.Argument(help="Tenant name (default: every tenant's zones).")
    ] = None,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List zones and the tenant each is delegated to."""
    with _session(control, token) as client:
        tenants = [client.get_tenant(tenant)] if tenant else _every(client.list_tenants)
    rows = [{"zone": z, "tenant": t["name"]} for t in tenants for z in t.get("zones") or []]
    if as_json:
        _print_json(rows)
    else:
        _table("Zones", sorted(rows, key=lambda r: r["zone"]), [("zone", "ZONE"),
                                                                ("tenant", "TENANT")])


@tenant_app.command("list")
def tenant_list(
    control: ControlUrl = DEFAULT_CONTROL, token: Token = None, as_json: AsJson = False
) -> None:
    """List tenants."""
    with _session(control, token) as client:
        tenants = _every(client.list_tenants)
    if as_json:
        _print_json(tenants)
    else:
        _table("Tenants", tenants, TENANT_COLUMNS)


# ---------------------------------------------------------------------------------------------
# verge hostnames
# ---------------------------------------------------------------------------------------------

HOSTNAME_COLUMNS = [
    ("host", "HOST"),
    ("tenant", "TENANT"),
    ("service", "SERVICE"),
    ("zone", "ZONE"),
    ("covered", "COVERED BY"),
    ("problems", "CONFLICTS"),
]


def _all_hostnames(client: ControlClient, conflicts_only: bool) -> dict[str, Any]:
    """Every page of GET /hostnames: {"items", "conflicts", "zones"}."""
    first = client.hostnames(limit=1000, offset=0, conflicts_only=conflicts_only)
    items = list(first.get("items", []))
    while len(items) < first.get("total", 0):
        page = client.hostnames(limit=1000, offset=len(items), conflicts_only=conflicts_only)
        if not page.get("items"):
            break
        items.extend(page["items"])
    return {**first, "items": items}


def _hostname_row(item: dict[str, Any]) -> dict[str, Any]:
    covered = [f"{w['host']} ({w['service']}, {w['tenant']})" for w in item.get("covered_by", [])]
    kinds = [c.get("kind", "") for c in item.get("conflicts", [])]
    return {**item, "covered": covered, "problems": kinds}


def hostnames(
    conflicts: Annotated[
        bool, typer.Option("--conflicts", help="Only hosts with a conflict.")
    ] = False,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Who owns which hostname: every service host with its tenant, service, zone, the
    wildcards covering it, and conflicts (hosts outside their tenant's zones, inside another
    tenant's zone, or under another tenant's wildcard). Resolve a conflict by moving or
    deleting the service (`verge service edit|rm`) or with `verge tenant zone add|rm`."""
    with _session(control, token) as client:
        report = _all_hostnames(client, conflicts)
    if as_json:
        _print_json(report)
        return
    _table("Hostnames", [_hostname_row(item) for item in report["items"]], HOSTNAME_COLUMNS)
    found = report.get("conflicts") or []
    for conflict in found:
        typer.echo(f"conflict ({conflict.get('kind')}): {conflict.get('message')}")
    if not found:
        typer.echo("no conflicts")


# ---------------------------------------------------------------------------------------------
# verge token
# ---------------------------------------------------------------------------------------------

token_app = typer.Typer(
    help="API tokens: admin, tenant_admin, read_only, and join tokens for edge nodes.",
    no_args_is_help=True,
)


@token_app.command("create")
def token_create(
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
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Create a token. The secret is printed once, on stdout: store it now."""
    with _session(control, token) as client:
        created = client.create_token(role.value, tenant=tenant, name=name)
    if as_json:
        _print_json(created)
        return
    scope = f"tenant {created['tenant']}" if created.get("tenant") else "all tenants"
    typer.echo(
        f"token {created.get('id', '-')} ({created.get('role', role.value)}, {scope}); "
        "the secret below is shown only once:",
        err=True,
    )
    typer.echo(created["token"])


@token_app.command("list")
def token_list(
    control: ControlUrl = DEFAULT_CONTROL, token: Token = None, as_json: AsJson = False
) -> None:
    """List tokens (never their secrets)."""
    with _session(control, token) as client:
        tokens = _every(client.list_tokens)
    if as_json:
        _print_json(tokens)
        return
    columns = [
        ("id", "ID"),
        ("name", "NAME"),
        ("role", "ROLE"),
        ("tenant", "TENANT"),
        ("created_at", "CREATED"),
        ("revoked", "REVOKED"),
    ]
    _table("Tokens", tokens, columns)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="Token id (from token list).")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Revoke a token: every call made with it is refused (401) from now on.

    Other replicas on the same PostgreSQL refuse it once its notification reaches them:
    milliseconds, and at most 1 s (how long a replica may remember a login).
    """
    with _session(control, token) as client:
        client.revoke_token(token_id)
    _report(as_json, {"revoked": token_id}, f"token {token_id} revoked")


# ---------------------------------------------------------------------------------------------
# verge service
# ---------------------------------------------------------------------------------------------

service_app = typer.Typer(
    help="Services: host names, origins and rules, served by every edge.", no_args_is_help=True
)

BOOKKEEPING_KEYS = ("id", "version", "created_at", "updated_at")
"""Keys the control plane adds to a service it returns; dropped before sending a file back."""


def _read_yaml(path: Path, what: str) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"{path}: cannot read {what}: {exc.strerror or exc}", EXIT_USAGE)
    except UnicodeDecodeError:
        _fail(f"{path}: {what} is not UTF-8 text", EXIT_USAGE)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        _fail(f"{where}: invalid YAML: {exc.problem}", EXIT_USAGE)
    except yaml.YAMLError as exc:
        _fail(f"{path}: invalid YAML: {exc}", EXIT_USAGE)


def _service_file(path: Path, name: str) -> dict[str, Any]:
    """A service spec from YAML/JSON; its name, if any, must be NAME."""
    data = _read_yaml(path, "service file")
    if not isinstance(data, dict):
        _fail(f"{path}: a service file is a mapping (name, hosts, origins, rules, ...)", EXIT_USAGE)
    if data.get("name", name) != name:
        _fail(f"{path}: the file describes service {data['name']!r}, not {name!r}", EXIT_USAGE)
    spec = {key: value for key, value in data.items() if key not in BOOKKEEPING_KEYS}
    spec["name"] = name
    return spec


def _rule_file(path: Path) -> list[Any]:
    """Rules from YAML: a list of rules, or a mapping with a `rules:` list."""
    data = _read_yaml(path, "rule file")
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if not isinstance(data, list):
        _fail(f"{path}: a rule file is a list of rules (or `rules:` with a list)", EXIT_USAGE)
    return data


def _service_spec(
    name: str,
    hosts: list[str] | None,
    origins: list[str] | None,
    tenant: str | None,
    default: bool,
    rule_file: Path | None,
    from_file: Path | None,
) -> dict[str, Any]:
    """The POST body: the file (if any), then the flags given on the command line on top."""
    if rule_file and from_file:
        _fail("give --rule-file or --from-file, not both (put the rules in the file)", EXIT_USAGE)
    spec = _service_file(from_file, name) if from_file else {"name": name}
    if hosts:
        spec["hosts"] = hosts
    if origins:
        spec["origins"] = [{"url": url} for url in origins]
    if default:
        spec["default"] = True
    if tenant:
        spec["tenant"] = tenant
    if rule_file:
        spec["rules"] = _rule_file(rule_file)
    missing = [
        flag for flag, key in (("--host", "hosts"), ("--origin", "origins")) if not spec.get(key)
    ]
    if missing:
        _fail(
            f"a service needs {' and '.join(missing)} (or a --from-file that has them)", EXIT_USAGE
        )
    return spec


def _hosts_and_origins(service: dict[str, Any]) -> dict[str, Any]:
    origins = [o.get("url") if isinstance(o, dict) else o for o in service.get("origins", [])]
    return {**service, "origins": origins, "rules": len(service.get("rules") or [])}


def _service_yaml(service: dict[str, Any]) -> str:
    """The service as YAML that `service edit --from-file` accepts back."""
    import yaml

    spec = {key: value for key, value in service.items() if key not in BOOKKEEPING_KEYS}
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


@service_app.command("add")
def service_add(
    name: Annotated[str, typer.Argument(help="Service name: lower-case letters, digits, '-'.")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="Host name it serves (repeat; '*.example.com' for subdomains)."),
    ] = None,
    origin: Annotated[
        list[str] | None, typer.Option(help="Origin URL, e.g. http://10.0.0.5:8080 (repeat).")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Owning tenant (admin tokens; others use their own).")
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="Also serve requests whose Host matches no service.")
    ] = False,
    rule_file: Annotated[
        Path | None, typer.Option(help="YAML list of rules (paths, TTLs, bypass, redirects...).")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            help="YAML service spec (as in verge.yaml); --host/--origin etc. override it."
        ),
    ] = None,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Create a service; every edge starts serving it once it fetches the new config."""
    spec = _service_spec(name, host, origin, tenant, default, rule_file, from_file)
    with _session(control, token) as client:
        created = client.create_service(spec)
    _report(
        as_json,
        created.data,
        f"service {name} created (version {created.version or '-'}): "
        f"{_cell(spec['hosts'])} -> {_cell(_hosts_and_origins(spec)['origins'])}",
    )


@service_app.command("list")
def service_list(
    control: ControlUrl = DEFAULT_CONTROL, token: Token = None, as_json: AsJson = False
) -> None:
    """List the services this token can see."""
    with _session(control, token) as client:
        services = _every(client.list_services)
    if as_json:
        _print_json(services)
        return
    columns = [
        ("name", "NAME"),
        ("tenant", "TENANT"),
        ("hosts", "HOSTS"),
        ("origins", "ORIGINS"),
        ("rules", "RULES"),
        ("default", "DEFAULT"),
        ("version", "VERSION"),
    ]
    _table("Services", [_hosts_and_origins(s) for s in services], columns)


@service_app.command("show")
def service_show(
    name: Annotated[str, typer.Argument(help="Service name.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Print a service as YAML, ready to edit and feed to `service edit --from-file`."""
    with _session(control, token) as client:
        service = client.get_service(name)
    if as_json:
        _print_json(service.data)
        return
    typer.echo(f"# service {name}, version {service.version or service.etag or '-'}")
    typer.echo(_service_yaml(service.data), nl=False)


@service_app.command("rm")
def service_rm(
    name: Annotated[str, typer.Argument(help="Service name.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Delete a service; edges stop serving its hosts with their next config."""
    with _session(control, token) as client:
        client.delete_service(name)
    _report(as_json, {"deleted": name}, f"service {name} deleted")


@service_app.command("edit")
def service_edit(
    name: Annotated[str, typer.Argument(help="Service name.")],
    from_file: Annotated[
        Path, typer.Option(help="The whole new service spec (YAML, as `service show` prints).")
    ],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Replace a service with the file, unless someone else changed it since it was read."""
    from verge.control.client import ControlError

    spec = _service_file(from_file, name)
    with _session(control, token) as client:
        current = client.get_service(name)
        try:
            updated = client.update_service(name, spec, current.etag)
        except ControlError as exc:
            if exc.status != 412:
                raise
            _fail(
                f"service {name!r} was changed by someone else while you edited it; "
                f"run `verge service show {name}` and apply your change again"
            )
    _report(
        as_json,
        updated.data,
        f"service {name} updated (version {current.version or '-'} -> {updated.version or '-'})",
    )


# ---------------------------------------------------------------------------------------------
# verge origin
# ---------------------------------------------------------------------------------------------

origin_app = typer.Typer(
    help="A service's origins (the servers edges fetch from).", no_args_is_help=True
)


@origin_app.command("add")
def origin_add(
    service: Annotated[str, typer.Argument(help="Service name.")],
    url: Annotated[str, typer.Argument(help="Origin URL, e.g. http://10.0.0.6:8080.")],
    weight: Annotated[int, typer.Option(min=1, help="Share of requests relative to others.")] = 1,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Add an origin to a service."""
    with _session(control, token) as client:
        result = client.add_origin(service, url, weight)
    _report(as_json, result, f"origin {url} (weight {weight}) added to service {service}")


@origin_app.command("rm")
def origin_rm(
    service: Annotated[str, typer.Argument(help="Service name.")],
    url: Annotated[str, typer.Argument(help="Origin URL exactly as listed.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Remove an origin from a service (a service keeps at least one)."""
    with _session(control, token) as client:
        result = client.remove_origin(service, url)
    _report(as_json, result, f"origin {url} removed from service {service}")


@origin_app.command("list")
def origin_list(
    service: Annotated[str, typer.Argument(help="Service name.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List a service's origins."""
    with _session(control, token) as client:
        data = client.get_service(service).data
    origins = [o if isinstance(o, dict) else {"url": o} for o in data.get("origins", [])]
    if as_json:
        _print_json(origins)
    else:
        columns = [("url", "URL"), ("weight", "WEIGHT"), ("host_header", "HOST HEADER")]
        _table(f"Origins of {service}", origins, columns)


# ---------------------------------------------------------------------------------------------
# verge node
# ---------------------------------------------------------------------------------------------

node_app = typer.Typer(help="Edge nodes registered with the control plane.", no_args_is_help=True)


def _timestamp(value: Any) -> datetime | None:
    """An ISO 8601 string or epoch seconds as an aware datetime (naive ones are UTC)."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


def _age(value: Any, now: datetime | None = None) -> str:
    """'4s ago', '3m 10s ago', '2h 5m ago', '3d ago'; 'never' without a heartbeat."""
    moment = _timestamp(value)
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


STATUS_STYLE = {"up": "green", "down": "red", "revoked": "dim"}


def _node_row(node: dict[str, Any]) -> dict[str, Any]:
    from rich.text import Text

    status = str(node.get("status", "-"))
    return {
        **node,
        "status": Text(status, style=STATUS_STYLE.get(status, "")),
        "heartbeat": _age(node.get("last_heartbeat")),
    }


@node_app.command("list")
def node_list(
    control: ControlUrl = DEFAULT_CONTROL, token: Token = None, as_json: AsJson = False
) -> None:
    """List edge nodes: status, last heartbeat, config version and purge sequence they run."""
    with _session(control, token) as client:
        nodes = _every(client.list_nodes)
    if as_json:
        _print_json(nodes)
        return
    columns = [
        ("name", "NAME"),
        ("url", "URL"),
        ("region", "REGION"),
        ("status", "STATUS"),
        ("heartbeat", "LAST HEARTBEAT"),
        ("config_version", "CONFIG"),
        ("purge_seq", "PURGE SEQ"),
    ]
    _table("Nodes", [_node_row(node) for node in nodes], columns)


@node_app.command("revoke")
def node_revoke(
    name: Annotated[str, typer.Argument(help="Node name.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Revoke a node's credential: no more config or purges until it joins again (join token)."""
    with _session(control, token) as client:
        client.revoke_node(name)
    _report(as_json, {"revoked": name}, f"node {name} revoked")


# ---------------------------------------------------------------------------------------------
# verge cert add|rotate|list|rm (registered under `verge cert` by verge.cli_cert)
# ---------------------------------------------------------------------------------------------

CertFile = Annotated[Path, typer.Option("--cert", help="Certificate chain (PEM), server first.")]
KeyFile = Annotated[Path, typer.Option("--key", help="Its private key (PEM, unencrypted).")]
CERT_COLUMNS = [
    ("name", "NAME"),
    ("tenant", "TENANT"),
    ("hosts", "HOSTS"),
    ("not_after", "NOT AFTER"),
    ("fingerprint_sha256", "SHA-256"),
    ("warning", "WARNING"),
]


def _read_pems(cert: Path, key: Path) -> tuple[str, str]:
    try:
        return cert.read_text(), key.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {getattr(exc, 'filename', None) or 'file'}: {exc}", EXIT_USAGE)


def _show_certificate(done: str, cert: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(cert)
        return
    _done(
        f"{done} {cert['name']}: {', '.join(cert.get('hosts', []))} "
        f"(until {cert.get('not_after')}, sha256 {cert.get('fingerprint_sha256', '')[:16]}...)"
    )
    if cert.get("warning"):
        typer.secho(f"warning: {cert['warning']}", fg=typer.colors.YELLOW, err=True)


def cert_add(
    name: Annotated[str, typer.Argument(help="Certificate name: lower-case letters, digits, '-'.")],
    cert: CertFile,
    key: KeyFile,
    tenant: Annotated[
        str | None, typer.Option(help="Owning tenant (admin tokens; others use their own).")
    ] = None,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Upload a certificate and key; every edge serves it by SNI within seconds, no restart."""
    cert_pem, key_pem = _read_pems(cert, key)
    with _session(control, token) as client:
        created = client.add_certificate(name, cert_pem, key_pem, tenant)
    _show_certificate("certificate added:", created, as_json)


def cert_rotate(
    name: Annotated[str, typer.Argument(help="Certificate name.")],
    cert: CertFile,
    key: KeyFile,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Replace a certificate's chain and key (new handshakes get it; open connections keep theirs)."""
    cert_pem, key_pem = _read_pems(cert, key)
    with _session(control, token) as client:
        rotated = client.rotate_certificate(name, cert_pem, key_pem)
    _show_certificate("certificate rotated:", rotated, as_json)


def cert_list(
    control: ControlUrl = DEFAULT_CONTROL, token: Token = None, as_json: AsJson = False
) -> None:
    """List certificates (names, hosts, expiry; never keys)."""
    with _session(control, token) as client:
        certs = _every(client.list_certificates)
    if as_json:
        _print_json(certs)
    else:
        _table("Certificates", certs, CERT_COLUMNS)


def cert_rm(
    name: Annotated[str, typer.Argument(help="Certificate name.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Delete a certificate; edges stop offering it with the next config bundle."""
    with _session(control, token) as client:
        client.delete_certificate(name)
    _report(as_json, {"deleted": name}, f"certificate {name} deleted")


def register_cert_commands(cert_app: typer.Typer) -> None:
    """Add the control-plane certificate commands to the `verge cert` group."""
    cert_app.command("add")(cert_add)
    cert_app.command("rotate")(cert_rotate)
    cert_app.command("list")(cert_list)
    cert_app.command("rm")(cert_rm)


# ---------------------------------------------------------------------------------------------
# verge fn deploy|list|show|logs|rollback|rm
# ---------------------------------------------------------------------------------------------

fn_app = typer.Typer(
    help="Edge functions (WebAssembly, WASI/WAGI): deployed to every edge, versioned.",
    no_args_is_help=True,
)
FN_COLUMNS = [
    ("name", "NAME"),
    ("tenant", "TENANT"),
    ("service", "SERVICE"),
    ("version", "VERSION"),
    ("routes", "ROUTES"),
    ("sha", "MODULE SHA-256"),
    ("size", "BYTES"),
    ("created_at", "DEPLOYED"),
]


def _env_pairs(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            _fail(f"--env takes NAME=VALUE, got {pair!r}", EXIT_USAGE)
        env[name] = value
    return env


def _read_module(path: Path) -> bytes:
    try:
        module = path.read_bytes()
    except OSError as exc:
        _fail(f"{path}: cannot read the module: {exc.strerror or exc}", EXIT_USAGE)
    if not module.startswith(b"\0asm"):
        _fail(f"{path}: not a WebAssembly binary (compile to wasm32-wasi first)", EXIT_USAGE)
    return module


def _fn_row(fn: dict[str, Any]) -> dict[str, Any]:
    return {**fn, "sha": str(fn.get("module_sha256", ""))[:16]}


@fn_app.command("deploy")
def fn_deploy(
    name: Annotated[str, typer.Argument(help="Function name: lower-case letters, digits, '-'.")],
    module: Annotated[Path, typer.Argument(help="The .wasm file (wasm32-wasi, WAGI-style).")],
    service: Annotated[str, typer.Option(help="The service whose requests it sees.")],
    route: Annotated[
        list[str], typer.Option(help="Path prefix or glob it claims, e.g. '/api/hello*' (repeat).")
    ],
    cpu_ms: Annotated[float | None, typer.Option(help="CPU time per request (ms).")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory limit (MiB).")] = None,
    max_subrequests: Annotated[
        int | None, typer.Option(help="Most fetch sub-requests per request.")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option(help="Environment variable NAME=VALUE (repeat).")
    ] = None,
    fetch_host: Annotated[
        list[str] | None, typer.Option(help="Host fetch may reach: host, host:port, *.suffix.")
    ] = None,
    kv: Annotated[str | None, typer.Option("--kv", help="KV namespace it may read.")] = None,
    kv_write: Annotated[
        bool, typer.Option("--kv-write", help="Also let it write its KV namespace.")
    ] = False,
    phase: Annotated[
        str, typer.Option(help="request: before the cache; response: edits the response.")
    ] = "request",
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Deploy a new version; every edge switches to it at once with its next config poll."""
    wasm = _read_module(module)
    with _session(control, token) as client:
        deployed = client.deploy_function(
            name,
            wasm,
            service,
            route,
            env=_env_pairs(env),
            fetch_hosts=fetch_host or [],
            kv_namespace=kv,
            kv_write=kv_write,
            cpu_ms=cpu_ms,
            memory_mb=memory_mb,
            max_subrequests=max_subrequests,
            phase=phase,
        )
    _report(
        as_json,
        deployed,
        f"function {name} version {deployed.get('version')} deployed to service {service} "
        f"({len(wasm)} bytes, sha256 {str(deployed.get('module_sha256', ''))[:16]}...)",
    )


@fn_app.command("list")
def fn_list(
    control: ControlUrl = DEFAULT_CONTROL, token: Token = None, as_json: AsJson = False
) -> None:
    """List functions (the active version of each)."""
    with _session(control, token) as client:
        functions = _every(client.list_functions)
    if as_json:
        _print_json(functions)
    else:
        _table("Functions", [_fn_row(fn) for fn in functions], FN_COLUMNS)


@fn_app.command("show")
def fn_show(
    name: Annotated[str, typer.Argument(help="Function name.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """A function's active version and every stored version."""
    with _session(control, token) as client:
        fn = client.get_function(name)
    if as_json:
        _print_json(fn)
        return
    _table("Function", [_fn_row(fn)], FN_COLUMNS)
    versions = [{**v, "sha": str(v.get("module_sha256", ""))[:16]} for v in fn["versions"]]
    columns = [("version", "VERSION"), ("active", "ACTIVE"), ("service", "SERVICE")]
    columns += [("sha", "MODULE SHA-256"), ("size", "BYTES"), ("created_at", "DEPLOYED")]
    _table("Versions", versions, [*columns, ("created_by", "BY")])


@fn_app.command("logs")
def fn_logs(
    name: Annotated[str, typer.Argument(help="Function name.")],
    limit: Annotated[int, typer.Option(help="How many of the newest records.")] = 100,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """What edges reported of the function: failures, its stderr, modules that did not load."""
    with _session(control, token) as client:
        records = client.function_logs(name, limit)
    if as_json:
        _print_json(records)
        return
    if not records:
        _done(f"(no log records for {name})")
    for record in records:
        _done(_log_line(record))


def _log_line(record: dict[str, Any]) -> str:
    parts = [str(record.get("at", "-")), str(record.get("node", "-")), str(record.get("outcome"))]
    if record.get("request_id"):
        parts.append(f"request={record['request_id']}")
    if record.get("error"):
        parts.append(f"error={record['error']}")
    stderr = str(record.get("stderr") or "").rstrip("\n")
    if stderr:
        parts.append(f"stderr={stderr}")
    return " ".join(parts)


@fn_app.command("rollback")
def fn_rollback(
    name: Annotated[str, typer.Argument(help="Function name.")],
    version: Annotated[
        int | None, typer.Option(help="Version to make active (default: the previous one).")
    ] = None,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Make an earlier version active again on every edge."""
    with _session(control, token) as client:
        active = client.rollback_function(name, version)
    _report(
        as_json, active, f"function {name} rolled back: version {active.get('version')} is active"
    )


@fn_app.command("rm")
def fn_rm(
    name: Annotated[str, typer.Argument(help="Function name.")],
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Delete a function and all its versions; edges stop running it."""
    with _session(control, token) as client:
        client.delete_function(name)
    _report(as_json, {"deleted": name}, f"function {name} deleted")


# ---------------------------------------------------------------------------------------------
# verge protection events|stats
# ---------------------------------------------------------------------------------------------

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


def _event_row(event: dict[str, Any]) -> dict[str, Any]:
    moment = _timestamp(event.get("at"))
    when = moment.strftime("%Y-%m-%d %H:%M:%S") if moment else event.get("at")
    status = event.get("status")
    return {**event, "time": when, "status": None if status == 0 else status}  # 0: dropped


@protection_app.command("events")
def protection_events(
    service: Annotated[str, typer.Argument(help="Service name.")],
    limit: Annotated[
        int, typer.Option(min=1, max=1000, help="How many of the newest events.")
    ] = 100,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """A sample of the requests the edges refused for a service (deny list, rate limit, WAF,
    dropped connections), oldest first; times are UTC."""
    with _session(control, token) as client:
        events = client.protection_events(service, limit)
    if as_json:
        _print_json(events)
    else:
        _table(f"Blocked requests of {service}", [_event_row(e) for e in events], EVENT_COLUMNS)


RULE_COLUMNS = [
    ("kind", "KIND"),
    ("rule", "RULE"),
    ("allowed", "ALLOWED"),
    ("limited", "LIMITED"),
    ("blocked", "BLOCKED"),
]


@protection_app.command("stats")
def protection_stats(
    service: Annotated[str, typer.Argument(help="Service name.")],
    minutes: Annotated[
        int, typer.Option(min=1, max=60 * 24 * 31, help="How far back to count.")
    ] = 60,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Per rule, what the edges allowed, limited and blocked for a service (rate limits;
    the deny lists and the WAF as rule "-") over the last MINUTES."""
    with _session(control, token) as client:
        stats = client.protection_stats(service, since=time.time() - 60 * minutes,
                                        step=max(10, 60 * minutes // 360))
    if as_json:
        _print_json(stats)
        return
    rows = [{**rule, "rule": rule["rule"] or "-"} for rule in stats.get("rules", [])]
    _table(f"Protection of {service}, last {minutes} min", rows, RULE_COLUMNS)


# ---------------------------------------------------------------------------------------------
# verge kv put|get|list|rm
# ---------------------------------------------------------------------------------------------

kv_app = typer.Typer(
    help="Edge KV: namespaces replicated to every edge, read by functions locally.",
    no_args_is_help=True,
)
Namespace = Annotated[str, typer.Argument(help="KV namespace (lower-case slug).")]
Key = Annotated[str, typer.Argument(help="Key (UTF-8, up to 512 bytes).")]


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
    with _session(control, token) as client:
        written = client.kv_put(namespace, key, data, tenant)
    _report(as_json, written, f"{namespace}/{key} = {len(data)} bytes (seq {written.get('seq')})")


def _kv_value(value: str | None, file: Path | None) -> bytes:
    if (value is None) == (file is None):
        _fail("give the value as an argument or with --file (one of them)", EXIT_USAGE)
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as exc:
            _fail(f"{file}: cannot read: {exc.strerror or exc}", EXIT_USAGE)
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
    with _session(control, token) as client:
        value = client.kv_get(namespace, key)
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
    with _session(control, token) as client:
        if namespace is None:
            items = _every(client.kv_namespaces)
            columns = [("namespace", "NAMESPACE"), ("tenant", "TENANT"), ("keys", "KEYS")]
            title = "KV namespaces"
        else:
            items = _every(lambda limit, offset: client.kv_keys(namespace, prefix, limit, offset))
            columns = [("key", "KEY"), ("size", "BYTES"), ("seq", "SEQ"), ("updated_at", "UPDATED")]
            title = f"Keys in {namespace}"
    if as_json:
        _print_json(items)
    else:
        _table(title, items, columns)


@kv_app.command("rm")
def kv_rm(
    namespace: Namespace,
    key: Key,
    control: ControlUrl = DEFAULT_CONTROL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Delete a key (edges drop it with the next change they apply)."""
    with _session(control, token) as client:
        deleted = client.kv_delete(namespace, key)
    _report(as_json, deleted, f"{namespace}/{key} deleted (seq {deleted.get('seq')})")


# ---------------------------------------------------------------------------------------------
# verge purge --control
# ---------------------------------------------------------------------------------------------


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
    with Progress(*columns, console=_console(stderr=True), disable=not show) as progress:
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
    with _session(control, token) as client:
        job = client.purge(urls=urls, prefixes=prefixes, tags=tags, soft=soft, service=service)
        seq, expected = int(job["seq"]), len(job.get("nodes", []))
        show = not as_json and expected > 0
        status = _wait_for_acks(client, seq, expected, timeout, show)
    acked, pending = status.get("acked", []), status.get("pending", [])
    if as_json:
        _print_json({**status, "seq": seq, "complete": not pending})
    elif not pending:
        kind = "soft purge (mark stale)" if soft else "purge"
        if acked:
            _done(f"{kind} #{seq} acknowledged by all {len(acked)} edges: complete")
        else:
            _done(f"{kind} #{seq} queued; no edge is up now (none is registered)")
    if pending:
        down = set(status.get("down") or [])
        names = [f"{name} (down)" if name in down else name for name in sorted(pending)]
        _fail(
            f"purge #{seq} incomplete: {len(pending)} of {len(acked) + len(pending)} edges "
            f"did not acknowledge within {timeout:g}s: {', '.join(names)}; they may still "
            "serve the purged objects and apply the purge when they reach the control plane "
            "again"
        )


# ---------------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the control-plane sub-commands to the `verge` command."""
    app.add_typer(tenant_app, name="tenant")
    app.add_typer(token_app, name="token")
    app.add_typer(service_app, name="service")
    app.add_typer(origin_app, name="origin")
    app.add_typer(node_app, name="node")
    app.add_typer(fn_app, name="fn")
    app.add_typer(kv_app, name="kv")
    app.add_typer(protection_app, name="protection")
    app.command("hostnames")(hostnames)
