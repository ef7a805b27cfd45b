"""Steer every connection from one client address to one worker of the SO_REUSEPORT group.

Why: the edge runs one worker process per core, all listening on the same port with
SO_REUSEPORT, and the kernel spreads new connections over them by a hash of the 4-tuple, so
one client's connections land on any worker. Per-client state (a rate limit's GCRA
timestamp, the per-IP connection count) would then be split over the workers, and a limit of
100/s would let a client with N connections through at up to N x 100/s. A classic BPF program
attached to the group (``SO_ATTACH_REUSEPORT_CBPF``, Linux 4.5+) picks the socket instead: it
hashes the source address only, so every connection of one client reaches the same worker and
that worker's plain dict holds the client's whole state (see verge/protect/ratelimit.py for
the measured alternative, a table in shared memory, and why it only serves the keys that
cannot be steered).

What the program can read: for TCP the kernel runs it from the listener lookup
(``reuseport_select_sock``) with the skb's data pointer advanced past the TCP header, so
absolute loads see the payload (empty for a SYN). Loads relative to ``SKF_NET_OFF`` reach the
IP header (``bpf_internal_load_pointer_neg_helper``): the version nibble at offset 0, the
IPv4 source address at 12, the IPv6 source address at 8..23. The program returns an index
into the group's socket array; an index at or past its length makes the kernel fall back to
its own hash (``reuseport_select_sock_by_hash``), which is also what happens to any packet
that is neither IPv4 nor IPv6.

Rules the caller keeps (the group is the kernel's, not ours):

- Attach after ``listen()``: a program attached to a socket that has not joined the group
  yet stays with that socket's private group and is dropped when it joins the real one.
  Attaching the same program from every worker is harmless (the last one wins).
- ``n_workers`` is the size of the group: the socket array holds the listening sockets in
  the order they called ``listen()``. When a worker dies its slot is refilled by the last
  socket and the new worker's socket is appended, so the client -> worker map changes for
  the clients of two slots until then (their limits restart in the new worker: permissive,
  never stricter); while the group is short of a socket, the clients hashed to the missing
  index are spread by the kernel's hash.
- Several ports (HTTP and HTTPS) are separate groups: one client reaches the same worker on
  both only if the workers joined both groups in the same order (listen under one lock).
- IPv6 clients are hashed by their /64 (``ipv6_prefix``), the same prefix the rate-limit
  keys use, so one host rotating through its /64 stays on one worker.
- Do not steer when the peers are proxies (trusted_proxies): all their clients would land on
  one worker.

The Python model :func:`steer_index` computes the same index; tests compare the two.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_B, BPF_ABS = 0x00, 0x10, 0x20
BPF_MUL, BPF_AND, BPF_RSH, BPF_MOD, BPF_XOR = 0x20, 0x50, 0x70, 0x90, 0xA0
BPF_JA, BPF_JEQ = 0x00, 0x10
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
SKF_NET_OFF = -0x100000
BPF_MAXINSNS = 4096

GOLDEN = 0x9E3779B1  # 2^32 / phi: multiplicative hashing (Knuth)
MAX_WORKERS = 65535  # the kernel's socket array is indexed by u16
NO_SOCKET = 0xFFFFFFFF  # an index past the array: the kernel's own hash decides
DEFAULT_IPV6_PREFIX = 64


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


Insn = tuple[int, int, int, int]  # (code, jt, jf, k)


def _net(offset: int) -> int:
    """The k of a load from the network header (IP) at `offset`, as the u32 the kernel reads."""
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def _word_masks(prefix: int) -> list[int]:
    """Masks of the 32-bit words of an IPv6 address that a /prefix keeps (whole words only)."""
    masks = []
    for word in range(4):
        bits = min(32, max(0, prefix - 32 * word))
        if bits:
            masks.append((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF)
    return masks


def _mix(masks: list[int], first_offset: int) -> list[Insn]:
    """X = hash of the masked words at the IP header offsets first_offset, +4, ..."""
    out: list[Insn] = []
    for index, mask in enumerate(masks):
        out.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, _net(first_offset + 4 * index)))
        if mask != 0xFFFFFFFF:
            out.append((BPF_ALU | BPF_AND | BPF_K, 0, 0, mask))
        out.append((BPF_ALU | BPF_XOR | BPF_X, 0, 0, 0))
        out.append((BPF_ALU | BPF_MUL | BPF_K, 0, 0, GOLDEN))
        out.append((BPF_MISC | BPF_TAX, 0, 0, 0))
    return out


def steering_program(n_workers: int, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> list[Insn]:
    """The classic BPF program: source address (IPv6: its /ipv6_prefix) -> socket index."""
    _check(n_workers, ipv6_prefix)
    v4 = _mix([0xFFFFFFFF], 12)
    v6 = _mix(_word_masks(ipv6_prefix), 8)
    finish = [
        (BPF_MISC | BPF_TXA, 0, 0, 0),
        (BPF_ALU | BPF_RSH | BPF_K, 0, 0, 16),
        (BPF_ALU | BPF_MOD | BPF_K, 0, 0, n_workers),
        (BPF_RET | BPF_A, 0, 0, 0),
    ]
    fallback = [(BPF_RET | BPF_K, 0, 0, NO_SOCKET)]
    # Layout: version test | v6 | ja finish | v4 | finish | fallback (jumps count from the
    # next instruction).
    program = [
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, _net(0)),
        (BPF_ALU | BPF_RSH | BPF_K, 0, 0, 4),
        (BPF_JMP | BPF_JEQ | BPF_K, len(v6) + 2, 0, 4),  # IPv4: to the v4 block
        (BPF_JMP | BPF_JEQ | BPF_K, 0, len(v6) + 1 + len(v4) + len(finish), 6),  # else out
        *v6,
        (BPF_JMP | BPF_JA, 0, 0, len(v4)),
        *v4,
        *finish,
        *fallback,
    ]
    return program


def _check(n_workers: int, ipv6_prefix: int) -> None:
    if not 1 <= n_workers <= MAX_WORKERS:
        raise ValueError(f"n_workers must be 1..{MAX_WORKERS}, not {n_workers}")
    if not 0 <= ipv6_prefix <= 128:
        raise ValueError(f"ipv6_prefix must be 0..128, not {ipv6_prefix}")


def attach_client_steering(
    sock: socket.socket, n_workers: int, ipv6_prefix: int = DEFAULT_IPV6_PREFIX
) -> None:
    """Attach the program to the SO_REUSEPORT group of a listening (or bound UDP) socket.

    Raises OSError when the kernel refuses it (not Linux, no SO_REUSEPORT on the socket).
    """
    program = steering_program(n_workers, ipv6_prefix)
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), filters)
    # The kernel copies the program during the call: `filters` only has to outlive it.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def detach_client_steering(sock: socket.socket) -> None:
    """Remove the group's program: the kernel's 4-tuple hash spreads connections again."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)


def steer_index(address: str, n_workers: int, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> int:
    """The socket index the program picks for a client address (the Python model)."""
    _check(n_workers, ipv6_prefix)
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket receives IPv4 packets for these
    raw = ip.packed
    if ip.version == 4:
        words, masks = [int.from_bytes(raw, "big")], [0xFFFFFFFF]
    else:
        masks = _word_masks(ipv6_prefix)
        words = [int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(len(masks))]
    state = 0
    for word, mask in zip(words, masks, strict=True):
        state = (((word & mask) ^ state) * GOLDEN) & 0xFFFFFFFF
    return (state >> 16) % n_workers
