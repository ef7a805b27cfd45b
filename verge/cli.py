"""The ``verge`` command. Wires the parts together; the logic lives in the packages."""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from verge.cli_control import register as register_control_commands
from verge.cli_secrets import secret_value

app = typer.Typer(
    name="verge",
    help="Verge: a self-hosted edge platform (CDN edge cache, streaming, edge compute).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"verge {version('verge')}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False,
) -> None:
    """Verge: a self-hosted edge platform (CDN edge cache, streaming, edge compute)."""


def _split_hostport(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise typer.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint=option)
    return (host.strip("[]") or "0.0.0.0"), int(port)


def _parent_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise typer.BadParameter(f"expected http://HOST:PORT, got {url!r}", param_hint="--parent")
    return f"{parts.scheme}://{parts.netloc}"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _choose_h2_engine(engine: str, https: bool) -> None:
    """--h2-engine: checked here, handed to the workers through their environment."""
    from verge.edge.worker import H2_ENGINE_ENV

    if engine not in ("auto", "python", "native"):
        _fail("--h2-engine must be 'auto', 'python' or 'native'")
    if engine == "auto":
        from verge.http import native_h2

        engine = "native" if https and native_h2.available() else "python"
    if engine == "native":
        from verge.http import native_h2

        if not https:
            _fail("--h2-engine native needs --https HOST:PORT")
        if not native_h2.available():
            _fail(f"--h2-engine native: {native_h2.BUILD_HINT}")
    os.environ[H2_ENGINE_ENV] = engine


