"""The edge node's side of the control plane: join, config watch, purges, heartbeat, stats.

Runs inside the node supervisor (:mod:`verge.edge.node`). What it keeps on disk, in the
node's cache directory, is what lets an edge work without the control plane (offline
autonomy, as KubeEdge/OpenYurt promise):

* ``control/node.json``   the node credential received when joining: valid for the fleet
                          (whichever replica, or URL, answers), not for one URL;
* ``control/bundle.json`` the last good config bundle (version + Config), applied at start;
                          it holds certificate keys, so like node.json it is mode 0600;
* ``control/purge_seq``   the last purge sequence number applied; missed purges are fetched
                          and applied on reconnect, before their acknowledgement;
* ``control/spool.db``    stats samples (and per-rule protection counts) not yet accepted
                          by the control plane (SQLite WAL), sent with idempotency keys so
                          a retry never counts twice;
* ``control/modules/``    edge function modules (``<sha256>.wasm``, checked against their
                          name) of the saved bundle: fetched before a bundle reaches the
                          workers, so a function keeps running on a restart without the
                          control plane; modules no bundle uses any more are removed;
* ``control/kv.db``       the edge KV replica (SQLite WAL): every change up to the last
                          sequence number applied; workers read it into memory;
* ``control/kv-outbox.db`` function KV writes not yet applied by the control plane
                          (verge.edge.compute.KVOutbox): the workers commit each one
                          (fsync'd) before the function's call returns; the agent sends
                          them oldest first and removes each once the replica holds it
                          (or the control plane refused it: logged, and in `verge fn logs`).

Every file is written atomically (temp + rename) so a ``kill -9`` leaves the old or the new
version, never a torn one. Long polls (config and purges) wake on change; a failed call
backs off and retries, so the control plane may come and go.

The control plane may run as several replicas on one store (``--control A --control B``).
Every call goes to the replica that answered last; one that cannot be reached, does not
answer in time or answers 5xx makes the agent move to the next one at once (for every
loop: long polls waiting on the old replica are re-issued on the new one). Heartbeats move
with the rest, so the fleet's view of this node does not depend on which replica is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from pydantic import ValidationError

from verge.cache.purge import PurgeScope, key_host, scoped_tag
from verge.cache.store import purge_disk
from verge.config import Config
from verge.control.client import ControlError, CredentialRefused, NodeClient
from verge.edge.compute import KV_FILE, MODULE_PREFIX, OUTBOX_FILE, EdgeKV, KVOutbox
from verge.files import write_atomic

if TYPE_CHECKING:
    from verge.cache.disk import DiskStore
    from verge.edge.node import Node

log = logging.getLogger("verge.agent")

HEARTBEAT_INTERVAL = 2.0
STATS_INTERVAL = 5.0
LONG_POLL = 25.0
"""Seconds the control plane may hold a config, purge or KV poll before answering."""
MAX_PENDING_LOGS = 2000
"""Function log records held while the control plane is away (the oldest are dropped)."""
MAX_PENDING_EVENTS = 2000
"""Protection events (refused requests) held while the control plane is away (the oldest
are dropped: they are a sample)."""
EVENTS_BATCH = 500
"""Most protection events sent in one call."""
RETRIED_CLIENT_ERRORS = (408, 429)
"""4xx answers that say "later", not "never": a batch refused otherwise is dropped."""
KV_OUTBOX_POLL = 1.0
"""Seconds between looks at the KV outbox while it has nothing to send and no worker said
it wrote (a wake-up datagram lost: the outbox file is the truth, the nudge only a hint)."""
KV_RETRIED_CLIENT_ERRORS = (*RETRIED_CLIENT_ERRORS, 409)
"""For KV writes 409 is also "later": a concurrent change (the outbox's first batch sent
twice at once) that the control plane asks to try again."""


def job_targets(job: dict, disk: DiskStore) -> list[tuple[str, str]]:
    """A purge's (kind, value) targets as this node applies them.

    A purge of one service carries its hosts (``scope``): its tags then reach that service's
    objects only, not another tenant's that carry the same tag. On disk the tagged keys in
    scope become url targets; the workers get the tag scoped (verge.cache.purge.scoped_tag),
    which their tag index filters by host. URL and prefix targets name their host already.
    """
    targets = [(kind, value) for kind, value in job["targets"]]
    if not job.get("scope"):
        return targets
    scope = PurgeScope.from_json(job["scope"])
    scoped: list[tuple[str, str]] = []
    for kind, value in targets:
        if kind != "tag":
            scoped.append((kind, value))
            continue
        keys = {key for key, _variant in disk.keys_with_tag(value) if scope.contains(key_host(key))}
        scoped.extend(("url", key) for key in sorted(keys))
        scoped.append(("tag", scoped_tag(value, scope)))
    return scoped


def modules_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "control" / "modules"


def module_file(cache_dir: str | Path, digest: str) -> Path:
    """Where the module named ``sha256:<digest>`` in a bundle is kept on this node."""
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError(f"not a sha256 module name: {digest!r}")
    return modules_dir(cache_dir) / f"{digest}.wasm"


def bundle_modules(config: Config) -> set[str]:
    """The sha256 digests of the control-plane modules a config uses."""
    return {fn.module.removeprefix(MODULE_PREFIX) for fn in config.functions
            if fn.module.startswith(MODULE_PREFIX)}


class AgentError(Exception):
    """This node cannot join: no join token given, or the control plane refused it."""


class StatsSpool:
    """Samples waiting for the control plane, durable across crashes (SQLite WAL)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS spool (key TEXT PRIMARY KEY, body TEXT)")

    def add(self, samples: list[dict], protection: list[dict] | None = None) -> None:
        """Spool one interval's samples and per-rule protection counts (one upload)."""
        if samples or protection:
            body = {"samples": samples, **({"protection": protection} if protection else {})}
            self.db.execute("INSERT INTO spool VALUES (?, ?)",
                            (uuid.uuid4().hex, json.dumps(body)))

    def pending(self, limit: int = 50) -> list[tuple[str, str]]:
        return self.db.execute("SELECT key, body FROM spool ORDER BY rowid LIMIT ?",
                               (limit,)).fetchall()

    def done(self, key: str) -> None:
        self.db.execute("DELETE FROM spool WHERE key = ?", (key,))

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM spool").fetchone()[0]


