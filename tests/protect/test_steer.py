"""Client steering: every connection from one source address lands on one listener.

Two levels. The program itself runs here in a small classic-BPF interpreter over synthetic
IPv4 and IPv6 headers and must agree with the Python model (steer_index) for any address,
worker count and IPv6 prefix. Then the kernel: worker processes listen on one SO_REUSEPORT
port (next to a bound, not listening reservation socket, as verge.edge.node keeps one), each
attaches the program after listen() as the workers will, and clients bound to 127.0.0.N
connect several times each: every source must reach exactly the listener the model names.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verge.protect import steer
from verge.protect.steer import (
    NO_SOCKET,
    attach_client_steering,
    detach_client_steering,
    steer_index,
    steering_program,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT BPF is Linux's")

# ---- the program, interpreted -----------------------------------------------------------------


def run_classic_bpf(program: list[tuple[int, int, int, int]], ip_header: bytes) -> int:
    """What the kernel computes, for the instructions the steering program uses. Loads at
    SKF_NET_OFF + k read the IP header; a load out of bounds ends the program with 0."""
    a = x = pc = 0
    net = steer.SKF_NET_OFF & 0xFFFFFFFF
    for _ in range(len(program) + 1):
        code, jt, jf, k = program[pc]
        pc += 1
        klass = code & 0x07
        if klass == steer.BPF_LD:
            size = {steer.BPF_W: 4, steer.BPF_B: 1}[code & 0x18]
            offset = k - net
            if not 0 <= offset <= len(ip_header) - size:
                return 0
            a = int.from_bytes(ip_header[offset : offset + size], "big")
        elif klass == steer.BPF_ALU:
            a = alu(code & 0xF0, a, x if code & steer.BPF_X else k)
        elif klass == steer.BPF_MISC:
            if code & 0xF8 == steer.BPF_TXA:
                a = x
            else:
                x = a
        elif klass == steer.BPF_JMP:
            if code & 0xF0 == steer.BPF_JA:
                pc += k
            else:
                pc += jt if a == k else jf
        elif klass == steer.BPF_RET:
            return a if code & 0x18 == steer.BPF_A else k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("the program ran off its end or looped")


def alu(op: int, a: int, operand: int) -> int:
    if op == steer.BPF_RSH:
        return a >> operand
    if op == steer.BPF_AND:
        return a & operand
    if op == steer.BPF_XOR:
        return a ^ operand
    if op == steer.BPF_MUL:
        return (a * operand) & 0xFFFFFFFF
    if op == steer.BPF_MOD:
        return a % operand
    raise AssertionError(f"unexpected ALU operation {op:#x}")


def ip_header(address: str) -> bytes:
    """The header on the wire: a dual-stack socket's "::ffff:a.b.c.d" peer sent IPv4 (Linux
    drops IPv6 packets whose source is IPv4-mapped)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return bytes([0x45]) + bytes(11) + ip.packed + bytes(4)
    return bytes([0x60]) + bytes(7) + ip.packed + bytes(16)


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@settings(max_examples=200, deadline=None)
@given(addresses, st.integers(1, 64), st.integers(0, 128))
def test_the_program_computes_the_model(address, workers, prefix) -> None:
    program = steering_program(workers, prefix)
    assert len(program) <= steer.BPF_MAXINSNS
    assert all(jt < 256 and jf < 256 for _, jt, jf, _ in program)
    assert run_classic_bpf(program, ip_header(address)) == steer_index(address, workers, prefix)


def test_one_ipv6_prefix_is_one_worker() -> None:
    """A host rotating through its /64 stays on one worker; another /64 may not."""
    picks = {steer_index(f"2001:db8:0:1::{n:x}", 16) for n in range(1, 2000)}
    assert len(picks) == 1
    spread = {steer_index(f"2001:db8:0:{n:x}::1", 16) for n in range(1, 2000)}
    assert len(spread) == 16


def test_v4_mapped_addresses_hash_as_ipv4() -> None:
    assert steer_index("::ffff:192.0.2.7", 5) == steer_index("192.0.2.7", 5)


def test_other_packets_get_the_kernel_hash() -> None:
    program = steering_program(4)
    assert run_classic_bpf(program, bytes([0x50]) + bytes(40)) == NO_SOCKET  # not IPv4/6
    assert run_classic_bpf(program, bytes([0x45, 0, 0])) == 0  # truncated: the kernel's 0


def test_the_spread_is_even_enough() -> None:
    counts = [0] * 4
    for n in range(4096):
        counts[steer_index(f"198.51.{n >> 8}.{n & 255}", 4)] += 1
    assert min(counts) > 4096 / 4 * 0.8


