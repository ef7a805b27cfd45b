"""``verge service ...``: services (host names, origins and rules), served by every edge.

A service goes to the control plane as a spec built from flags and/or a YAML file; `service
show` prints it as YAML that `service edit --from-file` takes back, refused when someone else
changed the service in between (the ETag the show read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from verge.cli.common import EXIT_USAGE, Api, ServiceName, cell, fail_line, with_api

service_app = typer.Typer(
    help="Services: host names, origins and rules, served by every edge.", no_args_is_help=True
)

BOOKKEEPING_KEYS = ("id", "version", "created_at", "updated_at")
"""Keys the control plane adds to a service it returns; dropped before sending a file back."""
SERVICE_COLUMNS = [
    ("name", "NAME"),
    ("tenant", "TENANT"),
    ("hosts", "HOSTS"),
    ("origins", "ORIGINS"),
    ("rules", "RULES"),
    ("default", "DEFAULT"),
    ("version", "VERSION"),
]


def _read_yaml(path: Path, what: str) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        fail_line(f"{path}: cannot read {what}: {exc.strerror or exc}", EXIT_USAGE)
    except UnicodeDecodeError:
        fail_line(f"{path}: {what} is not UTF-8 text", EXIT_USAGE)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        fail_line(f"{where}: invalid YAML: {exc.problem}", EXIT_USAGE)
    except yaml.YAMLError as exc:
        fail_line(f"{path}: invalid YAML: {exc}", EXIT_USAGE)


def _service_file(path: Path, name: str) -> dict[str, Any]:
    """A service spec from YAML/JSON; its name, if any, must be NAME."""
    data = _read_yaml(path, "service file")
    if not isinstance(data, dict):
        fail_line(
            f"{path}: a service file is a mapping (name, hosts, origins, rules, ...)", EXIT_USAGE
        )
    if data.get("name", name) != name:
        fail_line(f"{path}: the file describes service {data['name']!r}, not {name!r}", EXIT_USAGE)
    spec = {key: value for key, value in data.items() if key not in BOOKKEEPING_KEYS}
    spec["name"] = name
    return spec


def _rule_file(path: Path) -> list[Any]:
    """Rules from YAML: a list of rules, or a mapping with a `rules:` list."""
    data = _read_yaml(path, "rule file")
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if not isinstance(data, list):
        fail_line(f"{path}: a rule file is a list of rules (or `rules:` with a list)", EXIT_USAGE)
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
        fail_line(
            "give --rule-file or --from-file, not both (put the rules in the file)", EXIT_USAGE
        )
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
        fail_line(
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
@with_api
def service_add(
    api: Api,
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
) -> None:
    """Create a service; every edge starts serving it once it fetches the new config."""
    spec = _service_spec(name, host, origin, tenant, default, rule_file, from_file)
    created = api.call(lambda client: client.create_service(spec))
    api.report(
        created.data,
        f"service {name} created (version {created.version or '-'}): "
        f"{cell(spec['hosts'])} -> {cell(_hosts_and_origins(spec)['origins'])}",
    )


@service_app.command("list")
@with_api
def service_list(api: Api) -> None:
    """List the services this token can see."""
    api.list_all(
        lambda client: client.list_services, "Services", SERVICE_COLUMNS, _hosts_and_origins
    )


@service_app.command("show")
@with_api
def service_show(api: Api, name: ServiceName) -> None:
    """Print a service as YAML, ready to edit and feed to `service edit --from-file`."""
    service = api.call(lambda client: client.get_service(name))
    if api.printed_json(service.data):
        return
    typer.echo(f"# service {name}, version {service.version or service.etag or '-'}")
    typer.echo(_service_yaml(service.data), nl=False)


@service_app.command("rm")
@with_api
def service_rm(api: Api, name: ServiceName) -> None:
    """Delete a service; edges stop serving its hosts with their next config."""
    api.call(lambda client: client.delete_service(name))
    api.report({"deleted": name}, f"service {name} deleted")


@service_app.command("edit")
@with_api
def service_edit(
    api: Api,
    name: ServiceName,
    from_file: Annotated[
        Path, typer.Option(help="The whole new service spec (YAML, as `service show` prints).")
    ],
) -> None:
    """Replace a service with the file, unless someone else changed it since it was read."""
    from verge.control.client import ControlError

    spec = _service_file(from_file, name)
    with api.session() as client:
        current = client.get_service(name)
        try:
            updated = client.update_service(name, spec, current.etag)
        except ControlError as exc:
            if exc.status != 412:
                raise
            fail_line(
                f"service {name!r} was changed by someone else while you edited it; "
                f"run `verge service show {name}` and apply your change again"
            )
    api.report(
        updated.data,
        f"service {name} updated (version {current.version or '-'} -> {updated.version or '-'})",
    )
