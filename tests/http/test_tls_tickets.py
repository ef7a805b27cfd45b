"""Shared TLS session ticket keys: resumption across contexts (workers), rotation, fail-safe.

Handshakes run in memory (ssl.MemoryBIO pairs), so a "worker" is just another server
context; the last tests start a real 2-worker edge and resume with ``openssl s_client``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from verge.certs import DevCertificates, dev_certificates
from verge.http import tls_tickets
from verge.http.tls import CertSpec, TlsStore, safe_server_context
from verge.http.tls_tickets import (
    TicketKey,
    TicketKeySchedule,
    decode_keys,
    encode_keys,
    install_ticket_keys,
)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
HOST = "tickets.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return dev_certificates(tmp_path_factory.mktemp("certs"), hosts=[HOST, "other.test"])


def server_context(certs: DevCertificates, host: str = HOST) -> ssl.SSLContext:
    files = certs.hosts[host]
    return safe_server_context(str(files.cert_file), str(files.key_file))


def client_context(certs: DevCertificates, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca.cert_file))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _shuttle(source: ssl.MemoryBIO, sink: ssl.MemoryBIO) -> None:
    data = source.read()
    if data:
        sink.write(data)


def _step(obj: ssl.SSLObject) -> bool:
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def handshake(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    server_name: str = HOST,
) -> tuple[bool, ssl.SSLSession]:
    """One in-memory handshake; (resumed?, the client's session with its new ticket)."""
    to_server, from_server, to_client, from_client = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(to_server, from_server, server_side=True)
    cli = client.wrap_bio(to_client, from_client, server_hostname=server_name, session=session)
    client_done = server_done = False
    for _ in range(10):
        client_done = client_done or _step(cli)
        _shuttle(from_client, to_server)
        server_done = server_done or _step(srv)
        _shuttle(from_server, to_client)
        if client_done and server_done:
            break
    assert client_done and server_done, "handshake did not complete"
    with contextlib.suppress(ssl.SSLWantReadError):  # TLS 1.3 tickets come after it
        cli.read()
    assert cli.session is not None and cli.session.has_ticket
    return cli.session_reused, cli.session


# --------------------------------------------------------------------------- key material


def test_key_round_trip_and_repr_hides_secrets() -> None:
    key = TicketKey.generate()
    assert decode_keys(encode_keys([key])) == [key]
    assert len(key.to_bytes()) == 80
    text = repr(key)
    assert key.hmac_key.hex() not in text and "aes_key" not in text and "hmac_key" not in text


@pytest.mark.parametrize("bad", ["", "AAAA", "not base64!"])
def test_decode_rejects_malformed_keys(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_keys([bad])


def test_schedule_hands_out_next_key_early_and_drops_old_ones() -> None:
    schedule = TicketKeySchedule()
    current, upcoming = schedule.keys()
    schedule.rotate()
    assert schedule.keys()[:2] == [upcoming, current]  # next encrypts, old current decrypts
    assert len(schedule.keys()) == 3
    schedule.rotate()
    assert current not in list(schedule.keys())
    assert schedule.keys()[1] == upcoming


# --------------------------------------------------------------------------- OpenSSL


def test_shared_keys_resume_on_another_context(certs: DevCertificates) -> None:
    client = client_context(certs)
    keys = [TicketKey.generate()]
    worker1, worker2 = server_context(certs), server_context(certs)
    assert install_ticket_keys(worker1, keys) is not None
    assert install_ticket_keys(worker2, keys) is not None
    resumed, session = handshake(worker1, client)
    assert not resumed
    assert handshake(worker2, client, session)[0]


def test_without_shared_keys_another_context_does_not_resume(certs: DevCertificates) -> None:
    """The problem this solves: each context has its own random ticket key."""
    client = client_context(certs)
    _, session = handshake(server_context(certs), client)
    assert not handshake(server_context(certs), client, session)[0]


def test_tls12_tickets_use_the_shared_keys_too(certs: DevCertificates) -> None:
    client = client_context(certs, tls12=True)
    keys = [TicketKey.generate()]
    worker1, worker2 = server_context(certs), server_context(certs)
    install_ticket_keys(worker1, keys)
    install_ticket_keys(worker2, keys)
    _, session = handshake(worker1, client)
    assert handshake(worker2, client, session)[0]


def test_rotation_keeps_previous_key_and_drops_older(certs: DevCertificates) -> None:
    client = client_context(certs)
    schedule = TicketKeySchedule()
    issuer, other = server_context(certs), server_context(certs)
    ring = install_ticket_keys(issuer, schedule.keys())
    other_ring = install_ticket_keys(other, schedule.keys())
    assert ring is not None and other_ring is not None
    _, ticket_gen0 = handshake(issuer, client)

    schedule.rotate()
    ring.set_keys(schedule.keys())
    other_ring.set_keys(schedule.keys())
    assert handshake(other, client, ticket_gen0)[0], "one rotation ago: still resumes"
    _, ticket_gen1 = handshake(issuer, client)

    schedule.rotate()
    ring.set_keys(schedule.keys())
    other_ring.set_keys(schedule.keys())
    assert not handshake(other, client, ticket_gen0)[0], "two rotations ago: full handshake"
    assert handshake(other, client, ticket_gen1)[0]


def test_worker_not_yet_rotated_accepts_tickets_from_rotated_one(certs: DevCertificates) -> None:
    client = client_context(certs)
    schedule = TicketKeySchedule()
    rotated, lagging = server_context(certs), server_context(certs)
    ring = install_ticket_keys(rotated, schedule.keys())
    install_ticket_keys(lagging, schedule.keys())
    schedule.rotate()
    ring.set_keys(schedule.keys())  # the rotation reached one worker only
    _, session = handshake(rotated, client)
    assert handshake(lagging, client, session)[0]


def test_ticket_from_previous_key_is_renewed_with_current(certs: DevCertificates) -> None:
    client = client_context(certs)
    schedule = TicketKeySchedule()
    ctx = server_context(certs)
    ring = install_ticket_keys(ctx, schedule.keys())
    _, old = handshake(ctx, client)
    schedule.rotate()
    ring.set_keys(schedule.keys())
    resumed, renewed = handshake(ctx, client, old)
    assert resumed
    schedule.rotate()  # the first key is gone now; the renewed ticket is from the second
    ring.set_keys(schedule.keys())
    assert handshake(ctx, client, renewed)[0]


def test_tls_store_shares_keys_across_stores_and_certificates(certs: DevCertificates) -> None:
    specs = [
        CertSpec(str(certs.hosts[h].cert_file), str(certs.hosts[h].key_file), (h,))
        for h in (HOST, "other.test")
    ]
    keys = TicketKeySchedule().keys()
    store1, store2 = TlsStore(specs), TlsStore(specs)
    assert store1.set_ticket_keys(keys) and store2.set_ticket_keys(keys)
    client = client_context(certs)
    _, session = handshake(store1.server_context(), client, server_name="other.test")
    assert handshake(store2.server_context(), client, session, server_name="other.test")[0]


def test_untrusted_binding_logs_once_and_keeps_openssl_keys(
    certs: DevCertificates, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def mismatch(_self: object, _ctx: ssl.SSLContext) -> int:
        raise tls_tickets.BindingError("unexpected PySSLContext layout")

    monkeypatch.setattr(tls_tickets._OpenSsl, "ctx_pointer", mismatch)
    monkeypatch.setattr(tls_tickets._BINDING, "warned", False)
    client = client_context(certs)
    ctx = server_context(certs)
    with caplog.at_level(logging.WARNING, logger="verge.tls"):
        assert install_ticket_keys(ctx, [TicketKey.generate()]) is None
        assert install_ticket_keys(ctx, [TicketKey.generate()]) is None
    warnings = [r for r in caplog.records if "ticket keys unavailable" in r.getMessage()]
    assert len(warnings) == 1
    _, session = handshake(ctx, client)
    assert handshake(ctx, client, session)[0], "OpenSSL's own key still resumes here"


def test_binding_refuses_other_objects() -> None:
    lib = tls_tickets._openssl()
    assert lib is not None
    with pytest.raises(tls_tickets.BindingError):
        lib.ctx_pointer(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the edge node


async def test_node_rotation_reaches_workers_and_restarts() -> None:
    from verge.config import Config
    from verge.edge.node import Node, NodeOptions

    class FakeWorker:
        def __init__(self) -> None:
            self.messages: list[dict] = []

        async def call(self, msg: dict) -> dict:
            self.messages.append(msg)
            return {"ok": True}

    options = NodeOptions("127.0.0.1", 0, "127.0.0.1", 0, "t", "/tmp/unused", 2)
    node = Node(options, Config())
    node.workers = [FakeWorker(), FakeWorker()]  # type: ignore[list-item]
    before = decode_keys(node.init_payload(0)["tls_tickets"])
    assert (await node.rotate_ticket_keys())["ok"]
    for worker in node.workers:
        (msg,) = worker.messages
        assert msg["op"] == "tls_tickets"
        sent = decode_keys(msg["keys"])
        assert sent[:2] == [before[-1], before[0]]  # the announced next key now encrypts
    assert node.init_payload(1)["tls_tickets"] == msg["keys"]  # a restarted worker gets them


REQUEST = b"GET /x HTTP/1.1\r\nHost: tickets.test\r\nConnection: close\r\n\r\n"


def s_client(port: int, *args: str) -> str:
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        HOST,
        "-tls1_3",
        "-ign_eof",
        *args,
    ]
    done = subprocess.run(cmd, input=REQUEST, capture_output=True, timeout=20)
    return done.stdout.decode(errors="replace")


def worker_pids(edge) -> set[int]:
    children = Path(f"/proc/{edge.proc.pid}/task/{edge.proc.pid}/children").read_text()
    return {int(pid) for pid in children.split()}


def listening_pids(pids: set[int], port: int) -> set[int]:
    """Those of ``pids`` holding a TCP socket that listens on ``port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(f"socket:[{fields[9]}]")
    found = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                found.add(pid)
    return found


@pytest.fixture
def tls_edge(edge_factory, origin, tmp_path: Path, certs: DevCertificates):
    files = certs.hosts[HOST]
    return edge_factory(
        origin_url=origin.url,
        workers=2,
        extra_args=(
            "--https",
            "127.0.0.1:0",
            "--tls-cert",
            str(files.cert_file),
            "--tls-key",
            str(files.key_file),
        ),
    )


@needs_openssl
@pytest.mark.timeout(90)
def test_two_worker_edge_resumes_on_every_worker(tls_edge, tmp_path: Path) -> None:
    session = tmp_path / "session.pem"
    first = s_client(tls_edge.https_port, "-sess_out", str(session))
    assert "New, TLSv1.3" in first and session.stat().st_size > 0, first
    for attempt in range(12):
        out = s_client(tls_edge.https_port, "-sess_in", str(session))
        assert "Reused, TLSv1.3" in out, f"attempt {attempt}: {out}"
    with tls_edge.admin() as admin:
        workers = admin.get("/stats").json()["workers"]
    served = [sum(count for *_, count in w["requests"]) for w in workers]
    assert len(served) == 2 and all(served), f"not both workers served: {served}"


@needs_openssl
@pytest.mark.timeout(90)
def test_restarted_workers_get_the_current_keys(tls_edge, tmp_path: Path) -> None:
    session = tmp_path / "session.pem"
    s_client(tls_edge.https_port, "-sess_out", str(session))
    old = worker_pids(tls_edge)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the supervisor notices within 0.5 s and starts replacements
        pids = worker_pids(tls_edge) - old
        if len(pids) == 2 and listening_pids(pids, tls_edge.https_port) == pids:
            break
        assert time.monotonic() < deadline, "workers were not restarted"
        time.sleep(0.1)
    for _ in range(4):
        out = s_client(tls_edge.https_port, "-sess_in", str(session))
        assert "Reused, TLSv1.3" in out, out