@pytest.mark.parametrize("workers,prefix", [(0, 64), (65536, 64), (4, -1), (4, 129)])
def test_bad_parameters(workers, prefix) -> None:
    with pytest.raises(ValueError):
        steering_program(workers, prefix)


# ---- the kernel -------------------------------------------------------------------------------

WORKER = """
import select, socket, sys
from verge.protect.steer import attach_client_steering
host, port, workers, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
if family == socket.AF_INET6:
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
sock.bind((host, port))
sock.listen(128)
attach_client_steering(sock, workers, prefix)
print("ready", flush=True)
while True:
    readable, _, _ = select.select([sock, sys.stdin], [], [], 30)
    if sys.stdin in readable or not readable:
        break
    conn, peer = sock.accept()
    print(peer[0], flush=True)
    conn.close()
print("done", flush=True)
"""


def reservation(host: str) -> socket.socket:
    """Bound, not listening, SO_REUSEPORT: the node's hold on the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    return sock


def start_workers(host: str, port: int, count: int, prefix: int) -> list[subprocess.Popen]:
    """Started one after the other: the group's socket order is the start order."""
    workers = []
    for _ in range(count):
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER, host, str(port), str(count), str(prefix)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.getcwd(),
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        workers.append(process)
    return workers


def connect_from(sources: list[str], port: int, times: int, target: str) -> int:
    sockets = []
    for source in sources:
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        for _ in range(times):
            client = socket.socket(family, socket.SOCK_STREAM)
            client.bind((source, 0))
            client.connect((target if family == socket.AF_INET else "::1", port))
            sockets.append(client)
    for client in sockets:  # each worker closes what it accepts: wait until all were
        select.select([client], [], [], 10)
        client.close()
    return len(sockets)


def landings(workers: list[subprocess.Popen], expected: int) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.close()
    for index, worker in enumerate(workers):
        assert worker.stdout is not None
        lines = worker.stdout.read().split()
        worker.wait(timeout=30)
        assert lines[-1] == "done"
        for peer in lines[:-1]:
            seen.setdefault(str(ipaddress.ip_address(peer)), set()).add(index)
    assert sum(len(v) for v in seen.values()) <= expected
    return seen


def test_connections_from_one_source_reach_one_worker() -> None:
    hold = reservation("127.0.0.1")
    port = hold.getsockname()[1]
    workers = start_workers("127.0.0.1", port, 3, 64)
    sources = [f"127.0.0.{n}" for n in range(1, 25)]
    total = connect_from(sources, port, 4, "127.0.0.1")
    seen = landings(workers, total)
    hold.close()
    assert set(seen) == set(sources)
    for source, listeners in seen.items():
        assert listeners == {steer_index(source, 3)}, source
    assert len({index for listeners in seen.values() for index in listeners}) == 3


def test_dual_stack_listeners_steer_ipv4_and_ipv6() -> None:
    hold = reservation("::")
    port = hold.getsockname()[1]
    workers = start_workers("::", port, 4, 128)
    sources = ["::1", *(f"127.0.0.{n}" for n in range(1, 9))]
    total = connect_from(sources, port, 3, "127.0.0.1")
    seen = landings(workers, total)
    hold.close()
    for source in sources:
        key = source if ":" in source else f"::ffff:{source}"
        assert seen[str(ipaddress.ip_address(key))] == {steer_index(source, 4, 128)}, source
    assert steer_index("::1", 4, 128) != 0  # ::1 is hashed, not the /64's zero


def test_detach_gives_the_group_back_to_the_kernel_hash() -> None:
    listeners = []
    port = 0
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]
        sock.listen(64)
        sock.setblocking(False)
        listeners.append(sock)
    attach_client_steering(listeners[0], 2)
    detach_client_steering(listeners[1])  # any socket of the group
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    accepted = [0, 0]
    deadline = time.monotonic() + 10
    while sum(accepted) < 40 and time.monotonic() < deadline:
        readable, _, _ = select.select(listeners, [], [], 1)
        for sock in readable:
            conn, _ = sock.accept()
            conn.close()
            accepted[listeners.index(sock)] += 1
    for sock in (*clients, *listeners):
        sock.close()
    assert sum(accepted) == 40 and min(accepted) > 0  # one source, both listeners


def test_a_socket_without_reuseport_is_refused() -> None:
    with socket.socket() as sock, pytest.raises(OSError):
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        attach_client_steering(sock, 2)
