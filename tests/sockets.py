"""Socket helpers shared by tests that need a client from a chosen loopback address."""

from __future__ import annotations

import socket


def connects(source: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connection from ``source`` to 127.0.0.1:``port`` completes its handshake
    within ``timeout`` (False: the SYN went unanswered, e.g. dropped by a socket filter)."""
    with socket.socket() as client:
        client.bind((source, 0))
        client.settimeout(timeout)
        try:
            client.connect(("127.0.0.1", port))
        except TimeoutError:
            return False
        return True