@app.command()
def edge(
    listen: Annotated[str, typer.Option(
        help="HOST:PORT for client traffic (port 0: any free port, printed when ready).")] = "127.0.0.1:8080",
    origin: Annotated[str | None, typer.Option(
        help="Origin URL for a catch-all service (like varnishd -b).")] = None,
    cache_dir: Annotated[Path, typer.Option(help="Disk cache directory (kept across restarts).")] = Path("./cache"),
    admin: Annotated[str, typer.Option(help="HOST:PORT of the admin API (purge, metrics).")] = "127.0.0.1:8081",
    admin_token: Annotated[str | None, typer.Option(
        envvar="VERGE_ADMIN_TOKEN", callback=secret_value, help="Token for the admin API; a random one is printed if not given. @FILE reads it from a file.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes sharing the port (default: cores).")] = 0,
    config: Annotated[Path | None, typer.Option(help="YAML config file (services, rules, limits).")] = None,
    access_log: Annotated[str | None, typer.Option(
        help="Access log: a file path, '-' for stdout. Default: the config's access_log, else off.")] = None,
    control: Annotated[list[str] | None, typer.Option(
        envvar="VERGE_CONTROL",
        help="Control plane URL: take services, purges from it. Repeat the flag, or separate "
             "URLs with commas (VERGE_CONTROL too), to list the replicas of one control "
             "plane: the edge uses one and fails over to the next.")] = None,
    join_token: Annotated[str | None, typer.Option(
        envvar="VERGE_JOIN_TOKEN", callback=secret_value, help="Join token (first start with --control). @FILE reads it from a file.")] = None,
    name: Annotated[str | None, typer.Option(help="Node name in the fleet (default: host name).")] = None,
    region: Annotated[str | None, typer.Option(help="Region (cache group) this edge belongs to.")] = None,
    parent: Annotated[list[str] | None, typer.Option(
        help="Parent (shield) edge URL for cache misses; repeat for several (chosen per object by rendezvous hashing, failing over, then the origin).")] = None,
    https: Annotated[str | None, typer.Option(
        help="HOST:PORT for HTTPS (TLS 1.2/1.3, HTTP/2 and HTTP/1.1 by ALPN); certificates from the config's tls section.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Default certificate (PEM chain) for --https.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Key of --tls-cert.")] = None,
    h2_engine: Annotated[str, typer.Option(
        help="HTTPS engine: 'native' (Rust: rustls + hyper, HTTP/2 and HTTP/1.1, built by "
             "make install / scripts/build-native.sh), 'python' (the ssl module + h2), or "
             "'auto': native when it is built, else python.")] = "auto",
    geoip: Annotated[Path | None, typer.Option(
        help="GeoIP database (MaxMind format: GeoLite2-Country or -City, as the router's geoip) "
             "where services' deny.countries are looked up. Default: the config's geoip.")] = None,
) -> None:
    """Run an edge cache node in front of one or more origins."""
    from verge.config import ConfigError
    from verge.edge.node import NodeOptions, build_config, check_port_free, run_node

    listen_host, listen_port = _split_hostport(listen, "--listen")
    admin_host, admin_port = _split_hostport(admin, "--admin")
    if workers < 0:
        _fail("--workers must be >= 0")
    token = admin_token or secrets.token_urlsafe(24)
    control = _control_urls(control)
    options = NodeOptions(
        listen_host=listen_host, listen_port=listen_port, admin_host=admin_host,
        admin_port=admin_port, admin_token=token, cache_dir=str(cache_dir.resolve()),
        workers=workers or os.cpu_count() or 1, config_path=str(config) if config else None,
        origin=origin, control=control, join_token=join_token, region=region,
        https_host=_split_hostport(https, "--https")[0] if https else None,
        https_port=_split_hostport(https, "--https")[1] if https else 0,
        tls_cert=str(tls_cert.resolve()) if tls_cert else None,
        tls_key=str(tls_key.resolve()) if tls_key else None,
        node=name or socket.gethostname(),
        parents=[_parent_url(url) for url in parent or []],
    )
    try:
        cfg = build_config(options)
    except ConfigError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(f"--origin: {exc}")
    if bool(tls_cert) != bool(tls_key):
        _fail("--tls-cert and --tls-key go together")
    if https and not (tls_cert or cfg.tls.certificates or cfg.tls.default or control):
        _fail("--https needs certificates: --tls-cert/--tls-key or the config's tls section")
    _choose_h2_engine(h2_engine, bool(https))
    if not cfg.services and not control:
        _fail("no services: give --origin URL, a --config file with services, or --control")
    options.geoip = _edge_geoip(geoip, cfg, bool(control))
    options.access_log = access_log if access_log is not None else cfg.access_log
    checks = [(listen_host, listen_port, "--listen"), (admin_host, admin_port, "--admin")]
    if options.https_host:
        checks.append((options.https_host, options.https_port, "--https"))
    for host, port, what in checks:
        try:
            check_port_free(host, port)
        except OSError as exc:
            _fail(f"{what}: {exc}")
    if admin_token is None:
        typer.echo(f"admin token: {token}", err=True)
    run_node(options, cfg)


def _control_urls(values: list[str] | None) -> list[str]:
    """--control (repeated, or comma-separated; VERGE_CONTROL too): the replicas' URLs."""
    if not values:
        return []
    from verge.control.client import control_urls

    try:
        return control_urls(values)
    except ValueError as exc:
        _fail(f"--control: {exc}")
        return []  # not reached: _fail exits


def _edge_geoip(flag: Path | None, cfg, control: bool) -> str | None:
    """The edge's GeoIP database (--geoip, else the config's geoip), checked now; without one,
    a config file's service that denies countries is an error (with --control the services
    come later: the edge warns and its /stats names them)."""
    path = flag or (Path(cfg.geoip) if cfg.geoip else None)
    if path is None:
        denying = [s.name for s in cfg.services if s.protection and s.protection.deny.countries]
        if denying and not control:
            _fail(f"service {denying[0]!r}: deny.countries needs a GeoIP database: "
                  "--geoip PATH or geoip: PATH in the config")
        return None
    from verge.protect.deny import open_country_lookup

    try:
        open_country_lookup(str(path))
    except ValueError as exc:
        _fail(str(exc))
    return str(path.resolve())


