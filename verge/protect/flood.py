"""The node's flood guard: a network that floods is refused whole, at TCP accept, in the kernel.

Why it exists: per-client rate limits (verge/protect/ratelimit.py) cannot stop a flood spread
over many addresses of one network, each address below its own limit: 254 addresses of a /24
sending 200 requests/s each are 50,000 requests/s, ten times what a core serves, while no
address breaks a limit of 300/s. Refusing those requests one by one does not help either: a
refused request still costs its parse and its check (about a third of a cache hit), and a
flooder whose connection is closed opens another at once. So the guard counts requests and
new connections per *network* (the client's /24 for IPv4, /48 for IPv6 by default, as CDNs'
L7 DDoS rules key them), and a network over its rate is put in a penalty box for ``penalty``
seconds (longer for a repeat offender, below) where:

- its open connections are closed at once, and any request it still sends on another is
  dropped with its connection (no answer, no parse of what it pipelined behind);
- its new connections are refused before the handshake completes: a classic BPF socket
  filter (``SO_ATTACH_FILTER``) on the listening sockets drops the SYNs of boxed IPv4
  networks, so a flooding network costs the worker nothing while it sits in the box (its
  clients' kernels back off and retry after 1, 3, 7... seconds). Where the filter cannot be
  attached (not Linux) or for IPv6 networks, the connection gate aborts the connection at
  accept, in Python (~10 µs a connection instead of ~0).

It is the operator's node-wide setting (top-level ``flood:`` in the config, off unless set):
a connection has no service when it is accepted, so a tenant's rule must never refuse a
network for every other tenant of the node. Counting is per worker, each worker allowing
``rate / workers`` (a network's addresses are spread over the workers by the kernel or by
client steering, so the node allows about ``rate``); a check is one worker-local GCRA update
(0.2-0.6 µs, :class:`verge.protect.gcra.Gcra`) on a network key memoised per peer text.

What the kernel filter sees (see verge/protect/steer.py for the same loads): for TCP the
listener's filter runs with the skb's data at the TCP header, so loads relative to
``SKF_NET_OFF`` read the IP header: the version nibble at 0, the IPv4 source at 12. A
returned 0 drops the packet, anything else keeps it. Accepted connections inherit the
listener's filter as it was at accept; a filter only ever drops networks boxed at that time,
so an older copy on a legitimate connection never harms it.

The onset, before the box: a flood costs the worker whatever it is allowed until its network
is boxed, and that is what a legitimate client on the same worker waits behind (the box
itself then makes the flood free). So the guard boxes early and cheaply:

- a new connection counts like a request (:meth:`FloodGuard.accept`, from the connection
  gate): a network that opens connections faster than the rate allows is boxed before it
  sends a single request, and the rest of its connections are refused at accept (accepting
  one and building its protocol costs as much as serving a small request);
- the first request over the rate boxes the network: its connections are aborted and marked
  closing, so what they pipelined behind is never parsed; and a large read is weighed before
  it is parsed (:meth:`FloodGuard.admit_read`: 64 KiB of pipelined GETs are ~1,500 requests,
  parsed 32 a turn): one that carries more requests than the network may still send at once
  boxes it at the read, so a flood on a few connections is not parsed for a whole burst;
- the kernel filter goes on at the first box (later boxes within FILTER_EVERY of a rebuild
  wait for the next new connection after it, not for the once-a-second housekeeping);
- a network boxed again soon after its release (within one more sentence) sits twice as
  long each time, up to MAX_ESCALATION times the penalty: a flood that resumes after every
  release pays the onset once per doubling sentence instead of once per ``penalty``.

The default burst is a tenth of a second of the rate (at least MIN_BURST). The burst is what
a flood is served at once at its onset, so with ~50 µs a served request it is the stall it
causes: 2000/s gives a burst of 200, ~10 ms. The rate, not the burst, is what must cover a
real /24 with many users behind one NAT: their aggregate is the sum of many independent
clients, smooth at the scale of 100 ms (a page load's dozens of requests take longer than
that), so a tenth of a second of the whole network's rate is many page loads at once. An
operator who sees boxes of legitimate networks raises the rate, or exempts the network.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from verge.cidr import CidrSet, parse_ip
from verge.protect.gcra import Gcra
from verge.protect.steer import (
    BPF_ABS,
    BPF_ALU,
    BPF_AND,
    BPF_B,
    BPF_JEQ,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_RET,
    BPF_RSH,
    BPF_W,
    SKF_NET_OFF,
    Insn,
    _SockFilter,
    _SockFprog,
)

log = logging.getLogger("verge.protect")

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
KEEP = 0xFFFFFFFF  # a socket filter's "keep the whole packet"
DROP = 0
MAX_FILTERED = 1000
"""Boxed IPv4 networks the kernel filter holds (2 instructions each, the kernel takes 4096);
beyond it the newest boxes are refused at accept in Python."""
MAX_BOXED = 10_000
"""Networks in the penalty box at once; beyond it the oldest is let out early (permissive)."""
FILTER_EVERY = 0.1
"""Seconds between two rebuilds of the kernel filter while networks are being boxed (the
accept-time check in Python covers the gap)."""
MAX_ESCALATION = 16
"""A repeat offender's sentence doubles up to this many times the penalty (and one day)."""
BURST_SECONDS = 0.1
"""The default burst: this much of the rate (see the module docstring)."""
MIN_BURST = 10
LOG_BOXES_PER_SECOND = 10
"""Box warnings written per second at most (the rest are counted: verge_flood_boxes)."""
MEMO_SIZE = 65_536
MAX_NETWORKS = 100_000
"""Networks counted at once; the least recently seen go first (permissive: they restart)."""


