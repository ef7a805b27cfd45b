"""``verge edge``: run an edge cache node in front of one or more origins.

The flags become `verge.edge.node.NodeOptions`; everything that can be wrong with them (ports,
certificates, the HTTPS engine, GeoIP, a config without services) is checked here, before any
worker starts, and reported as one line with exit 2.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from verge.cli.common import control_urls, fail, split_hostport
from verge.cli.secrets import secret_option

if TYPE_CHECKING:
    from verge.config import Config
    from verge.edge.node import NodeOptions

Listen = Annotated[
    str,
    typer.Option(help="HOST:PORT for client traffic (port 0: any free port, printed when ready)."),
]
Origin = Annotated[
    str | None, typer.Option(help="Origin URL for a catch-all service (like varnishd -b).")
]
CacheDir = Annotated[Path, typer.Option(help="Disk cache directory (kept across restarts).")]
Admin = Annotated[str, typer.Option(help="HOST:PORT of the admin API (purge, metrics).")]
AdminToken = Annotated[
    str | None,
    secret_option(
        "VERGE_ADMIN_TOKEN", "Token for the admin API; a random one is printed if not given."
    ),
]
Workers = Annotated[int, typer.Option(help="Worker processes sharing the port (default: cores).")]
ConfigFile = Annotated[
    Path | None, typer.Option(help="YAML config file (services, rules, limits).")
]
AccessLog = Annotated[
    str | None,
    typer.Option(
        help="Access log: a file path, '-' for stdout. Default: the config's access_log, else off."
    ),
]
Control = Annotated[
    list[str] | None,
    typer.Option(
        envvar="VERGE_CONTROL",
        help="Control plane URL: take services, purges from it. Repeat the flag, or separate "
        "URLs with commas (VERGE_CONTROL too), to list the replicas of one control "
        "plane: the edge uses one and fails over to the next.",
    ),
]
JoinToken = Annotated[
    str | None, secret_option("VERGE_JOIN_TOKEN", "Join token (first start with --control).")
]
Name = Annotated[str | None, typer.Option(help="Node name in the fleet (default: host name).")]
Region = Annotated[str | None, typer.Option(help="Region (cache group) this edge belongs to.")]
Parent = Annotated[
    list[str] | None,
    typer.Option(
        help="Parent (shield) edge URL for cache misses; repeat for several (chosen per object by rendezvous hashing, failing over, then the origin)."
    ),
]
Https = Annotated[
    str | None,
    typer.Option(
        help="HOST:PORT for HTTPS (TLS 1.2/1.3, HTTP/2 and HTTP/1.1 by ALPN); certificates from the config's tls section."
    ),
]
TlsCert = Annotated[Path | None, typer.Option(help="Default certificate (PEM chain) for --https.")]
TlsKey = Annotated[Path | None, typer.Option(help="Key of --tls-cert.")]
H2Engine = Annotated[
    str,
    typer.Option(
        help="HTTPS engine: 'native' (Rust: rustls + hyper, HTTP/2 and HTTP/1.1, built by "
        "make install / scripts/build-native.sh), 'python' (the ssl module + h2), or "
        "'auto': native when it is built, else python."
    ),
]
GeoIp = Annotated[
    Path | None,
    typer.Option(
        help="GeoIP database (MaxMind format: GeoLite2-Country or -City, as the router's geoip) "
        "where services' deny.countries are looked up. Default: the config's geoip."
    ),
]


def edge(
    listen: Listen = "127.0.0.1:8080",
    origin: Origin = None,
    cache_dir: CacheDir = Path("./cache"),
    admin: Admin = "127.0.0.1:8081",
    admin_token: AdminToken = None,
    workers: Workers = 0,
    config: ConfigFile = None,
    access_log: AccessLog = None,
    control: Control = None,
    join_token: JoinToken = None,
    name: Name = None,
    region: Region = None,
    parent: Parent = None,
    https: Https = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    h2_engine: H2Engine = "auto",
    geoip: GeoIp = None,
) -> None:
    """Run an edge cache node in front of one or more origins."""
    from verge.edge.node import NodeOptions, run_node

    listen_host, listen_port = split_hostport(listen, "--listen")
    admin_host, admin_port = split_hostport(admin, "--admin")
    if workers < 0:
        fail("--workers must be >= 0")
    token = admin_token or secrets.token_urlsafe(24)
    control = control_urls(control)
    https_host, https_port = split_hostport(https, "--https") if https else (None, 0)
    options = NodeOptions(
        listen_host=listen_host,
        listen_port=listen_port,
        admin_host=admin_host,
        admin_port=admin_port,
        admin_token=token,
        cache_dir=str(cache_dir.resolve()),
        workers=workers or os.cpu_count() or 1,
        config_path=str(config) if config else None,
        origin=origin,
        control=control,
        join_token=join_token,
        region=region,
        https_host=https_host,
        https_port=https_port,
        tls_cert=str(tls_cert.resolve()) if tls_cert else None,
        tls_key=str(tls_key.resolve()) if tls_key else None,
        node=name or socket.gethostname(),
        parents=[_parent_url(url) for url in parent or []],
    )
    cfg = _checked_config(options, h2_engine, bool(tls_cert), bool(tls_key))
    options.geoip = _edge_geoip(geoip, cfg, bool(control))
    options.access_log = access_log if access_log is not None else cfg.access_log
    _check_ports_free(options)
    if admin_token is None:
        typer.echo(f"admin token: {token}", err=True)
    run_node(options, cfg)


def _checked_config(options: NodeOptions, h2_engine: str, tls_cert: bool, tls_key: bool) -> Config:
    """The node's config (file, --origin), checked against the TLS and service flags."""
    from verge.config import ConfigError
    from verge.edge.node import build_config

    try:
        cfg = build_config(options)
    except ConfigError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(f"--origin: {exc}")
    https = options.https_host is not None
    if tls_cert != tls_key:
        fail("--tls-cert and --tls-key go together")
    if https and not (tls_cert or cfg.tls.certificates or cfg.tls.default or options.control):
        fail("--https needs certificates: --tls-cert/--tls-key or the config's tls section")
    _choose_h2_engine(h2_engine, https)
    if not cfg.services and not options.control:
        fail("no services: give --origin URL, a --config file with services, or --control")
    return cfg


