"""The multi-region network simulation: delay queue and switch logic, then real namespaces."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
import sys

import pytest

from verge.demo import netsim
from verge.demo.netsim import DelayQueue, DelaySwitch, Latency, Topology

# --------------------------------------------------------------------------- pure parts


def test_queue_releases_in_arrival_order_after_the_delay() -> None:
    queue = DelayQueue(delay=0.040)
    for i in range(5):
        queue.push(bytes([i]), now=10.0 + i * 0.001)
    assert queue.next_due == pytest.approx(10.040)
    assert queue.pop_due(10.0399) == []
    assert queue.pop_due(10.0425) == [b"\x00", b"\x01", b"\x02"]
    assert queue.pop_due(11.0) == [b"\x03", b"\x04"]
    assert queue.next_due is None


def test_queue_same_instant_burst_keeps_order() -> None:
    queue = DelayQueue(delay=0.005)
    packets = [i.to_bytes(2, "big") * 750 for i in range(1000)]  # MTU-size, same timestamp
    for packet in packets:
        assert queue.push(packet, now=1.0)
    assert queue.pop_due(1.005) == packets


def test_queue_rate_serialises_packets() -> None:
    queue = DelayQueue(delay=0.010, rate_bps=8_000_000)  # 1 byte per microsecond
    queue.push(b"x" * 1000, now=0.0)
    queue.push(b"y" * 1000, now=0.0)
    assert queue.next_due == pytest.approx(0.011)
    assert queue.pop_due(0.0115) == [b"x" * 1000]
    assert queue.next_due == pytest.approx(0.012)


def test_queue_tail_drops_when_full() -> None:
    queue = DelayQueue(delay=1.0, limit=2)
    assert queue.push(b"a", 0.0) and queue.push(b"b", 0.0)
    assert not queue.push(b"c", 0.0)
    assert queue.dropped == 1 and queue.pop_due(2.0) == [b"a", b"b"]


def test_latency_figures_are_round_trip_per_site_pair() -> None:
    latency = Latency()
    assert latency.rtt_ms(1, 1) == 5.0
    assert latency.rtt_ms(3, 1) == 120.0
    assert latency.rtt_ms(0, 2) == latency.rtt_ms(2, 0) == 2.0
    with pytest.raises(ValueError, match="no round-trip time"):
        Topology(regions=4)


def test_addressing_plan_avoids_the_dns_client_subnets() -> None:
    hosts = netsim.plan_hosts(3)
    assert {h.name: h.address for h in hosts}["client-2"] == "10.20.2.2"
    assert {h.name: h.address for h in hosts}["region-3"] == "10.10.3.2"
    reserved = [ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.2.0.0/16")]
    for prefix in netsim.ROUTED_PREFIXES:
        assert not any(ipaddress.ip_network(prefix).overlaps(r) for r in reserved)


def _ipv4(dst: str, seq: int, size: int = 1500) -> bytes:
    header = bytes([0x45]) + bytes(15) + ipaddress.ip_address(dst).packed
    return (header + seq.to_bytes(4, "big")).ljust(size, b"\x00")


@pytest.fixture
def ports():
    """Three message-preserving socket pairs standing in for TUN devices."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    for pair in pairs:
        for sock in pair:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # a whole burst
    yield pairs
    for pair in pairs:
        for sock in pair:
            sock.close()


def _switch(ports, one_way: float) -> DelaySwitch:
    routes = {"10.200.0.0/24": 0, "10.10.1.0/24": 1, "10.20.1.0/24": 2}
    delays = [[one_way] * 3 for _ in range(3)]
    return DelaySwitch([theirs.fileno() for _, theirs in ports], routes, delays)


async def test_switch_burst_of_mtu_packets_arrives_in_order_after_the_delay(ports) -> None:
    loop = asyncio.get_running_loop()
    switch = _switch(ports, one_way=0.030)
    switch.start(loop)
    sender, receiver = ports[2][0], ports[1][0]
    started = loop.time()
    for seq in range(100):
        await loop.sock_sendall(sender, _ipv4("10.10.1.7", seq))
    received = []
    first_at = None
    while len(received) < 100:
        data = await asyncio.wait_for(loop.sock_recv(receiver, 65536), 5)
        first_at = first_at or loop.time()
        received.append(data)
    switch.close()
    assert [int.from_bytes(p[20:24], "big") for p in received] == list(range(100))
    assert all(len(p) == 1500 for p in received)
    assert first_at - started >= 0.030
    assert switch.dropped == 0 and switch.forwarded == 100


