"""An edge worker process: one event loop serving the shared port (SO_REUSEPORT).

Started by the node supervisor (:mod:`verge.edge.node`) as ``python -m verge.edge.worker
--fd N``: a fresh interpreter rather than a fork, so no event loop, SQLite connection or
thread state leaks from the parent. File descriptor N is the worker's end of a socketpair;
the supervisor sends one JSON line per command (init, purge, stats, config, tls_tickets,
kv, function_logs, protection_events)
and the worker answers each with one JSON line. When the supervisor goes away, the worker
exits.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
import time

import uvloop

from verge.cache.disk import DiskStore
from verge.cache.memory import MemoryStore
from verge.cache.store import TieredCache
from verge.cidr import CidrSet
from verge.config import Config
from verge.edge.app import EdgeApp
from verge.edge.compute import EdgeCompute
from verge.edge.ingest import EdgeIngest
from verge.edge.protect import ProtectSharing, take_events
from verge.http import wirefile
from verge.http.client import OriginPool
from verge.http.server import (
    CLOCK,
    HttpServerProtocol,
    ServerLimits,
    ensure_sweeper,
    reuseport_socket,
    serve,
)
from verge.observe.accesslog import AccessLog
from verge.observe.metrics import EdgeMetrics
from verge.protect.challenge import SECRET_FILE
from verge.protect.deny import CountryLookup, open_country_lookup
from verge.protect.keys import steerable
from verge.protect.shared import SharedTable
from verge.protect.steer import attach_client_steering, detach_client_steering

log = logging.getLogger("verge.worker")
H2_ENGINE_ENV = "VERGE_H2_ENGINE"  # "native": HTTPS by verge.http.native_h2
DRAIN_SECONDS = 3.0  # SIGTERM: how long requests in flight may take (the supervisor waits 5 s)
MOUNT_SECONDS = 15.0  # start-up waits this long for the ingest routes (the supervisor: 30 s)


def server_limits(config: Config, *, plain: bool = False) -> ServerLimits:
    """The protocol limits of the config: its ``limits`` section passed by field name (each
    is a ServerLimits field), and the cache's sendfile choice. ``plain``: for the plain-HTTP
    port, the only one a PROXY protocol header may precede (before TLS it would need the TLS
    layer's help)."""
    proxy_from = CidrSet(config.proxy_protocol) if plain and config.proxy_protocol else None
    return ServerLimits(
        **config.limits.model_dump(), zero_copy=config.cache.sendfile, proxy_from=proxy_from
    )


def tls_certs(config: Config):
    """(certificates, default) for verge.http.tls.TlsStore from the config's tls section."""
    from verge.http.tls import CertSpec

    def spec(cert) -> CertSpec:
        # inline PEMs were written to files by the supervisor (Node.local_tls)
        return CertSpec(cert.cert, cert.key, tuple(cert.hosts), cert.ocsp_response)

    tls = config.tls
    return [spec(c) for c in tls.certificates], (spec(tls.default) if tls.default else None)


class Worker:
    def __init__(self, init: dict) -> None:
        self.index = init["index"]
        self.options = init["options"]
        config = Config.model_validate(init["config"])
        self.config = config
        workers = max(1, self.options["workers"])
        cache_settings = config.cache
        memory = MemoryStore(cache_settings.memory_bytes // workers, cache_settings.eviction,
                             max_object_bytes=cache_settings.max_memory_object_bytes)
        self.disk = DiskStore(self.options["cache_dir"], cache_settings.disk_bytes)
        wirefile.POOL.keep_in(self.options["cache_dir"])  # hot large hits' sendfile files
        cache = TieredCache(memory, self.disk, cache_settings.max_memory_object_bytes)
        timeouts = config.origin_timeouts
        self.pool = OriginPool(connect_timeout=timeouts.connect,
                               first_byte_timeout=timeouts.first_byte, idle_timeout=timeouts.idle)
        self.metrics = EdgeMetrics()
        self.access_log = AccessLog(self.options.get("access_log"))
        self.compute = EdgeCompute(self.options["cache_dir"])
        table_fd = init.get("rate_table_fd")
        self.workers = workers
        self.listeners: list[socket.socket] = []  # the HTTP and HTTPS listening sockets
        self.app = EdgeApp(config, cache, self.pool, metrics=self.metrics,
                           protect=ProtectSharing(
                               # one worker: every key is exact in its own memory
                               SharedTable.attach(table_fd)
                               if table_fd is not None and workers > 1 else None,
                               steered=workers == 1,  # (more: once they steer, steer())
                               country_of=country_lookup(self.options.get("geoip")),
                               workers=workers, listeners=self.listeners,
                               secret_file=os.path.join(self.options["cache_dir"], SECRET_FILE)),
                           access_log=self.access_log, node="verge",
                           name=self.options["node"], parents=self.options.get("parents") or (),
                           compute=self.compute,
                           ingest=EdgeIngest(self.options["cache_dir"], self.index, self.compute))
        self.limits = server_limits(config)  # HTTPS and HTTP/3
        self.http_limits = server_limits(config, plain=True)  # the plain port: PROXY too
        self.ticket_keys: list[str] = init.get("tls_tickets") or []  # encoded; never logged

    async def run(self, ctrl: socket.socket) -> None:
        # Ingest routes first: until its listening socket exists, the kernel sends this
        # worker no connection, so no reading can arrive before its spool is open. (A mount
        # that hangs does not keep the worker down: its route answers 503 meanwhile.)
        mounting = self.app.start()
        if mounting is not None:
            await asyncio.wait({mounting}, timeout=MOUNT_SECONDS)
        host, port = self.options["listen_host"], self.options["listen_port"]
        sock = reuseport_socket(host, port)
        self.listeners.append(sock)  # (steered when a client-IP rate limit asks for it)
        self.steer()
        self.server = await serve(self.app, sock, self.http_limits)
        if self.options.get("https_port"):
            await self._serve_https()
        # What start-up built (config, routes, modules) lives as long as the process: out of
        # the collector's way, so the periodic full collections stay short (see gc.freeze).
        gc.freeze()
        loop = asyncio.get_running_loop()
        ensure_sweeper()
        loop.create_task(self._housekeeping())
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(self.shutdown()))
        reader, writer = await asyncio.open_unix_connection(sock=ctrl)
        writer.write(b'{"ok": true, "ready": true}\n')
        while True:
            line = await reader.readline()
            if not line:
                return  # supervisor gone
            try:
                reply = self.command(json.loads(line))
            except Exception as exc:  # a bad command must not kill the worker
                log.exception("control command failed")
                reply = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")

    async def shutdown(self, grace: float = DRAIN_SECONDS) -> None:
        """SIGTERM: stop accepting, let the requests in flight finish (HTTP/2 clients get a
        GOAWAY, idle keep-alive connections close), then exit — within `grace` seconds."""
        for server in (self.server, getattr(self, "tls_server", None), getattr(self, "h3", None)):
            if server is not None:
                server.close()
        native = getattr(self, "native_h2", None)
        if native is not None:
            native.close()  # GOAWAY on every native connection; streams in flight finish
        for conn in list(HttpServerProtocol.connections):
            conn.close_gracefully()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (HttpServerProtocol.connections or (native is not None and native.connections)) \
                and loop.time() < deadline:
            await asyncio.sleep(0.02)  # connections close on their own schedule
        self.app.records.flush()
        os._exit(0)

    def command(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "purge":
            count = sum(self.app.cache.purge_memory(kind, value, bool(msg.get("soft")))
                        for kind, value in msg["targets"])
            return {"ok": True, "count": count}
        if op == "stats":
            self.app.records.drain()
            snap = self.metrics.snapshot()
            snap.update(self.app.cache.stats())
            snap["connections"] = len(HttpServerProtocol.connections)
            snap["functions"] = self.compute.stats()
            snap["protection"] = self.app.protection_stats()
            snap["open_files_limit"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            gate = self.app.connection_gate
            snap["connections_refused"] = gate.refused if gate is not None else 0
            if self.app.flood is not None:
                snap["flood"] = self.app.flood.stats()
            return {"ok": True, "stats": snap}
        if op == "config":
            self.apply_config(Config.model_validate(msg["config"]))
            return {"ok": True, "generation": self.app.generation}
        if op == "kv":  # the agent wrote KV changes to CACHE_DIR/control/kv.db
            return {"ok": True, "seq": self.compute.kv.refresh()}
        if op == "function_logs":
            return {"ok": True, "records": self.compute.take_logs()}
        if op == "protection_events":  # the refusals kept since the last call (verge.edge.protect)
            guards = (r.protection for r in self.app.runtimes.values() if r.protection is not None)
            return {"ok": True, "events": take_events(guards)}
        if op == "tls_tickets":
            return self.set_ticket_keys(msg["keys"])
        if op == "ping":
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def _serve_https(self) -> None:
        """The TLS listener: SNI picks the certificate, ALPN the protocol (h2 or http/1.1).

        With the native engine (``verge edge --h2-engine native``, or ``auto`` when it is
        built: VERGE_H2_ENGINE=native) the native front (:mod:`verge.http.native_h2`) serves
        it: TLS, HTTP/2 and HTTP/1.1 in Rust; else the Python ssl + h2 listener.
        """
        from verge.http.alpn import serve_tls
        from verge.http.tls import TlsStore

        host, port = self.options["https_host"], self.options["https_port"]
        sock = reuseport_socket(host, port)
        self.listeners.append(sock)
        self.steer()
        self.app.https_port = port
        if os.environ.get(H2_ENGINE_ENV) == "native":
            from verge.http.native_h2 import serve_native_h2

            self.native_h2 = await serve_native_h2(self.app, sock, self.limits,
                                                   *tls_certs(self.config))
            self.tls = self.native_h2  # reload() and set_ticket_keys() as TlsStore's
        else:
            self.tls = TlsStore(*tls_certs(self.config))
            self.tls_server = await serve_tls(self.app, sock, self.limits,
                                              self.tls.server_context())
        self.set_ticket_keys(self.ticket_keys)
        await self._serve_h3(host, port)

    def steer(self) -> None:
        """While a service limits by client address, send each address's connections to one
        worker (a classic BPF program on the ports' SO_REUSEPORT groups), so those limits
        are exact in the worker's own memory; otherwise (and where the kernel refuses the
        program) leave the kernel's spreading, and rate limits meet in the node's shared
        table. Steering is off when nothing needs it: behind a proxy, or for a load test
        from one address, it would put every connection on one worker."""
        if self.workers == 1:  # every client is this worker's: its own counts are exact
            return
        wanted = wants_steering(self.config)
        steered = wanted
        for sock in self.listeners:
            try:
                if wanted:
                    attach_client_steering(sock, self.workers)
                else:
                    detach_client_steering(sock)
            except OSError as exc:
                if wanted:
                    log.warning("client steering unavailable (%s): rate limits use the "
                                "shared table", exc)
                steered = False
        if steered != self.app.protect.steered:
            self.app.set_protect_sharing(steered=steered)

    def set_ticket_keys(self, encoded: list[str]) -> dict:
        """The node's shared session ticket keys (first encrypts), so any worker resumes."""
        from verge.http.tls_tickets import decode_keys

        self.ticket_keys = encoded
        if getattr(self, "tls", None) is None or not encoded:
            return {"ok": True, "installed": False}
        keys = decode_keys(encoded)
        if getattr(self, "h3_tickets", None) is not None:  # HTTP/3 resumption: the same keys
            self.h3_tickets.set_keys(keys)
        return {"ok": True, "installed": self.tls.set_ticket_keys(keys)}

    async def _serve_h3(self, host: str, port: int) -> None:
        """HTTP/3 on the same port number over UDP, advertised with Alt-Svc.

        SNI picks the certificate as on TCP; session tickets live in a store every worker
        of the node shares (CACHE_DIR/control/quic_tickets.db), sealed with the node's keys.
        """
        import sqlite3
        from pathlib import Path

        from verge.http.h3server import QuicCertificates, serve_h3
        from verge.http.quic_tickets import QuicTicketStore
        from verge.http.tls_tickets import decode_keys

        certs, default = tls_certs(self.config)
        if not certs and default is None:
            return
        try:
            self.h3_certs = QuicCertificates(certs, default)
            self.h3_tickets = QuicTicketStore(
                Path(self.options["cache_dir"]) / "control" / "quic_tickets.db",
                decode_keys(self.ticket_keys),
            )
            self.h3 = await serve_h3(self.app, host, port, self.h3_certs, self.limits,
                                     tickets=self.h3_tickets)
        except (OSError, ValueError, sqlite3.Error) as exc:
            log.error("HTTP/3 disabled on UDP %s:%d: %s", host, port, exc)
            return
        self.app.alt_svc = f'h3=":{port}"; ma=86400'
        self.app.apply_config(self.config)  # re-plan so HTTPS responses carry Alt-Svc

    def apply_config(self, config: Config) -> None:
        """A reload: routing, rules, limits and origin timeouts change in place.

        Cache sizes and the eviction policy are fixed at start (they need a restart).
        """
        self.config = config
        self.app.apply_config(config)
        self.steer()
        self.app.start()
        if getattr(self, "tls", None) is not None:  # certificates rotate without a restart
            self.tls.reload(*tls_certs(config))
        if getattr(self, "h3", None) is not None:  # and for new HTTP/3 connections
            self.h3_certs.reload(*tls_certs(config))
        for limits, plain in ((self.limits, False), (self.http_limits, True)):
            new_limits = server_limits(config, plain=plain)
            for name in new_limits.__dataclass_fields__:  # the protocols share these objects
                setattr(limits, name, getattr(new_limits, name))
        timeouts = config.origin_timeouts
        self.pool.connect_timeout = timeouts.connect
        self.pool.first_byte_timeout = timeouts.first_byte
        self.pool.idle_timeout = timeouts.idle

    async def _housekeeping(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            self.app.records.flush()
            if self.app.flood is not None:
                self.app.flood.sweep(time.monotonic())  # networks whose penalty is over
            if ticks % 5 == 0:
                self.app.sweep_protection()  # expired rate-limit keys
            try:
                self.disk.flush()  # batched access times for the disk tier's LRU
            except Exception:
                log.exception("disk index flush failed")


def country_lookup(path: str | None) -> CountryLookup | None:
    """The node's GeoIP database (``verge edge --geoip``), opened once per worker for the
    services' ``deny.countries``. None without one, or when it cannot be opened (the CLI
    checked it; a file gone since then leaves country lists unapplied, each with a warning,
    rather than the worker down)."""
    if not path:
        return None
    try:
        return open_country_lookup(path)
    except ValueError as exc:
        log.error("%s: deny.countries not applied", exc)
        return None


def wants_steering(config: Config) -> bool:
    """Whether a service limits requests by the client's address as the kernel sees it
    (a client_ip key, no trusted proxies and no PROXY protocol: behind those the peer is
    the proxy)."""
    if config.proxy_protocol:  # every peer is a load balancer
        return False
    return any(
        steerable(rule.key)
        for service in config.services if service.protection is not None
        and not service.protection.trusted_proxies
        for rule in service.protection.rate_limits)


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (often 1024 -> 524288): a flood of
    connections must meet the connection caps and timeouts, not EMFILE on accept. Returns
    the limit now in force (reported in the worker's stats)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d: %s", soft, exc)
    return soft


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="verge edge worker (started by `verge edge`)")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(message)s",
                        stream=sys.stderr)
    ctrl = socket.socket(fileno=args.fd)
    # the first line is the init payload
    data = b""
    while not data.endswith(b"\n"):
        chunk = ctrl.recv(1 << 20)
        if not chunk:
            return
        data += chunk
    init = json.loads(data)
    raise_open_files_limit()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    CLOCK.tick()
    worker = Worker(init)

    def stop(*_: object) -> None:  # SIGTERM from the supervisor: keep the buffered log lines
        worker.app.records.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    ctrl.setblocking(False)
    try:
        uvloop.run(worker.run(ctrl))
    finally:
        worker.app.records.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