class ControlAgent:
    def __init__(self, node: Node, control: str | Sequence[str], join_token: str | None) -> None:
        self.node = node
        self.client = NodeClient(control)
        """The node API, with failover over the control plane's replicas."""
        self.join_token = join_token
        self.dir = Path(node.options.cache_dir) / "control"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_name = node.options.node
        self.config_version = 0
        self.config_digest: str | None = None  # the bundle's content hash (any replica's)
        self.purge_seq = self._read_int("purge_seq")
        self.spool = StatsSpool(self.dir / "spool.db")
        self.kv = EdgeKV(self.dir / KV_FILE, writer=True)
        self.outbox = KVOutbox(self.dir / OUTBOX_FILE, create=True)
        self.kv_writes_dropped = 0  # function writes the control plane refused
        self._kv_written = asyncio.Event()  # a worker queued a write (KVOutbox.nudge)
        self._kv_socket: socket.socket | None = None
        self.pending_logs: list[dict] = []
        self.pending_events: list[dict] = []
        self.events_dropped = 0
        self._refused_kinds: set[str] = set()  # batches the control plane refused (4xx)
        """Protection events the control plane refused (4xx): dropped, not retried."""
        self._last_snapshot: dict[str, list[int]] = {}
        self._last_protection: dict[tuple[str, str, str], tuple[int, int, int]] = {}
        self.connected = False

    @property
    def credential(self) -> str | None:
        """The node credential (None until joined or loaded from node.json)."""
        return self.client.token

    @credential.setter
    def credential(self, value: str | None) -> None:
        self.client.token = value

    @property
    def http(self) -> httpx.AsyncClient:
        return self.client.http

    @http.setter
    def http(self, value: httpx.AsyncClient) -> None:
        self.client.http = value

    @property
    def control_urls(self) -> list[str]:
        return self.client.urls

    @property
    def control_url(self) -> str:
        """The replica calls go to: the one that answered last."""
        return self.client.url

    # ----- state on disk ---------------------------------------------------------------------
    def _read_int(self, name: str) -> int:
        try:
            return int((self.dir / name).read_text())
        except (OSError, ValueError):
            return 0

    def saved_bundle(self) -> tuple[int, Config] | None:
        """The last good bundle, or None (nothing saved, or unreadable)."""
        try:
            data = json.loads((self.dir / "bundle.json").read_text())
            saved = int(data["version"]), Config.model_validate(data["config"])
            digest = data.get("digest")
            self.config_digest = digest if isinstance(digest, str) else None
            return saved
        except (OSError, ValueError, KeyError) as exc:
            if (self.dir / "bundle.json").exists():
                log.error("saved config bundle unusable: %s", exc)
            return None

    def _load_credential(self) -> bool:
        """The saved credential, whichever URLs it was saved with: a node belongs to the
        fleet (the control plane's store), which any replica, under any name, speaks for.
        To move an edge to another fleet, remove control/node.json (or the cache dir)."""
        try:
            data = json.loads((self.dir / "node.json").read_text())
            self.credential, self.node_name = str(data["credential"]), str(data["node"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    # ----- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Join (once), then keep every loop running until cancelled (each its own: one
        that fails, say stats the control plane refuses, holds up none of the others)."""
        while not self._load_credential():
            try:
                await self.join()
            except AgentError as exc:
                log.error("cannot join the control plane: %s", exc)
                await asyncio.sleep(5)
            except (httpx.HTTPError, ControlError) as exc:
                log.warning("control plane unreachable (%s); retrying", exc)
                await asyncio.sleep(1)
        self._listen_for_kv_writes()
        await asyncio.gather(self._loop(self._config_once), self._loop(self._purges_once),
                             self._loop(self._kv_once), self._loop(self._ship_kv_writes),
                             self._loop(self._heartbeat_once, HEARTBEAT_INTERVAL),
                             self._loop(self._stats_once, STATS_INTERVAL),
                             self._loop(self._ship_protection_events, STATS_INTERVAL))

    async def _loop(self, step, interval: float = 0.0) -> None:
        backoff = 0.5
        while True:
            try:
                await step()
                self.connected = True
                backoff = 0.5
                if interval:
                    await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except (AgentError, CredentialRefused) as exc:
                log.error("control plane refused this node: %s", exc)
                await asyncio.sleep(10)
            except Exception as exc:  # network down, control plane restarting...
                self.connected = False
                log.debug("control plane call failed: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def whereabouts(self) -> dict:
        """Where this node serves and in which region: sent on join and with every heartbeat,
        so a restart on new ports (or a move) reaches the health monitor and the routers."""
        opts = self.node.options
        return {"url": f"http://{opts.listen_host}:{opts.listen_port}",
                "admin_url": f"http://{opts.admin_host}:{opts.admin_port}",
                "region": opts.region}

    async def join(self) -> None:
        if not self.join_token:
            raise AgentError("no credential saved and no --join-token given")
        try:
            data = await self.client.join(self.join_token, self.node_name or socket.gethostname(),
                                          **self.whereabouts())
        except CredentialRefused as exc:
            raise AgentError(f"join refused: {exc}") from None
        self.credential, self.node_name = data["credential"], data["node"]
        write_atomic(self.dir / "node.json", json.dumps({
            "controls": self.control_urls, "node": self.node_name,
            "credential": self.credential}).encode())
        log.warning("joined the control plane as %s (through %s)", self.node_name,
                    self.control_url)

    # ----- config ---------------------------------------------------------------------------------
    async def _config_once(self) -> None:
        # with the digest, a replica with other content answers at once
        data = await self.client.config(self.config_version, LONG_POLL, self.config_digest)
        if data is None:
            return
        await self.apply_bundle(int(data["version"]), data["config"], data.get("digest"))

    async def apply_bundle(self, version: int, raw: dict, digest: str | None = None) -> None:
        """Validate, save as the last good bundle (with its content digest, which a replica
        compares with its own), then switch every worker to it."""
        try:
            config = Config.model_validate(raw)
        except ValueError as exc:  # reasons only: the input may hold certificate keys
            log.error("config bundle %d rejected, keeping version %d: %s",
                      version, self.config_version, _reasons(exc))
            self.config_version, self.config_digest = version, digest  # not fetched again
            return
        await self.fetch_modules(config)
        write_atomic(self.dir / "bundle.json",
                     json.dumps({"version": version, "digest": digest, "config": raw}).encode())
        result = await self.node.apply_config(config)
        self.config_version, self.config_digest = version, digest
        if result.get("ok"):
            self.prune_modules(config)

    async def fetch_modules(self, config: Config) -> None:
        """Download the bundle's modules this node lacks, each checked against its sha256.

        Raises (the config loop retries) rather than hand workers a config whose modules
        are missing: the running config stays in force meanwhile.
        """
        for digest in sorted(bundle_modules(config)):
            path = module_file(self.node.options.cache_dir, digest)
            if path.exists():
                continue
            content = await self.client.module(digest)  # checked against its digest
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, content)
            log.info("fetched edge function module %s (%d bytes)", digest, len(content))

    def prune_modules(self, config: Config) -> None:
        """Remove modules the running (and saved) bundle no longer uses."""
        keep = bundle_modules(config)
        folder = modules_dir(self.node.options.cache_dir)
        for path in folder.glob("*.wasm") if folder.exists() else ():
            if path.stem not in keep:
                path.unlink(missing_ok=True)

    # ----- edge KV --------------------------------------------------------------------------------
    async def _kv_once(self) -> None:
        """Follow the KV change feed: persist each batch, then have every worker load it."""
        changes = await self.client.kv_changes(self.kv.seq, LONG_POLL)
        if not changes:
            return
        await asyncio.to_thread(self.kv.apply, changes)
        await asyncio.to_thread(self.outbox.forget_applied, self.kv.seq)
        await self._tell_workers_kv()

    async def _tell_workers_kv(self) -> None:
        """Have every worker refresh its KV view (replica rows, settled outbox writes)."""
        replies = await self.node.broadcast({"op": "kv"})
        failed = [r.get("error") for r in replies if not r.get("ok")]
        if failed:  # a worker restarting reads the files at start anyway
            log.warning("KV update (seq %d) did not reach %d worker(s): %s",
                        self.kv.seq, len(failed), failed)

    async def _ship_kv_writes(self) -> None:
        """Send the oldest function KV writes of the outbox (or wait for a worker's write).

        Applied writes get their seq and stay until the replica has it; refused ones are
        removed, logged and reported to `verge fn logs` (the function's next write of the
        key may still succeed: a refused write is a grant or a bound, not a network fault).
        A batch refused as a whole with a 4xx (other than "later") is dropped the same way,
        not retried forever. Network errors and 5xx raise: the loop backs off and retries.
        """
        self._kv_written.clear()  # before looking: a write after the look wakes us again
        writes = await asyncio.to_thread(self.outbox.pending)
        if not writes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kv_written.wait(), KV_OUTBOX_POLL)
            return
        try:
            answer = await self.client.send_kv_writes(self.outbox.id,
                                                      [write.wire() for write in writes])
        except ControlError as exc:
            if not _dropped(exc, KV_RETRIED_CLIENT_ERRORS):
                raise
            reason = f"{exc.status}: {exc.message[:200]}"
            await asyncio.to_thread(self.outbox.drop, writes)
            self._kv_writes_refused([(write, reason) for write in writes])
            await self._tell_workers_kv()
            return
        settled = await asyncio.to_thread(self.outbox.settle, writes, answer["results"],
                                          int(answer["kv_seq"]), self.kv.seq)
        self._kv_writes_refused(settled.refused)
        if settled.forgotten:
            await self._tell_workers_kv()

    def _listen_for_kv_writes(self) -> None:
        """Workers send a datagram to this outbox's socket after each write they queue
        (an abstract Unix socket: no file, no path length limit); it wakes the shipping
        loop at once rather than at its next look."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.outbox.wake_address)
        except OSError as exc:  # another agent of this cache dir still runs: poll only
            log.warning("KV outbox wake-ups unavailable (%s); polling every %.1f s", exc,
                        KV_OUTBOX_POLL)
            sock.close()
            return
        sock.setblocking(False)
        self._kv_socket = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._kv_woken)

    def _kv_woken(self) -> None:
        with contextlib.suppress(OSError):
            while self._kv_socket is not None and self._kv_socket.recv(64):
                pass
        self._kv_written.set()

    def _kv_writes_refused(self, refused: list) -> None:
        """Log function writes the control plane refused (one warning per batch) and keep
        a record per write for `verge fn logs`."""
        if not refused:
            return
        self.kv_writes_dropped += len(refused)
        first, reason = refused[0]
        log.warning("the control plane refused %d function KV write(s), dropped; first: "
                    "%s/%r by %s: %s", len(refused), first.namespace, first.key,
                    first.function, reason)
        now = time.time()
        for write, why in refused:
            if write.function:
                self.pending_logs.append({
                    "function": write.function, "t": now, "outcome": "kv_write_refused",
                    "error": f"KV write of {write.namespace}/{write.key.decode(errors='replace')}"
                             f" refused by the control plane: {why}"[:2000]})
        del self.pending_logs[:-MAX_PENDING_LOGS]

    # ----- purges ---------------------------------------------------------------------------------
    async def _purges_once(self) -> None:
        """Poll for purges after the last applied one; the poll itself acknowledges that one."""
        for job in await self.client.purges(self.purge_seq, LONG_POLL):
            targets = job_targets(job, self.node.disk)
            result = await self.node.purge(targets, bool(job.get("soft")))
            if not result["ok"]:
                raise RuntimeError(f"purge {job['seq']} failed on a worker: {result['errors']}")
            self.purge_seq = max(self.purge_seq, int(job["seq"]))
            # no fsync: after a crash an older seq only means re-applying purges (idempotent)
            write_atomic(self.dir / "purge_seq", str(self.purge_seq).encode(), durable=False)

    async def catch_up(self, timeout: float = 3.0) -> None:
        """Before the workers serve from cache: apply purges missed while this edge was down.

        Only the disk tier exists at this point (worker memory is empty), so the purges are
        applied there directly, every batch until none is left. Each replica gets its share
        of ``timeout`` (a hung one does not use up the time of the next). If none answers,
        the edge serves anyway (offline autonomy) and the purge loop catches up on reconnect.
        """
        if not self._load_credential():
            return
        attempt = httpx.Timeout(max(1.0, timeout / len(self.control_urls)), connect=1.0)
        try:
            async with asyncio.timeout(timeout + len(self.control_urls)):
                while jobs := await self._missed_purges(attempt):
                    for job in jobs:
                        for kind, value in job_targets(job, self.node.disk):
                            purge_disk(self.node.disk, kind, value, bool(job.get("soft")))
                        self.purge_seq = max(self.purge_seq, int(job["seq"]))
                    write_atomic(self.dir / "purge_seq", str(self.purge_seq).encode(),
                                 durable=False)
            # the purge loop's first poll (after=purge_seq) acknowledges them
        except (TimeoutError, httpx.HTTPError, ControlError) as exc:
            log.warning("could not catch up on purges before serving (%r); will retry", exc)

    async def _missed_purges(self, timeout: httpx.Timeout) -> list[dict]:
        jobs = await self.client.purges(self.purge_seq, 0, timeout)
        return [job for job in jobs if int(job["seq"]) > self.purge_seq]

    # ----- heartbeat and stats -----------------------------------------------------------------------
    async def _heartbeat_once(self) -> None:
        stats = await self.node.stats()
        load = {"connections": sum(s.get("connections", 0) for s in stats),
                "memory_bytes": sum(s.get("memory_bytes", 0) for s in stats),
                "disk_bytes": self.node.disk.used_bytes}
        alive = sum(1 for w in self.node.workers if w.alive())
        outbox_writes, outbox_bytes = await asyncio.to_thread(self.outbox.size)
        await self.client.heartbeat({
            "health": {"workers": alive, "workers_expected": len(self.node.workers),
                       "status": "ok" if alive == len(self.node.workers) else "degraded",
                       "kv_seq": self.kv.seq, "kv_outbox_writes": outbox_writes,
                       "kv_outbox_bytes": outbox_bytes,
                       "kv_writes_refused": self.kv_writes_dropped},
            "load": load, "config_version": self.config_version, "purge_seq": self.purge_seq,
            **self.whereabouts()})

    async def _stats_once(self) -> None:
        """Spool this interval's counters, then send everything spooled (oldest first)."""
        stats = await self.node.stats()
        self.spool.add(self._samples(stats), self._protection_samples(stats))
        for key, body in self.spool.pending():
            await self._send_or_drop(self.client.send_stats(body, key), "stats samples")
            self.spool.done(key)
        await self._ship_function_logs()

    async def _ship_function_logs(self) -> None:
        """Collect the workers' function log records and send them (kept until accepted)."""
        replies = await self.node.broadcast({"op": "function_logs"})
        for reply in replies:
            self.pending_logs.extend(reply.get("records", []))
        del self.pending_logs[:-MAX_PENDING_LOGS]
        if self.pending_logs:
            batch = self.pending_logs[:500]
            await self._send_or_drop(self.client.send_function_logs(batch),
                                     "function log records")
            del self.pending_logs[:len(batch)]

    async def _ship_protection_events(self) -> None:
        """Collect the workers' refused requests and send the oldest batch (kept until
        accepted). A batch the control plane refuses (4xx: invalid, or a control plane
        without the endpoint) is dropped, not retried: it would be refused again."""
        replies = await self.node.broadcast({"op": "protection_events"})
        for reply in replies:
            self.pending_events.extend(reply.get("events", []))
        del self.pending_events[:-MAX_PENDING_EVENTS]
        if not self.pending_events:
            return
        batch = self.pending_events[:EVENTS_BATCH]
        if not await self._send_or_drop(self.client.send_protection_events(batch),
                                        "protection events"):
            self.events_dropped += len(batch)
        del self.pending_events[:len(batch)]

    async def _send_or_drop(self, send: Awaitable[object], what: str) -> bool:
        """Send a batch; True when accepted. A batch the control plane refuses with a 4xx
        (invalid, or a control plane without the endpoint) is dropped, not retried: it
        would be refused again, and the batches behind it would never go. The first drop of
        each kind is a warning, later ones are logged at debug level only."""
        try:
            await send
            return True
        except ControlError as exc:
            if not _dropped(exc, RETRIED_CLIENT_ERRORS):
                raise
            first = what not in self._refused_kinds
            self._refused_kinds.add(what)
            (log.warning if first else log.debug)(
                "the control plane refused %s (%d: %s); dropped them", what, exc.status,
                exc.message[:200])
            return False

    def _samples(self, stats: list[dict]) -> list[dict]:
        """Per-service deltas since the previous call (worker counters are cumulative)."""
        totals: dict[str, list[int]] = {}
        for snap in stats:
            for service, values in snap.get("services", {}).items():
                acc = totals.setdefault(service, [0] * len(values))
                for i, v in enumerate(values):
                    acc[i] += v
        samples, now = [], time.time()
        for service, values in totals.items():
            if not service:  # requests that matched no service: nobody's to report
                continue
            previous = self._last_snapshot.get(service, [0] * len(values))
            delta = [max(0, a - b) for a, b in zip(values, previous, strict=True)]
            if any(delta):
                samples.append(dict(zip(SAMPLE_FIELDS, delta, strict=True), t=now, service=service))
        self._last_snapshot = totals
        return samples

    def _protection_samples(self, stats: list[dict]) -> list[dict]:
        """Per service and rule, what the protect phases counted since the previous call
        (verge.control.protection.ProtectionCounts): the workers' cumulative counters summed,
        minus the previous sums (a restarted worker's lower counts give no negative)."""
        totals = protection_totals(snap.get("protection") or {} for snap in stats)
        samples, now = [], time.time()
        for (service, kind, rule), counts in totals.items():
            previous = self._last_protection.get((service, kind, rule), (0, 0, 0))
            delta = [max(0, a - b) for a, b in zip(counts, previous, strict=True)]
            if any(delta):
                samples.append({"t": now, "service": service, "kind": kind, "rule": rule,
                                **dict(zip(PROTECTION_COUNTERS, delta, strict=True))})
        self._last_protection = totals
        return samples

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()
        if self._kv_socket is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._kv_socket.fileno())
            self._kv_socket.close()
        self.kv.close()
        self.outbox.close()