async def test_switch_drops_unroutable_and_non_ipv4(ports) -> None:
    loop = asyncio.get_running_loop()
    switch = _switch(ports, one_way=0.001)
    switch.start(loop)
    sender, receiver = ports[0][0], ports[1][0]
    await loop.sock_sendall(sender, _ipv4("10.99.0.1", 0))  # no route
    await loop.sock_sendall(sender, b"\x60" + bytes(59))  # IPv6
    await loop.sock_sendall(sender, _ipv4("10.10.1.2", 7))
    data = await asyncio.wait_for(loop.sock_recv(receiver, 65536), 5)
    switch.close()
    assert int.from_bytes(data[20:24], "big") == 7
    assert switch.dropped == 2


# --------------------------------------------------------------------------- namespaces

REASON = netsim.preflight() if sys.platform == "linux" else "Linux only"
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces: {REASON}")
PORT = 7007


def _ours(prefix: str) -> list[str]:
    return [ns for ns in netsim.list_namespaces() if ns.startswith(prefix)]


@pytest.fixture(scope="module")
def topo():
    topology = Topology().start()
    yield topology
    topology.stop()
    assert _ours(topology.prefix) == []


def _median_rtt(topo: Topology, client: str, server: str) -> float:
    rtts = netsim.tcp_connect_rtts(topo, client, topo.address(server), PORT, count=5)
    return sorted(rtts)[len(rtts) // 2]


@needs_netns
def test_far_edge_feels_its_configured_rtt_and_local_is_faster(topo: Topology) -> None:
    with netsim.tcp_listener(topo, "region-1", PORT), netsim.tcp_listener(topo, "region-3", PORT):
        local = _median_rtt(topo, "client-1", "region-1")
        far = _median_rtt(topo, "client-1", "region-3")
    configured = topo.rtt_ms("client-1", "region-3")
    assert configured == 120.0
    assert 0.9 * configured <= far < configured + 60
    assert local < far
    assert local >= 0.9 * topo.rtt_ms("client-1", "region-1")


_SINK = """
import hashlib, socket
s = socket.socket(); s.bind(("0.0.0.0", 7008)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while data := c.recv(65536):
    h.update(data); n += len(data)
print(n, h.hexdigest(), flush=True)
"""

_SOURCE = """
import hashlib, socket, sys
data = bytes(range(256)) * 8192
s = socket.create_connection((sys.argv[1], 7008), timeout=10); s.sendall(data); s.close()
print(len(data), hashlib.sha256(data).hexdigest())
"""


@needs_netns
def test_edge_reaches_core_and_bulk_data_crosses_intact(topo: Topology) -> None:
    sink = subprocess.Popen(
        [*topo.exec_args("core"), sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout.readline().strip() == "ready"
        source = subprocess.run(
            [*topo.exec_args("region-2"), sys.executable, "-c", _SOURCE, topo.address("core")],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert sink.stdout.readline().strip() == source.stdout.strip()
    finally:
        sink.kill()
        sink.wait()
        sink.stdout.close()


@needs_netns
def test_stop_removes_namespaces_processes_and_switch() -> None:
    topology = Topology(regions=1, tag="stop").start()
    assert len(_ours(topology.prefix)) == 3
    listener = netsim.tcp_listener(topology, "region-1", PORT)
    listener.__enter__()  # deliberately left running: stop() must end it
    switch = topology._switch
    topology.stop()
    assert _ours(topology.prefix) == []
    assert switch.poll() is not None
    topology.stop()  # idempotent


@needs_netns
def test_cleanup_stale_removes_only_dead_runs_of_our_family() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"vgs-{dead.pid}-core", f"vgs-{os.getpid()}-keep"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = netsim.cleanup_stale()
        assert stale in removed and live not in removed
        assert live in netsim.list_namespaces()
    finally:
        netsim.delete_namespace(stale)
        netsim.delete_namespace(live)