@app.command()
def control(
    listen: Annotated[str, typer.Option(
        help="HOST:PORT of the API and dashboard (port 0: any free port, printed when ready).")] = "127.0.0.1:7000",
    db: Annotated[str, typer.Option(
        help="Store: sqlite:///PATH (default) or postgresql://USER:PASS@HOST/DB.")] = "sqlite:///verge.db",
    admin_token: Annotated[str | None, typer.Option(
        envvar="VERGE_ADMIN_TOKEN", callback=secret_value,
        help="Admin API token to create on first start (default: a random one, printed once). @FILE reads it from a file.")] = None,
) -> None:
    """Run the control plane: REST API, dashboard, config and purge distribution to edges."""
    from verge.control.server import main as run_control_main

    _split_hostport(listen, "--listen")
    token_args = ["--admin-token", admin_token] if admin_token else []
    raise typer.Exit(run_control_main(["--listen", listen, "--db", db, *token_args]))


@app.command()
def purge(
    ctx: typer.Context,
    targets: Annotated[list[str] | None, typer.Argument(help="URLs to purge (http://host/path?query).")] = None,
    admin: Annotated[str, typer.Option(envvar="VERGE_ADMIN", help="Admin URL of the edge node.")] = "http://127.0.0.1:8081",
    token: Annotated[str | None, typer.Option(
        envvar="VERGE_TOKEN", callback=secret_value, help="Edge admin token (--admin), or control-plane token (--control). @FILE reads it from a file.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Purge by surrogate key (Surrogate-Key / Cache-Tag).")] = None,
    prefix: Annotated[list[str] | None, typer.Option(help="Purge every URL under this prefix (http://host/path/).")] = None,
    soft: Annotated[bool, typer.Option("--soft", help="Mark stale (revalidate on next use) instead of removing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON result.")] = False,
    control: Annotated[str | None, typer.Option(
        envvar="VERGE_CONTROL",
        help="Control plane URL: purge on every edge through it instead of one edge's --admin.")] = None,
    service: Annotated[str | None, typer.Option(
        help="With --control: the service whose --tag/--prefix objects to purge.")] = None,
    timeout: Annotated[float, typer.Option(
        min=0, help="With --control: seconds to wait for every edge to acknowledge.")] = 30.0,
) -> None:
    """Purge cached objects by URL, prefix or tag on one edge (--admin) or all edges (--control).

    With --control the purge goes to every edge through the control plane; a progress bar
    follows the edges' acknowledgements, and the command exits non-zero naming the edges that
    did not acknowledge within --timeout.
    """
    import httpx

    if not (targets or tag or prefix):
        _fail("give URLs, --tag or --prefix")
    if _purge_through_control(ctx, control):
        from verge.cli_control import purge_via_control

        purge_via_control(control, token, urls=targets or [], prefixes=prefix or [], tags=tag or [],
                          soft=soft, service=service, timeout=timeout, as_json=as_json)
        return
    if service is not None:
        _fail("--service needs --control (an edge's admin API purges across all services)")
    if not token:
        _fail("an admin token is required (--token or VERGE_TOKEN)")
    body = {"urls": targets or [], "tags": tag or [], "prefixes": prefix or [], "soft": soft}
    try:
        response = httpx.post(admin.rstrip("/") + "/purge", json=body,
                              headers={"Authorization": f"Bearer {token}"}, timeout=30)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {admin}: {exc}")
    try:
        result = response.json()
    except ValueError:
        result = {"error": response.text}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif response.status_code == 200:
        kind = "soft-purged (marked stale)" if soft else "purged"
        typer.echo(f"{kind}: {result.get('disk', 0)} on disk, {result.get('memory', 0)} in memory "
                   f"across {result.get('workers', 0)} workers")
    if response.status_code != 200:
        _fail(result.get("error", f"HTTP {response.status_code}"))