def _dropped(exc: ControlError, retried: Sequence[int]) -> bool:
    """Whether a refused batch is dropped: a 4xx that does not say "later" (a refused
    credential is not a refused batch: the loop waits for the operator instead)."""
    return (not isinstance(exc, CredentialRefused) and 400 <= exc.status < 500
            and exc.status not in retried)


def _reasons(exc: ValueError) -> str:
    """A validation error's locations and messages, without the offending input."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)


PROTECTION_COUNTERS = ("allowed", "limited", "blocked")


def protection_totals(per_worker) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    """(service, kind, rule) -> (allowed, limited, blocked) summed over the workers' protection
    stats (verge.edge.protect.ServiceProtection.stats): each rate-limit rule; the deny lists
    (blocked: refused); the WAF (allowed: inspected and served, limited: matched, blocked)."""
    totals: dict[tuple[str, str, str], list[int]] = {}

    def add(key: tuple[str, str, str], *counts: int) -> None:
        into = totals.setdefault(key, [0, 0, 0])
        for i, n in enumerate(counts):
            into[i] += int(n or 0)

    for services in per_worker:
        for service, stats in services.items():
            for rule, counts in (stats.get("rules") or {}).items():
                add((service, "rate-limit", rule),
                    *(counts.get(name, 0) for name in PROTECTION_COUNTERS))
            if stats.get("denied"):
                add((service, "deny", ""), 0, 0, stats["denied"])
            waf = stats.get("waf") or {}
            if waf:
                blocked = waf.get("blocked", 0)
                add((service, "waf", ""), max(0, waf.get("inspected", 0) - blocked),
                    waf.get("detected", 0), blocked)
    return {key: tuple(counts) for key, counts in totals.items()}


# order of the per-service counters kept by verge.observe.metrics.EdgeMetrics.services
SAMPLE_FIELDS = ("requests", "hits", "bytes", "status_2xx", "status_3xx", "status_4xx",
                 "status_5xx", "origin_ms_sum", "origin_count")