@dataclass(frozen=True, slots=True)
class FloodSpec:
    """The guard's settings (the config's top-level ``flood``, parsed)."""

    count: int
    period: int
    burst: int | None = None
    """Requests (and connections) a network may add at once; None: BURST_SECONDS of the
    rate, at least MIN_BURST."""
    penalty: float = 60.0
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    exempt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 8 <= self.ipv4_prefix <= 32:
            raise ValueError(f"ipv4_prefix must be 8..32, not {self.ipv4_prefix}")
        if not 16 <= self.ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 16..128, not {self.ipv6_prefix}")
        if not 1.0 <= self.penalty <= 86_400.0:
            raise ValueError(f"penalty must be 1..86400 seconds, not {self.penalty}")
        if self.burst is not None and self.burst < 0:
            raise ValueError(f"burst must be >= 0, not {self.burst}")

    @property
    def effective_burst(self) -> int:
        if self.burst is not None:
            return self.burst
        return max(MIN_BURST, int(self.count * BURST_SECONDS / self.period))


def _mask(bits: int, width: int) -> int:
    return ((1 << width) - 1) ^ ((1 << (width - bits)) - 1)


class FloodGuard:
    """Counts requests and new connections per network and boxes the networks over the rate
    (one per worker)."""

    def __init__(self, spec: FloodSpec, *, workers: int = 1) -> None:
        self.spec = spec
        # Each worker allows its share: rate / workers, burst / workers.
        self.limit = Gcra(spec.count, spec.period * max(1, workers),
                          spec.effective_burst // max(1, workers), max_keys=MAX_NETWORKS)
        self.exempt = CidrSet(spec.exempt)
        self._v4_mask = _mask(spec.ipv4_prefix, 32)
        self._v6_mask = _mask(spec.ipv6_prefix, 128)
        self._memo: dict[str, tuple[int, int] | None] = {}
        self.boxed: dict[tuple[int, int], float] = {}  # network -> end of its penalty
        self.strikes: dict[tuple[int, int], tuple[int, float]] = {}
        """network -> (boxes in a row, when they are forgotten): the escalating sentence."""
        self.listeners: list[socket.socket] = []  # where the kernel filter goes
        self.filtered: tuple[int, ...] | None = None  # the IPv4 networks in the filter now
        self.filter_ok = True
        self.on_box: Callable[[Callable[[str], bool]], object] | None = None
        """Called with a peer test when a network goes in the box: the server closes that
        network's open connections at once (what they pipelined is never parsed)."""
        self._filter_stale = False
        self._filtered_at = float("-inf")
        self.dropped = 0  # requests dropped (their connections closed)
        self.refused = 0  # connections refused at accept in Python
        self.boxes = 0  # networks put in the box
        self._log_second = -1  # the second whose box warnings are being counted
        self._logged = 0  # box warnings written in it
        self._unlogged = 0  # boxes in it not written (said at the next one written)

    @classmethod
    def of(cls, spec: FloodSpec | None, previous: FloodGuard | None, *, workers: int,
           listeners: list[socket.socket]) -> FloodGuard | None:
        """The guard for a config (None: off). A reload that leaves the settings alone keeps
        the previous guard with its counts and boxes; another one takes its filter off."""
        if previous is not None:
            if previous.spec == spec:
                return previous
            previous.close()
        if spec is None:
            return None
        guard = cls(spec, workers=workers)
        guard.listeners = listeners
        return guard

    def close(self) -> None:
        """Release every network and take the filter off the listeners."""
        self.boxed.clear()
        self.strikes.clear()
        self.filtered = None
        self.update_filter(float("inf"))

    def network(self, peer: str) -> tuple[int, int] | None:
        """(4 or 6, network as an int) of a peer address text; None: exempt or not an IP."""
        memo = self._memo
        try:
            return memo[peer]
        except KeyError:
            pass
        parsed = parse_ip(peer)
        if parsed is None or self.exempt.contains(*parsed):
            network = None
        else:
            version, value = parsed
            network = (4, value & self._v4_mask) if version == 4 else (6, value & self._v6_mask)
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[peer] = network
        return network

    def admit(self, peer: str, now: float) -> bool:
        """Count one request of ``peer``; False: drop it (and its connection)."""
        network = self.network(peer)
        if network is None or self._count(network, now):
            return True
        self.dropped += 1
        return False

    def accept(self, peer: str, now: float) -> bool:
        """Count a new connection of ``peer`` like a request; False: refuse it (its network
        is boxed, or is boxed by this one)."""
        network = self.network(peer)
        if network is None:
            return True
        if self._filter_stale and now - self._filtered_at >= FILTER_EVERY:
            self.update_filter(now)
        if self._count(network, now):
            return True
        self.refused += 1
        return False

    def admit_read(self, peer: str, requests: int, now: float) -> bool:
        """A read that carries ``requests`` pipelined requests at once, before any is parsed:
        False when they alone take the network over its rate (it is boxed now, and none of
        them is parsed). Nothing is counted here: each request is, as it is parsed."""
        network = self.network(peer)
        if network is None:
            return True
        release = self.boxed.get(network) if self.boxed else None
        if release is None or now >= release:
            tat, _ = self.limit.state(network, now)  # type: ignore[arg-type]
            ahead = tat - now if tat is not None and tat > now else 0.0
            if requests <= self.limit.remaining(ahead):
                return True
            self._box(network, now)
        self.dropped += requests
        return False

    def is_boxed(self, peer: str, now: float) -> bool:
        """Whether ``peer``'s network is in the box now (a query: nothing is counted)."""
        network = self.network(peer)
        release = self.boxed.get(network) if network is not None else None
        return release is not None and now < release

    def _count(self, network: tuple[int, int], now: float) -> bool:
        """One request or connection of ``network``; False: it is boxed (maybe just now)."""
        boxed = self.boxed
        if boxed:
            release = boxed.get(network)
            if release is not None:
                if now < release:
                    return False
                del boxed[network]
        if self.limit.update(network, now) >= 0.0:  # type: ignore[arg-type]
            return True
        self._box(network, now)
        return False

    def sentence(self, network: tuple[int, int], now: float) -> float:
        """The penalty for boxing ``network`` now: doubled for each box in a row (a box
        within one more sentence of the last one's end), up to MAX_ESCALATION times."""
        strikes, forgotten_at = self.strikes.pop(network, (0, 0.0))
        strikes = strikes + 1 if now < forgotten_at else 1
        base = self.spec.penalty
        penalty = min(base * 2 ** min(strikes - 1, 30), base * MAX_ESCALATION, 86_400.0)
        if len(self.strikes) >= MAX_BOXED:
            del self.strikes[next(iter(self.strikes))]
        self.strikes[network] = (strikes, now + 2 * penalty)
        return penalty

    def _box(self, network: tuple[int, int], now: float) -> None:
        boxed = self.boxed
        if len(boxed) >= MAX_BOXED:
            del boxed[next(iter(boxed))]
        penalty = self.sentence(network, now)
        boxed[network] = now + penalty
        self.boxes += 1
        self._log_box(network, penalty, now)
        if self.on_box is not None:
            self.on_box(lambda peer: self.network(peer) == network)
        if network[0] == 4:
            self._filter_stale = True
            if not self.filtered or now - self._filtered_at >= FILTER_EVERY:
                self.update_filter(now)

    def _log_box(self, network: tuple[int, int], penalty: float, now: float) -> None:
        """One warning per box, at most LOG_BOXES_PER_SECOND a second: a flood spread over
        thousands of networks (an IPv6 attacker has as many /48s as it likes) must not flood
        the log too; the boxes not written are counted in the next line that is."""
        second = int(now)
        if second != self._log_second:
            self._log_second, self._logged = second, 0
        if self._logged >= LOG_BOXES_PER_SECOND:
            self._unlogged += 1
            return
        self._logged += 1
        more, self._unlogged = self._unlogged, 0
        log.warning("flood guard: %s over %d/%ds, boxed for %.0f s%s", network_text(network),
                    self.spec.count, self.spec.period, penalty,
                    f" ({more} more networks boxed before it, not logged)" if more else "")

    def sweep(self, now: float) -> int:
        """Release the networks whose penalty is over (periodic housekeeping); how many."""
        released = [network for network, end in self.boxed.items() if end <= now]
        for network in released:
            del self.boxed[network]
        forgotten = [network for network, (_, end) in self.strikes.items() if end <= now]
        for network in forgotten:
            del self.strikes[network]
        self.limit.sweep(now)
        if any(version == 4 for version, _ in released):
            self._filter_stale = True
        if self._filter_stale:
            self.update_filter(now)
        return len(released)

    def update_filter(self, now: float) -> None:
        """Put the boxed IPv4 networks (the newest MAX_FILTERED) into the listeners' filter."""
        self._filter_stale, self._filtered_at = False, now
        newest: list[int] = []
        for version, value in reversed(self.boxed):
            if version == 4:
                newest.append(value)
                if len(newest) == MAX_FILTERED:
                    break
        networks = tuple(newest)
        if networks == self.filtered:
            return
        self.filtered = networks
        for sock in self.listeners:
            try:
                apply_filter(sock, networks, self._v4_mask)
            except OSError as exc:
                if self.filter_ok:
                    log.warning("flood guard: no kernel filter on the listener (%s); "
                                "boxed networks are refused at accept", exc)
                self.filter_ok = False

    def stats(self) -> dict[str, int]:
        return {"dropped": self.dropped, "refused": self.refused, "boxes": self.boxes,
                "boxed": len(self.boxed), "filtered": len(self.filtered or ())}


def network_text(network: tuple[int, int]) -> str:
    """A network key as an address text (its first address): 192.0.2.0, 2001:db8::."""
    version, value = network
    if version == 4:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value))