def _purge_through_control(ctx: typer.Context, control: str | None) -> bool:
    """--control wins unless --admin is on the command line; flags beat environment variables."""
    def given_as_flag(name: str) -> bool:  # typer vendors click: compare the source by name
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "COMMANDLINE"

    on_command_line = {name for name in ("admin", "control") if given_as_flag(name)}
    if on_command_line == {"admin", "control"}:
        _fail("give --admin (one edge) or --control (all edges), not both")
    return bool(control) and "admin" not in on_command_line


@app.command("demo-origin")
def demo_origin(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:9000",
) -> None:
    """Run the sample origin (static files, API, dynamic pages) used by the demo."""
    from verge.demo.origin import run_origin

    host, port = _split_hostport(listen, "--listen")
    run_origin(host, port)


@app.command()
def demo(
    listen: Annotated[str, typer.Option(help="HOST:PORT of the demo edge.")] = "127.0.0.1:8080",
    origin_listen: Annotated[str, typer.Option(help="HOST:PORT of the sample origin.")] = "127.0.0.1:9000",
    state_dir: Annotated[Path, typer.Option(help="Where the demo keeps its cache.")] = Path(".demo"),
) -> None:
    """Start the sample origin and an edge in front of it, with the built-in demo config."""
    from verge.demo.run import run_demo

    run_demo(_split_hostport(listen, "--listen"), _split_hostport(origin_listen, "--origin-listen"),
             state_dir)


@app.command()
def up(
    state_dir: Annotated[Path, typer.Option(help="Where state lives; up.json is written here when ready.")] = Path(".verge-up"),
    control_port: Annotated[int, typer.Option(help="Control plane port on 127.0.0.1.")] = 7000,
    edge_port: Annotated[int, typer.Option(help="Port every edge listens on (127.0.0.2, .3, ...); admin on port+1.")] = 8080,
    https_port: Annotated[int, typer.Option(help="HTTPS port of every edge (dev CA certificates).")] = 8443,
    origin_port: Annotated[int, typer.Option(help="Sample origin port on 127.0.0.1.")] = 9000,
    edges: Annotated[int, typer.Option(help="How many edges.")] = 2,
    dns_port: Annotated[int, typer.Option(help="Router's DNS port (UDP and TCP) on 127.0.0.1.")] = 5353,
    router_port: Annotated[int, typer.Option(help="Router's HTTP redirect port on 127.0.0.1.")] = 8053,
    rtmp_port: Annotated[int, typer.Option(help="Stream server's RTMP port on 127.0.0.1.")] = 1935,
    stream_port: Annotated[int, typer.Option(help="Stream server's HTTP port on 127.0.0.1 (the edges' origin for /live/).")] = 8090,
    geoip: Annotated[Path | None, typer.Option(help="GeoIP database (MaxMind format) for the router and the edges (deny.countries).")] = None,
) -> None:
    """The whole platform locally: control plane, edges, a sample origin; prints URLs and an admin token."""
    from verge.up import UpOptions, run_up

    if not 1 <= edges <= 50:
        _fail("--edges must be between 1 and 50")
    run_up(UpOptions(state_dir=state_dir, control_port=control_port, edge_port=edge_port,
                     origin_port=origin_port, edges=edges, https_port=https_port,
                     dns_port=dns_port, router_port=router_port, rtmp_port=rtmp_port,
                     stream_port=stream_port, geoip=geoip))