def _check_ports_free(options: NodeOptions) -> None:
    """Fail now, naming the flag, when a port the node would listen on is taken."""
    from verge.edge.node import check_port_free

    checks = [
        (options.listen_host, options.listen_port, "--listen"),
        (options.admin_host, options.admin_port, "--admin"),
    ]
    if options.https_host:
        checks.append((options.https_host, options.https_port, "--https"))
    for host, port, what in checks:
        try:
            check_port_free(host, port)
        except OSError as exc:
            fail(f"{what}: {exc}")


def _parent_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise typer.BadParameter(f"expected http://HOST:PORT, got {url!r}", param_hint="--parent")
    return f"{parts.scheme}://{parts.netloc}"


def _choose_h2_engine(engine: str, https: bool) -> None:
    """--h2-engine: checked here, handed to the workers through their environment."""
    from verge.edge.worker import H2_ENGINE_ENV

    if engine not in ("auto", "python", "native"):
        fail("--h2-engine must be 'auto', 'python' or 'native'")
    if engine == "auto":
        from verge.http import native_h2

        engine = "native" if https and native_h2.available() else "python"
    if engine == "native":
        from verge.http import native_h2

        if not https:
            fail("--h2-engine native needs --https HOST:PORT")
        if not native_h2.available():
            fail(f"--h2-engine native: {native_h2.BUILD_HINT}")
    os.environ[H2_ENGINE_ENV] = engine


def _edge_geoip(flag: Path | None, cfg: Config, control: bool) -> str | None:
    """The edge's GeoIP database (--geoip, else the config's geoip), checked now; without one,
    a config file's service that denies countries is an error (with --control the services
    come later: the edge warns and its /stats names them)."""
    path = flag or (Path(cfg.geoip) if cfg.geoip else None)
    if path is None:
        denying = [s.name for s in cfg.services if s.protection and s.protection.deny.countries]
        if denying and not control:
            fail(
                f"service {denying[0]!r}: deny.countries needs a GeoIP database: "
                "--geoip PATH or geoip: PATH in the config"
            )
        return None
    from verge.protect.deny import open_country_lookup

    try:
        open_country_lookup(str(path))
    except ValueError as exc:
        fail(str(exc))
    return str(path.resolve())