def drop_program(networks: Sequence[int], mask: int) -> list[Insn]:
    """A socket filter dropping IPv4 packets whose source & ``mask`` is in ``networks``."""
    program: list[Insn] = [
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, _net(0)),
        (BPF_ALU | BPF_RSH | BPF_K, 0, 0, 4),
        (BPF_JMP | BPF_JEQ | BPF_K, 1, 0, 4),  # IPv4: go on; else keep
        (BPF_RET | BPF_K, 0, 0, KEEP),
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, _net(12)),
        (BPF_ALU | BPF_AND | BPF_K, 0, 0, mask),
    ]
    for network in networks:
        program += [
            (BPF_JMP | BPF_JEQ | BPF_K, 0, 1, network),
            (BPF_RET | BPF_K, 0, 0, DROP),
        ]
    program.append((BPF_RET | BPF_K, 0, 0, KEEP))
    return program


def _net(offset: int) -> int:
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def apply_filter(sock: socket.socket, networks: Iterable[int], mask: int) -> None:
    """Attach the drop program for ``networks`` to a listening socket (none: detach)."""
    networks = list(networks)
    if not networks:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError as exc:
            if exc.errno != 2:  # ENOENT: no filter was attached
                raise
        return
    program = drop_program(networks, mask)
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), filters)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
