"""The edge node supervisor: starts the workers, serves the admin port, fans out purges.

``verge edge`` runs this process. It checks the listen address, starts N worker processes
(each binds the same port with SO_REUSEPORT and runs :mod:`verge.edge.worker`), restarts a
worker that dies, and runs the admin HTTP server (purge, metrics, health, config reload).
Things that must happen once per node happen here: purging the shared disk tier and
enforcing its byte bound. Things that are per worker (memory tiers, counters, config) are
reached over each worker's control channel, so a purge or a config change reaches every
worker before the admin call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

from verge.cache.disk import DiskStore
from verge.cache.store import purge_disk
from verge.config import Config, ConfigError, load_config
from verge.edge.admin import AdminApp
from verge.edge.agent import ControlAgent, module_file
from verge.edge.compute import MODULE_PREFIX
from verge.http.server import ServerLimits, ensure_sweeper, reuseport_socket, serve
from verge.http.tls import InlinePemFiles
from verge.http.tls_tickets import TicketKeySchedule
from verge.protect.shared import SharedTable

log = logging.getLogger("verge.node")


@dataclass
class NodeOptions:
    """`verge edge`'s flags: listeners, workers, cache directory, control plane (the config
    file says what to serve; these say how this node runs)."""

    listen_host: str
    listen_port: int
    admin_host: str
    admin_port: int
    admin_token: str
    cache_dir: str
    workers: int
    config_path: str | None = None
    origin: str | None = None
    access_log: str | None = None
    node: str = "verge"
    https_host: str | None = None   # TLS listener (verge edge --https)
    https_port: int = 0
    tls_cert: str | None = None     # this node's default certificate (PEM) and key
    tls_key: str | None = None
    ticket_rotation: float = 3600.0  # seconds between TLS session ticket key rotations
    # control plane replicas' URLs (verge edge --control A --control B, or "A,B"): the agent
    # talks to one at a time and fails over to the next
    control: list[str] = field(default_factory=list)
    join_token: str | None = None
    region: str | None = None
    parents: list[str] = field(default_factory=list)  # shield edges' URLs (tiered cache)
    geoip: str | None = None  # GeoIP database for deny.countries (verge edge --geoip)

    def public(self) -> dict:
        """Options as sent to workers (the admin token stays in the supervisor)."""
        data = asdict(self)
        data.pop("admin_token")
        data.pop("join_token")
        return data


class WorkerHandle:
    """The supervisor's side of one worker: process + control channel."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()
        self.started_at = 0.0

    async def start(self, init: dict, shared_fds: tuple[int, ...] = ()) -> None:
        parent, child = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "verge.edge.worker", "--fd", str(child.fileno())],
            pass_fds=(child.fileno(), *shared_fds),
        )
        child.close()
        self.started_at = time.monotonic()
        parent.setblocking(False)
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent)
        self.writer.write(json.dumps(init).encode() + b"\n")
        ready = await asyncio.wait_for(self.reader.readline(), 30)
        if not ready:
            raise RuntimeError(f"worker {self.index} exited during start-up")

    async def call(self, msg: dict, timeout: float = 10.0) -> dict:
        async with self.lock:
            self.writer.write(json.dumps(msg).encode() + b"\n")
            line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError(f"worker {self.index} is gone")
        return json.loads(line)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Node:
    def __init__(self, options: NodeOptions, config: Config) -> None:
        self.options = options
        self.config = config
        self.workers = [WorkerHandle(i) for i in range(options.workers)]
        self._stopping = asyncio.Event()
        self.agent: ControlAgent | None = None
        self.ticket_keys = TicketKeySchedule()  # shared by all workers; never logged
        # rate-limit state every worker sees (keys the client steering cannot make
        # worker-local: verge.edge.protect)
        self.rate_table = SharedTable.create()
        self.pem_files = InlinePemFiles(Path(options.cache_dir) / "control" / "certs")
        if options.control:
            self.agent = ControlAgent(self, options.control, options.join_token)
            saved = self.agent.saved_bundle()
            if saved is not None:  # offline autonomy: serve the last good config at once
                self.agent.config_version, self.config = saved

    def local_tls(self, config: Config) -> Config:
        """The config as workers get it: inline certificates as files, plus this node's own
        --tls-cert/--tls-key as the default certificate.

        A control-plane bundle carries certificates as PEM text; ``ssl`` loads files, so they
        are written (0600) under CACHE_DIR/control/certs. The node's own certificate (for
        example from `verge cert dev`) serves every hostname the config has none for.
        """
        opts = self.options
        tls = config.tls
        default_inline = bool(tls.default and tls.default.cert_pem)
        inline = default_inline or any(c.cert_pem for c in tls.certificates)
        own_default = bool(opts.tls_cert) and tls.default is None
        if not opts.https_host or (not inline and not own_default):  # no keys on disk for nothing
            return config
        data = config.model_dump(mode="json")
        data["tls"]["certificates"] = [self._as_files(c) for c in data["tls"]["certificates"]]
        if data["tls"].get("default"):
            data["tls"]["default"] = self._as_files(data["tls"]["default"])
        if own_default:
            data["tls"]["default"] = {"cert": opts.tls_cert, "key": opts.tls_key, "hosts": []}
        return Config.model_validate(data)

    def local_config(self, config: Config) -> Config:
        """The config as workers get it: certificates and function modules as local files."""
        return self.local_functions(self.local_tls(config))

    def local_functions(self, config: Config) -> Config:
        """Functions deployed through the control plane name their module ``sha256:<hex>``;
        the agent has fetched each into CACHE_DIR/control/modules before the config gets
        here, so workers load local files (also after a restart without the control plane)."""
        if not any(fn.module.startswith(MODULE_PREFIX) for fn in config.functions):
            return config
        data = config.model_dump(mode="json")
        for fn in data["functions"]:
            if fn["module"].startswith(MODULE_PREFIX):
                digest = fn["module"].removeprefix(MODULE_PREFIX)
                fn["module"] = str(module_file(self.options.cache_dir, digest))
        return Config.model_validate(data)

    def _as_files(self, cert: dict) -> dict:
        if not cert.get("cert_pem"):
            return cert
        cert_file, key_file = self.pem_files.files_for(cert.pop("cert_pem"), cert.pop("key_pem"))
        return {**cert, "cert": cert_file, "key": key_file}

    def prune_pem_files(self, local: Config) -> None:
        """Remove certificate files the running config no longer uses."""
        tls = local.tls
        certs = [*tls.certificates, *([tls.default] if tls.default else [])]
        used = [path for cert in certs for path in (cert.cert, cert.key) if path]
        self.pem_files.prune(used)

    def init_payload(self, index: int) -> dict:
        return {"index": index, "options": self.options.public(),
                "config": self.local_config(self.config).model_dump(mode="json"),
                "tls_tickets": self.ticket_keys.encoded(),
                "rate_table_fd": self.rate_table.fileno()}

    def reserve_listen_port(self) -> socket.socket:
        """Bind (not listen) the client port with SO_REUSEPORT for the node's lifetime.

        This resolves port 0 to a real port before the workers bind it, and keeps any other
        program from taking the port between worker restarts; connections are only ever
        spread over the workers' listening sockets.
        """
        opts = self.options
        sock = reuseport_socket(opts.listen_host, opts.listen_port, listen=False)
        opts.listen_port = sock.getsockname()[1]
        return sock

    def reserve_https_port(self) -> socket.socket | None:
        opts = self.options
        if not opts.https_host:
            return None
        sock = reuseport_socket(opts.https_host, opts.https_port, listen=False)
        opts.https_port = sock.getsockname()[1]
        return sock

    async def run(self) -> None:
        Path(self.options.cache_dir).mkdir(parents=True, exist_ok=True)
        self.disk = DiskStore(self.options.cache_dir, self.config.cache.disk_bytes)
        admin_sock = reuseport_socket(self.options.admin_host, self.options.admin_port)
        self.options.admin_port = admin_sock.getsockname()[1]
        reservation = self.reserve_listen_port()
        https_reservation = self.reserve_https_port()
        if self.agent is not None:
            await self.agent.catch_up()
        shared = (self.rate_table.fileno(),)
        await asyncio.gather(*(w.start(self.init_payload(w.index), shared) for w in self.workers))
        admin = AdminApp(self)
        await serve(admin, admin_sock, ServerLimits(max_body_bytes=1 << 20))
        loop = asyncio.get_running_loop()
        ensure_sweeper()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        log.warning("verge edge listening on http://%s:%d (admin http://%s:%d, %d workers)",
                    self.options.listen_host, self.options.listen_port, self.options.admin_host,
                    self.options.admin_port, len(self.workers))
        https = (f" https https://{self.options.https_host}:{self.options.https_port}"
                 if self.options.https_host else "")
        print(f"verge edge ready: http://{self.options.listen_host}:{self.options.listen_port} "
              f"admin http://{self.options.admin_host}:{self.options.admin_port}{https}",
              flush=True)
        background = [loop.create_task(self._watch_workers()), loop.create_task(self._janitor())]
        if self.agent is not None:
            background.append(loop.create_task(self.agent.run()))
        if self.options.https_host:
            background.append(loop.create_task(self._rotate_ticket_keys()))
        await self._stopping.wait()
        for task in background:
            task.cancel()
        if self.agent is not None:
            await self.agent.close()
        for worker in self.workers:
            worker.stop()
        reservation.close()
        if https_reservation is not None:
            https_reservation.close()
        self.disk.close()

    async def _watch_workers(self) -> None:
        """Restart any worker that died (crash, OOM kill), with a small back-off."""
        while True:
            await asyncio.sleep(0.5)
            for worker in self.workers:
                if not worker.alive() and not self._stopping.is_set():
                    code = worker.process.returncode if worker.process else None
                    log.error("worker %d exited (%s); restarting", worker.index, code)
                    self.sweep_after(worker)
                    if time.monotonic() - worker.started_at < 1.0:
                        await asyncio.sleep(1.0)
                    with contextlib.suppress(Exception):
                        await worker.start(self.init_payload(worker.index),
                                           (self.rate_table.fileno(),))

    def sweep_after(self, worker: WorkerHandle) -> None:
        """Remove the temp files a dead worker left in the disk tier (a fill cut short by
        kill -9): only its own, found by its pid; the other workers' fills go on."""
        if worker.process is None:
            return
        try:
            removed = self.disk.sweep_dead_writers([worker.process.pid])
        except OSError as exc:
            log.error("temp files of worker %d not removed: %s", worker.index, exc)
            return
        if removed:
            log.warning("removed %d temp file(s) of dead worker %d", removed, worker.index)

    async def _rotate_ticket_keys(self) -> None:
        """Rotate the shared TLS session ticket keys on schedule (the previous key still
        decrypts, so recent tickets keep resuming)."""
        while True:
            await asyncio.sleep(self.options.ticket_rotation)
            await self.rotate_ticket_keys()

    async def rotate_ticket_keys(self) -> dict:
        """Next key becomes current, current becomes previous; every worker gets the set."""
        self.ticket_keys.rotate()
        replies = await self.broadcast({"op": "tls_tickets", "keys": self.ticket_keys.encoded()})
        failed = sum(1 for r in replies if not r.get("ok"))
        if failed:
            log.error("TLS ticket key rotation did not reach %d worker(s)", failed)
        return {"ok": not failed, "workers": len(replies)}

    async def _janitor(self) -> None:
        """Keep the shared disk tier within its byte bound."""
        while True:
            await asyncio.sleep(2.0)
            try:
                self.disk.enforce_capacity()
            except Exception:
                log.exception("disk capacity enforcement failed")

    # ----- operations used by the admin API ------------------------------------------------------
    async def broadcast(self, msg: dict) -> list[dict]:
        results = []
        for worker in self.workers:
            try:
                results.append(await worker.call(msg))
            except (ConnectionError, TimeoutError, OSError) as exc:
                results.append({"ok": False, "error": str(exc)})
        return results

    async def purge(self, targets: list[tuple[str, str]], soft: bool) -> dict:
        """Disk once, then every worker's memory; returns counts."""
        disk_count = sum(purge_disk(self.disk, kind, value, soft) for kind, value in targets)
        replies = await self.broadcast({"op": "purge", "targets": targets, "soft": soft})
        memory = sum(r.get("count", 0) for r in replies)
        failed = [r["error"] for r in replies if not r.get("ok")]
        return {"ok": not failed, "disk": disk_count, "memory": memory, "errors": failed,
                "workers": len(replies)}

    async def stats(self) -> list[dict]:
        replies = await self.broadcast({"op": "stats"})
        return [r["stats"] for r in replies if r.get("ok")]

    async def reload(self) -> dict:
        """Re-read the config file; a bad file leaves the running config in force."""
        if self.agent is not None:
            return {"ok": False, "error": "this edge takes its config from the control plane"}
        try:
            config = build_config(self.options)
        except ConfigError as exc:
            log.error("config reload rejected: %s", exc)
            return {"ok": False, "error": str(exc)}
        return await self.apply_config(config)

    async def apply_config(self, config: Config) -> dict:
        """Switch every worker to a validated config (workers restarted later get it too)."""
        self.config = config
        local = self.local_config(config)
        replies = await self.broadcast({"op": "config", "config": local.model_dump(mode="json")})
        ok = all(r.get("ok") for r in replies)
        if ok:  # every worker has loaded the new files; older ones are unused now
            self.prune_pem_files(local)
        return {"ok": ok, "workers": len(replies)}


def build_config(options: NodeOptions) -> Config:
    config = load_config(options.config_path)
    if options.origin:
        from verge.config import config_for_origin

        config = config_for_origin(options.origin, config)
    return config


def check_port_free(host: str, port: int) -> None:
    """Fail fast with a clear message when the address is taken (before starting workers)."""
    if port == 0:
        return
    sock = reuseport_socket(host, port)
    sock.close()
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # SO_REUSEADDR: connections of an earlier run in TIME_WAIT must not count as "taken";
    # a listening socket (ours with SO_REUSEPORT or anyone's) still makes the bind fail.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    finally:
        probe.close()


def run_node(options: NodeOptions, config: Config) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    uvloop.run(Node(options, config).run())
