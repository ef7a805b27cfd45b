"""``verge fn deploy|list|show|logs|rollback|rm``: edge functions (WebAssembly, WASI/WAGI),
deployed to every edge and versioned."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from verge.cli.common import EXIT_USAGE, Api, done, fail_line, table, with_api

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
VERSION_COLUMNS = [
    ("version", "VERSION"),
    ("active", "ACTIVE"),
    ("service", "SERVICE"),
    ("sha", "MODULE SHA-256"),
    ("size", "BYTES"),
    ("created_at", "DEPLOYED"),
    ("created_by", "BY"),
]
FunctionName = Annotated[str, typer.Argument(help="Function name.")]


def _env_pairs(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            fail_line(f"--env takes NAME=VALUE, got {pair!r}", EXIT_USAGE)
        env[name] = value
    return env


def _read_module(path: Path) -> bytes:
    try:
        module = path.read_bytes()
    except OSError as exc:
        fail_line(f"{path}: cannot read the module: {exc.strerror or exc}", EXIT_USAGE)
    if not module.startswith(b"\0asm"):
        fail_line(f"{path}: not a WebAssembly binary (compile to wasm32-wasi first)", EXIT_USAGE)
    return module


def _fn_row(fn: dict[str, Any]) -> dict[str, Any]:
    """A function or one of its versions, with its module's SHA-256 shortened."""
    return {**fn, "sha": str(fn.get("module_sha256", ""))[:16]}


@fn_app.command("deploy")
@with_api
def fn_deploy(
    api: Api,
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
) -> None:
    """Deploy a new version; every edge switches to it at once with its next config poll."""
    wasm = _read_module(module)
    deployed = api.call(
        lambda client: client.deploy_function(
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
        ),
    )
    api.report(
        deployed,
        f"function {name} version {deployed.get('version')} deployed to service {service} "
        f"({len(wasm)} bytes, sha256 {str(deployed.get('module_sha256', ''))[:16]}...)",
    )


@fn_app.command("list")
@with_api
def fn_list(api: Api) -> None:
    """List functions (the active version of each)."""
    api.list_all(lambda client: client.list_functions, "Functions", FN_COLUMNS, _fn_row)


@fn_app.command("show")
@with_api
def fn_show(api: Api, name: FunctionName) -> None:
    """A function's active version and every stored version."""
    fn = api.call(lambda client: client.get_function(name))
    if api.printed_json(fn):
        return
    table("Function", [_fn_row(fn)], FN_COLUMNS)
    table("Versions", [_fn_row(version) for version in fn["versions"]], VERSION_COLUMNS)


@fn_app.command("logs")
@with_api
def fn_logs(
    api: Api,
    name: FunctionName,
    limit: Annotated[int, typer.Option(help="How many of the newest records.")] = 100,
) -> None:
    """What edges reported of the function: failures, its stderr, modules that did not load."""
    records = api.call(lambda client: client.function_logs(name, limit))
    if api.printed_json(records):
        return
    if not records:
        done(f"(no log records for {name})")
    for record in records:
        done(_log_line(record))


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
@with_api
def fn_rollback(
    api: Api,
    name: FunctionName,
    version: Annotated[
        int | None, typer.Option(help="Version to make active (default: the previous one).")
    ] = None,
) -> None:
    """Make an earlier version active again on every edge."""
    active = api.call(lambda client: client.rollback_function(name, version))
    api.report(active, f"function {name} rolled back: version {active.get('version')} is active")


@fn_app.command("rm")
@with_api
def fn_rm(api: Api, name: FunctionName) -> None:
    """Delete a function and all its versions; edges stop running it."""
    api.call(lambda client: client.delete_function(name))
    api.report({"deleted": name}, f"function {name} deleted")