@app.command()
def router(
    config: Annotated[Path, typer.Option(help="Router YAML: zone, regions (CIDRs, neighbours), health; edges without --control.")],
    dns: Annotated[str, typer.Option(help="HOST:PORT of the authoritative DNS server (UDP and TCP).")] = "127.0.0.1:5353",
    http: Annotated[str | None, typer.Option(help="HOST:PORT of the HTTP 302 router (off when not given).")] = None,
    control: Annotated[str | None, typer.Option(
        envvar="VERGE_CONTROL", help="Control plane URL (several: comma-separated replicas): edges, health and hostnames from it.")] = None,
    token: Annotated[str | None, typer.Option(envvar="VERGE_TOKEN", callback=secret_value, help="Control-plane token (read-only is enough). @FILE reads it from a file.")] = None,
) -> None:
    """Route users to the nearest healthy edge: GeoDNS (ECS-aware) and HTTP redirects."""
    import uvloop

    from verge.config import ConfigError
    from verge.routing.router import RouterOptions, run_router
    from verge.routing.settings import load_router_config

    try:
        cfg = load_router_config(config)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    if control and not token:
        _fail("--control needs --token (or VERGE_TOKEN)")
    if control:
        control = ",".join(_control_urls([control]))  # checked here: a clear error, exit 2
    if not control and not cfg.edges:
        _fail(f"{config}: no edges listed and no --control to take them from")
    dns_host, dns_port = _split_hostport(dns, "--dns")
    http_host, http_port = _split_hostport(http, "--http") if http else (None, 0)
    options = RouterOptions(dns_host, dns_port, http_host, http_port, control, token)
    try:
        uvloop.run(run_router(cfg, options))
    except ValueError as exc:  # e.g. a GeoIP database that cannot be opened
        _fail(f"{config}: {exc}")
    except OSError as exc:
        _fail(f"cannot listen: {exc}")


@app.command()
def stream(
    rtmp: Annotated[str, typer.Option(help="HOST:PORT of the RTMP ingest (publish to rtmp://HOST:PORT/APP/NAME?key=KEY).")] = "127.0.0.1:1935",
    http: Annotated[str, typer.Option(help="HOST:PORT serving HTTP-FLV, HLS and DASH (the edges' origin).")] = "127.0.0.1:8090",
    config: Annotated[Path | None, typer.Option(help="YAML config; its `stream` section (apps, keys, ladder, part/segment targets).")] = None,
) -> None:
    """Run the streaming server: RTMP ingest, ABR transcoding, LL-HLS/HLS/DASH/HTTP-FLV."""
    import uvloop

    from verge.config import ConfigError, load_config
    from verge.stream.server import run_stream

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(str(exc))
    from verge.stream.transcode import FfmpegNotFound, resolve_ffmpeg

    try:
        resolve_ffmpeg()  # before listening: a stream server without ffmpeg cannot package
    except FfmpegNotFound as exc:
        _fail(str(exc))
    rtmp_at, http_at = _split_hostport(rtmp, "--rtmp"), _split_hostport(http, "--http")
    try:
        uvloop.run(run_stream(cfg.stream, rtmp_at, http_at))
    except OSError as exc:
        _fail(f"cannot listen: {exc}")


@app.command("config-check")
def config_check(path: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Validate a config file: prints file:line: reason and exits non-zero when it is wrong."""
    from verge.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"{path}: ok ({len(cfg.services)} services)")


@app.command("sign-url")
def sign_url(
    url: Annotated[str, typer.Argument(help="The URL to sign (http://HOST/live/show.m3u8).")],
    secret: Annotated[str, typer.Option(
        envvar="VERGE_SIGNING_SECRET", help="The rule's signed.secret (at least 16 characters).")],
    prefix: Annotated[str | None, typer.Option(
        help="Path prefix the token grants (default: the URL's path), e.g. /live/show.")] = None,
    ttl: Annotated[str, typer.Option(help="How long the token is valid (3600, 90s, 2h, 1d).")] = "3600",
    param: Annotated[str, typer.Option(help="The rule's signed.param.")] = "token",
) -> None:
    """Print URL with a signed token (HMAC, expiring) for a rule with `signed:`."""
    from verge.config import parse_duration
    from verge.edge.signing import sign_url as signed

    try:
        typer.echo(signed(url, secret, prefix=prefix, ttl=parse_duration(ttl), param=param))
    except ValueError as exc:
        _fail(str(exc))


register_control_commands(app)


def _register_subcommands() -> None:
    from verge.cli_cert import register as register_cert

    register_cert(app)
    from verge.cli_vod import register as register_vod

    register_vod(app)


_register_subcommands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
