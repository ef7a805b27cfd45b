"""A multi-region network on one machine: namespaces joined by a user-space delaying switch.

Why: request routing is only worth demonstrating when the regions really are near and far.
This kernel has no `netem` qdisc, so the delay is added in user space.

Design (the simplest that is correct):

* Every host (`core`, `region-i`, `client-i`) is its own network namespace with loopback up
  and one TUN device, `vg0`, holding the host's address. Each namespace routes our three
  prefixes (10.200.0.0/24, 10.10.0.0/16, 10.20.0.0/16) into `vg0`; nothing else is routed,
  so no traffic can leave the machine and no namespace needs IP forwarding.
* One process, the switch (`python -m verge.demo.netsim switch`), holds every TUN fd. A
  packet read from host A's fd goes, by its IPv4 destination's /24, to host B's fd after
  the one-way delay A->B (half the configured RTT), optionally paced at a rate. So each
  pair of namespaces sees exactly a point-to-point delaying link; a two-port switch *is*
  the two-namespace link, and the latency matrix is the configured one, not a sum of hops.
* Order is kept by one FIFO `DelayQueue` per (source, destination) pair with one timer
  for its head (asyncio's timer heap is not stable for equal deadlines, so packets are
  never given timers of their own). The loop sleeps in epoll; there is no busy loop.
* TUN devices are created inside their namespace by a short-lived thread that enters it
  with setns(2) via ctypes (a network namespace switch affects only the calling thread),
  opens /dev/net/tun and returns. The parent passes the fds to the switch (`pass_fds`)
  and closes its copies, so the devices live exactly as long as the switch. The switch
  exits when its stdin closes, i.e. also when the process that built the topology dies.
* The switch runs the stock asyncio loop, not uvloop: its clock is `time.monotonic()`,
  while libuv timers have millisecond granularity and a cached "now".

Addressing plan (each host owns a /24; the switch routes by /24, so extra addresses added
with `Topology.add_address` inside that /24 just work):

    core      10.200.0.2   (10.200.0.0/24)  router, origin, control plane
    region-i  10.10.i.2    (10.10.i.0/24)   the edge of region i
    client-i  10.20.i.2    (10.20.i.0/24)   a user in region i

10.1.0.0/16 and 10.2.0.0/16 are left alone (the demo's DNS client subnets).

Latency figures are round-trip times (what a client feels); each direction gets half.
Defaults: 5 ms within a region, 2 ms between any host and core, and between regions
1<->2 40 ms, 1<->3 120 ms, 2<->3 80 ms.

Namespaces are named `vgs-<pid>-<host>` (plus an optional tag). `cleanup_stale()` removes
namespaces of the `vgs-<pid>-` family whose pid is no longer alive, and only those.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from verge.procs import pid_alive

FAMILY = "vgs-"
TUN_NAME = "vg0"
ROUTED_PREFIXES = ("10.200.0.0/24", "10.10.0.0/16", "10.20.0.0/16")
CORE = "core"
NETNS_DIR = Path("/run/netns")

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_READ_SIZE = 65536
_READS_PER_WAKEUP = 256


# --------------------------------------------------------------------------- latency plan


def _default_between() -> dict[tuple[int, int], float]:
    return {(1, 2): 40.0, (1, 3): 120.0, (2, 3): 80.0}


@dataclass(frozen=True)
class Latency:
    """Round-trip times in ms between sites (0 = core, i = region i); optional rate cap."""

    local_ms: float = 5.0
    core_ms: float = 2.0
    between_ms: Mapping[tuple[int, int], float] = field(default_factory=_default_between)
    rate_mbit: float | None = None

    def rtt_ms(self, a: int, b: int) -> float:
        if a == 0 or b == 0:
            return self.core_ms
        if a == b:
            return self.local_ms
        pair = (min(a, b), max(a, b))
        if pair not in self.between_ms:
            raise ValueError(f"no round-trip time configured between regions {pair}")
        return self.between_ms[pair]


@dataclass(frozen=True)
class Host:
    """One namespace: its role name, its site (0 = core, i = region i) and its address."""

    name: str
    site: int
    address: str

    @property
    def prefix(self) -> str:
        return str(ipaddress.ip_network(f"{self.address}/24", strict=False))


def plan_hosts(regions: int) -> list[Host]:
    if not 1 <= regions <= 254:
        raise ValueError("regions must be between 1 and 254")
    hosts = [Host(CORE, 0, "10.200.0.2")]
    for i in range(1, regions + 1):
        hosts.append(Host(f"region-{i}", i, f"10.10.{i}.2"))
        hosts.append(Host(f"client-{i}", i, f"10.20.{i}.2"))
    return hosts


# --------------------------------------------------------------------------- delay queue


class DelayQueue:
    """A FIFO of packets, each due `delay` seconds after it arrived (sans I/O).

    With a rate, packets are also serialised one after another at `rate_bps`, as on a
    real link; a full queue drops the newest packet (tail drop). Due times never go down,
    so popping from the head keeps the arrival order.
    """

    def __init__(self, delay: float, rate_bps: float | None = None, limit: int = 4096) -> None:
        self.delay = delay
        self.rate_bps = rate_bps
        self.limit = limit
        self.dropped = 0
        self._items: deque[tuple[float, bytes]] = deque()
        self._busy_until = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, packet: bytes, now: float) -> bool:
        if len(self._items) >= self.limit:
            self.dropped += 1
            return False
        sent = now
        if self.rate_bps:
            sent = max(now, self._busy_until) + len(packet) * 8 / self.rate_bps
            self._busy_until = sent
        self._items.append((sent + self.delay, packet))
        return True

    @property
    def next_due(self) -> float | None:
        return self._items[0][0] if self._items else None

    def pop_due(self, now: float) -> list[bytes]:
        ready = []
        while self._items and self._items[0][0] <= now:
            ready.append(self._items.popleft()[1])
        return ready


# --------------------------------------------------------------------------- the switch


class DelaySwitch:
    """Forwards IPv4 packets between fds by destination /24, after a per-pair delay.

    `fds[i]` is port i (a TUN fd, or a datagram socket in tests); `routes` maps a /24
    network to the port that owns it; `one_way[i][j]` is the delay in seconds from port i
    to port j. Packets that are not IPv4 or have no route are dropped.
    """

    def __init__(
        self,
        fds: Sequence[int],
        routes: Mapping[str, int],
        one_way: Sequence[Sequence[float]],
        rate_bps: float | None = None,
    ) -> None:
        self.fds = list(fds)
        self._routes = {_prefix_key(net): port for net, port in routes.items()}
        self._one_way = one_way
        self._rate_bps = rate_bps
        self._queues: dict[tuple[int, int], DelayQueue] = {}
        self._timers: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.forwarded = 0
        self.dropped = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for port, fd in enumerate(self.fds):
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._on_readable, port)

    def close(self) -> None:
        if self._loop is None:
            return
        for fd in self.fds:
            self._loop.remove_reader(fd)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._loop = None

    def _on_readable(self, port: int) -> None:
        fd = self.fds[port]
        for _ in range(_READS_PER_WAKEUP):
            try:
                packet = os.read(fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.dropped += 1
                return
            if not packet:
                return
            self._accept(port, packet)

    def _accept(self, src: int, packet: bytes) -> None:
        dst = self._route(packet)
        if dst is None or dst == src:
            self.dropped += 1
            return
        queue = self._queue(src, dst)
        if not queue.push(packet, self._now()):
            self.dropped += 1
            return
        if (src, dst) not in self._timers:
            self._arm(src, dst, queue)

    def _route(self, packet: bytes) -> int | None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return None
        return self._routes.get(packet[16:19])

    def _queue(self, src: int, dst: int) -> DelayQueue:
        queue = self._queues.get((src, dst))
        if queue is None:
            delay = self._one_way[src][dst]
            queue = self._queues[(src, dst)] = DelayQueue(delay, self._rate_bps)
        return queue

    def _arm(self, src: int, dst: int, queue: DelayQueue) -> None:
        assert self._loop is not None and queue.next_due is not None
        self._timers[(src, dst)] = self._loop.call_at(queue.next_due, self._flush, src, dst)

    def _flush(self, src: int, dst: int) -> None:
        self._timers.pop((src, dst), None)
        queue = self._queues[(src, dst)]
        for packet in queue.pop_due(self._now()):
            self._deliver(dst, packet)
        if len(queue) and self._loop is not None:
            self._arm(src, dst, queue)

    def _deliver(self, dst: int, packet: bytes) -> None:
        try:
            os.write(self.fds[dst], packet)
            self.forwarded += 1
        except OSError:  # full or down: a real network drops too
            self.dropped += 1

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()


def _prefix_key(network: str) -> bytes:
    net = ipaddress.ip_network(network)
    if net.version != 4 or net.prefixlen != 24:
        raise ValueError(f"switch routes are IPv4 /24 networks, got {network}")
    return net.network_address.packed[:3]


async def _serve_switch(spec: dict) -> None:
    """Run the switch until stdin reaches end of file (the parent closed it or died)."""
    loop = asyncio.get_running_loop()
    switch = DelaySwitch(
        [port["fd"] for port in spec["ports"]],
        {net: i for i, port in enumerate(spec["ports"]) for net in port["prefixes"]},
        spec["one_way"],
        spec.get("rate_bps"),
    )
    switch.start(loop)
    stdin_closed = loop.create_future()

    def on_stdin() -> None:
        if not os.read(0, 4096):
            on_signal()

    def on_signal() -> None:
        if not stdin_closed.done():
            stdin_closed.set_result(None)

    loop.add_reader(0, on_stdin)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    print("ready", flush=True)
    try:
        await stdin_closed
    finally:
        loop.remove_reader(0)
        switch.close()


def run_switch() -> None:
    """Entry point of the switch process: one JSON spec line on stdin, then wait for EOF."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            return
        line += chunk
    with contextlib.suppress(OSError):  # a steadier clock under load, if allowed
        os.setpriority(os.PRIO_PROCESS, 0, -5)
    asyncio.run(_serve_switch(json.loads(line)))


