"""Run the control plane: migrate the store, make sure an admin can log in, serve the API.

``run_control(host, port, db_url, admin_token)`` is what ``verge control`` calls;
``python -m verge.control.server --listen HOST:PORT --db URL`` does the same without the CLI.
The listening socket is bound before uvicorn starts so that port 0 works: the ready line
``verge control ready: http://HOST:PORT`` (stdout) carries the real port, and is printed only
once the app has started and the socket accepts connections. A generated admin token is
printed once, on stderr (``admin token: vrg_...``); it is never shown again.

Several replicas may share one PostgreSQL database (behind a load balancer, or all listed on
every edge). Start-up is safe when they start together: migrations and the bootstrap admin
token each take an advisory lock, so one replica creates the admin token and the others say
one exists. A replica refuses to start (exit 2) without ``VERGE_SECRET`` on PostgreSQL, or
when the secret does not open the stored certificate keys: it could not build the config
bundle the others serve. Each replica LISTENs for the others' changes (verge.control.notify)
so that their commits wake its long-polling edges and their revocations reach its logins.

uvicorn runs on uvloop with its own access log off: the app writes one JSON line per request
to stderr instead. On SIGTERM/SIGINT waiting long polls are answered at once, so shutdown does
not wait for nodes' 25-second polls.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from verge.control.api import Settings, create_app, release_waiters
from verge.control.certificates import SecretUnavailable, sealer_for
from verge.control.store import Store, StoreError, normalize_url
from verge.control.web import mount_dashboard

DEFAULT_LISTEN = "127.0.0.1:7000"
DEFAULT_DB = "sqlite:///verge.db"
LISTEN_WAIT = 5.0
"""Seconds start-up waits for the change listener before serving anyway (polling)."""


class _Server(uvicorn.Server):
    """uvicorn, plus the ready line after start-up and prompt long-poll release at shutdown."""

    def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
        super().__init__(config)
        self.ready_line = ready_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready_line, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        release_waiters(self.config.app)
        await super().shutdown(sockets)
        # uvicorn re-raises SIGTERM/SIGINT after a graceful stop (exit -15, or a
        # KeyboardInterrupt traceback); a clean stop on request should exit 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_secret(db_url: str) -> None:
    """PostgreSQL replicas must share VERGE_SECRET (certificate keys): StoreError without."""
    url = normalize_url(db_url)
    if url.startswith("sqlite"):
        return
    try:
        sealer_for(url)
    except SecretUnavailable as exc:
        raise StoreError(f"refusing to start: {exc}") from None


def prepare_store(db_url: str, admin_token: str | None) -> Store:
    """Open and migrate the store; make the admin token (printed once when generated).

    StoreError when this replica could not serve: PostgreSQL without VERGE_SECRET, or a
    stored certificate key the secret does not open.
    """
    store = Store(db_url)
    try:
        store.migrate()
        check_secret(db_url)
        generated = store.ensure_admin_token(admin_token)
        if generated:
            print(f"admin token: {generated}", file=sys.stderr, flush=True)
        elif not admin_token:
            print(
                "an admin token exists already; none generated",
                file=sys.stderr,
                flush=True,
            )
        _check_bundle(store)
    except BaseException:
        store.close()
        raise
    return store


def _check_bundle(store: Store) -> None:
    """Fail start-up (StoreError) when this replica cannot build the config bundle whole."""
    try:
        store.bundle()
    except StoreError as exc:
        raise StoreError(f"refusing to start: {exc.message}") from None


def _listen(store: Store) -> None:
    """Hear other replicas' changes (PostgreSQL); warn when the listener is not up yet."""
    if store.listen() and not store.wait_listening(LISTEN_WAIT):
        print(
            "warning: cannot LISTEN for other replicas' changes yet; polling meanwhile",
            file=sys.stderr,
            flush=True,
        )


def run_control(host: str, port: int, db_url: str, admin_token: str | None = None) -> None:
    """Serve the control plane on host:port (0: any free port) until SIGTERM/SIGINT.

    A store that cannot be opened or migrated, or an address that cannot be bound, is one
    ``error: ...`` line on stderr and ``SystemExit(2)``.
    """
    try:
        store = prepare_store(db_url, admin_token)
    except (StoreError, SQLAlchemyError, ValueError, OSError) as exc:
        _fail(describe_error(exc))
    _listen(store)
    try:
        sock = _bind(host, port)
    except OSError as exc:
        store.close()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    real_port = sock.getsockname()[1]
    app = create_app(store, Settings(access_log=sys.stderr))
    mount_dashboard(app)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
        proxy_headers=False,
    )
    server = _Server(config, f"verge control ready: {_url(host, real_port)}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        store.close()


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def describe_error(exc: BaseException) -> str:
    """One line for an operator: what failed at start (store unreachable, port taken...)."""
    if isinstance(exc, StoreError):
        return exc.message
    if isinstance(exc, SQLAlchemyError):
        reason = getattr(exc, "orig", None) or exc
        return "cannot use the store: " + (str(reason).strip().splitlines() or ["?"])[0]
    return str(exc)


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verge.control.server",
        description="Run the Verge control plane (REST API, config and purge distribution).",
    )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT to serve on; port 0 picks a free one (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--db",
        default=DEFAULT_DB,
        help="sqlite:///PATH (default: sqlite:///verge.db) or postgresql://USER:PASS@HOST/DB",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("VERGE_ADMIN_TOKEN"),
        help="admin token to create if missing (default: $VERGE_ADMIN_TOKEN, "
        "else a random one printed once)",
    )
    args = parser.parse_args(argv)
    host, port = args.listen
    run_control(host, port, args.db, args.admin_token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