# --------------------------------------------------------------------------- namespaces


def _ip(*args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _kill_namespace_processes(netns: str, grace: float = 2.0) -> None:
    pids = [int(p) for p in _ip("netns", "pids", netns, check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.02)
        pids = [pid for pid in pids if pid_alive(pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_namespace(netns: str) -> None:
    """Stop whatever still runs in `netns`, then delete it (missing is fine)."""
    if not (NETNS_DIR / netns).exists():
        return
    _kill_namespace_processes(netns)
    _ip("netns", "delete", netns, check=False)


def cleanup_stale() -> list[str]:
    """Delete `vgs-<pid>-*` namespaces whose creating process is gone; return their names."""
    removed = []
    for netns in list_namespaces():
        match = re.match(rf"^{FAMILY}(\d+)-", netns)
        if match and not pid_alive(int(match.group(1))):
            delete_namespace(netns)
            removed.append(netns)
    return removed


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _create_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def open_tun(netns: str, name: str = TUN_NAME) -> int:
    """Create TUN device `name` inside `netns` and return its fd (non-blocking, CLOEXEC)."""
    outcome: dict[str, object] = {}

    def in_namespace() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / netns, os.O_RDONLY)
        try:
            _setns(target)
            try:
                outcome["fd"] = _create_tun(name)
            finally:
                _setns(home)
        except BaseException as exc:  # handed to the calling thread
            outcome["error"] = exc
        finally:
            os.close(home)
            os.close(target)

    thread = threading.Thread(target=in_namespace, name=f"tun-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["fd"]  # type: ignore[return-value]


def preflight() -> str | None:
    """Why namespaces + TUN cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    probe = f"{FAMILY}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except FileNotFoundError:
        return "iproute2 (`ip`) is not installed"
    except RuntimeError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        os.close(open_tun(probe))
    except OSError as exc:
        return f"cannot open a TUN device in a namespace: {exc}"
    finally:
        _ip("netns", "delete", probe, check=False)
    return None


# --------------------------------------------------------------------------- topology


class Topology:
    """Core, one edge namespace per region and one client namespace per region.

    `start()` (or `with Topology() as topo:`) builds everything; `stop()` removes it all,
    including processes still running inside the namespaces. Host names are `core`,
    `region-i` and `client-i`; `exec_args(host)` prefixes a command to run there.
    """

    def __init__(self, regions: int = 3, latency: Latency | None = None, tag: str = "") -> None:
        self.latency = latency or Latency()
        self.hosts = {host.name: host for host in plan_hosts(regions)}
        for a in self.hosts.values():  # fail early on a missing pair
            for b in self.hosts.values():
                self.latency.rtt_ms(a.site, b.site)
        self.prefix = f"{FAMILY}{os.getpid()}-{tag + '-' if tag else ''}"
        self._switch: subprocess.Popen[bytes] | None = None

    # --- lookups

    def namespace(self, host: str) -> str:
        return host if host.startswith(self.prefix) else self.prefix + self._host(host).name

    def exec_args(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    def address(self, host: str) -> str:
        return self._host(host).address

    def rtt_ms(self, a: str, b: str) -> float:
        """The configured round-trip time between two hosts."""
        return self.latency.rtt_ms(self._host(a).site, self._host(b).site)

    @property
    def regions(self) -> list[str]:
        return [name for name in self.hosts if name.startswith("region-")]

    @property
    def clients(self) -> list[str]:
        return [name for name in self.hosts if name.startswith("client-")]

    def _host(self, host: str) -> Host:
        name = host.removeprefix(self.prefix)
        if name not in self.hosts:
            raise KeyError(f"unknown host {host!r}; known: {', '.join(self.hosts)}")
        return self.hosts[name]

    # --- life cycle

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._switch is not None and self._switch.poll() is None

    def start(self) -> Topology:
        """Build the namespaces and the switch; idempotent, and all-or-nothing."""
        if self.running:
            return self
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Remove every namespace of this topology and stop the switch; idempotent."""
        atexit.unregister(self.stop)
        if self._switch is not None:
            self._stop_switch(self._switch)
            self._switch = None
        for name in self.hosts:
            delete_namespace(self.namespace(name))

    def add_address(self, host: str, address: str) -> None:
        """Give `host` another address inside its own /24 (e.g. a second service in core)."""
        owner = self._host(host)
        if ipaddress.ip_address(address) not in ipaddress.ip_network(owner.prefix):
            raise ValueError(f"{address} is outside {owner.name}'s network {owner.prefix}")
        _ip("-n", self.namespace(host), "addr", "add", f"{address}/32", "dev", TUN_NAME)

    def _build(self) -> None:
        hosts = list(self.hosts.values())
        fds: list[int] = []
        try:
            for host in hosts:
                netns = self.namespace(host.name)
                delete_namespace(netns)  # a leftover with our exact name: start afresh
                _ip("netns", "add", netns)
                fds.append(open_tun(netns))
                self._configure(host)
            self._switch = self._spawn_switch(hosts, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _configure(self, host: Host) -> None:
        commands = [
            "link set lo up",
            f"link set {TUN_NAME} addrgenmode none",
            f"addr add {host.address}/32 dev {TUN_NAME}",
            f"link set {TUN_NAME} up",
            *(f"route add {net} dev {TUN_NAME} src {host.address}" for net in ROUTED_PREFIXES),
        ]
        _ip("-n", self.namespace(host.name), "-batch", "-", stdin="\n".join(commands) + "\n")

    def _spawn_switch(self, hosts: list[Host], fds: list[int]) -> subprocess.Popen[bytes]:
        rate = self.latency.rate_mbit
        spec = {
            "ports": [{"fd": fd, "prefixes": [h.prefix]} for h, fd in zip(hosts, fds, strict=True)],
            "one_way": [[self.latency.rtt_ms(a.site, b.site) / 2000 for b in hosts] for a in hosts],
            "rate_bps": rate * 1e6 if rate else None,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "verge.demo.netsim", "switch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=fds,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != b"ready":
            self._stop_switch(proc)
            raise RuntimeError("the delay switch did not start")
        return proc

    @staticmethod
    def _stop_switch(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


# --------------------------------------------------------------------------- measuring

_LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(256)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""

_CONNECTOR = """
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rtts = []
for _ in range(count):
    s = socket.socket()
    s.settimeout(5)
    t0 = time.perf_counter()
    s.connect((host, port))
    rtts.append((time.perf_counter() - t0) * 1000)
    s.close()
print(json.dumps(rtts))
"""


@contextlib.contextmanager
def tcp_listener(topo: Topology, host: str, port: int) -> Iterator[str]:
    """Accept-and-close TCP listener inside `host` on all its addresses; yields the address."""
    proc = subprocess.Popen(
        [*topo.exec_args(host), sys.executable, "-c", _LISTENER, str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"listener in {host} did not start")
        yield topo.address(host)
    finally:
        proc.terminate()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def tcp_connect_rtts(
    topo: Topology, client: str, address: str, port: int, count: int = 5
) -> list[float]:
    """Time `count` TCP connects (SYN to SYN-ACK, ms) from `client` to address:port."""
    result = subprocess.run(
        [*topo.exec_args(client), sys.executable, "-c", _CONNECTOR, address, str(port), str(count)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- demo


def demo(count: int = 5, port: int = 7007) -> int:
    reason = preflight()
    if reason:
        print(f"netsim: cannot build the topology here: {reason}", file=sys.stderr)
        return 1
    with Topology() as topo, contextlib.ExitStack() as listeners:
        for region in topo.regions:
            listeners.enter_context(tcp_listener(topo, region, port))
        print(f"namespaces: {', '.join(topo.namespace(h) for h in topo.hosts)}")
        print("median TCP connect time (ms), client -> edge; configured RTT in brackets")
        print(f"{'':10}" + "".join(f"{r + ' ' + topo.address(r):>24}" for r in topo.regions))
        for client in topo.clients:
            cells = []
            for region in topo.regions:
                rtt = statistics.median(
                    tcp_connect_rtts(topo, client, topo.address(region), port, count)
                )
                cells.append(f"{rtt:8.1f} [{topo.rtt_ms(client, region):5.0f}]")
            print(f"{client:10}" + "".join(f"{cell:>24}" for cell in cells))
    leftovers = [ns for ns in list_namespaces() if ns.startswith(topo.prefix)]
    print("torn down" if not leftovers else f"left behind: {leftovers}")
    return 0 if not leftovers else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verge.demo.netsim", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", nargs="?", default="demo", choices=["demo", "switch", "cleanup"])
    parser.add_argument("--count", type=int, default=5, help="connects per client/edge pair")
    args = parser.parse_args(argv)
    if args.command == "switch":
        run_switch()
        return 0
    if args.command == "cleanup":
        for netns in cleanup_stale():
            print(f"removed {netns}")
        return 0
    return demo(args.count)


if __name__ == "__main__":
    sys.exit(main())
