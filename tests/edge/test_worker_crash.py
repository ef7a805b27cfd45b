"""A worker killed with -9 in the middle of a cache fill: the node replaces it and removes the
temp file it left in the disk tier — only its own; another worker's fill in progress goes on.

A real `verge edge` with two workers in front of an origin that sends part of a big body and
then stalls, so both workers hold a half-written object when one of them is killed.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(90)

BODY = 4 << 20
STALL_AFTER = 256 << 10  # the origin sends this much of the body, then hangs


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def temp_files(cache_dir: Path) -> dict[int, list[Path]]:
    """Each writer's (pid's) temp files in the disk tier (``writing/PID-TOKEN/*.tmp``)."""
    found: dict[int, list[Path]] = {}
    writing = cache_dir / "writing"
    for scratch in writing.iterdir() if writing.exists() else ():
        files = list(scratch.glob("*.tmp"))
        found.setdefault(int(scratch.name.split("-")[0]), []).extend(files)
    return found


def start_fill(port: int, path: str) -> socket.socket:
    """A client that asks for `path` and then just keeps its connection open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: shop\r\n\r\n".encode())
    return sock


def test_kill_9_mid_fill_leaves_no_temp_file_behind(edge_factory, origin):
    origin.route(
        "/big/*",
        headers=[("Cache-Control", "max-age=60")],
        body=b"x" * BODY,
        stall_after=STALL_AFTER,
    )
    origin.route("/small", headers=[("Cache-Control", "no-store")], body=b"small\n")
    edge = edge_factory(origin_url=origin.url, workers=2)
    clients: list[socket.socket] = []
    try:
        while len([pid for pid, files in temp_files(edge.cache_dir).items() if files]) < 2:
            assert len(clients) < 40, "SO_REUSEPORT never gave the second worker a fill"
            clients.append(start_fill(edge.port, f"/big/{len(clients)}"))
            wait_for(
                lambda: sum(map(len, temp_files(edge.cache_dir).values())) == len(clients),
                what="the fill's temp file",
            )
        before = temp_files(edge.cache_dir)
        victim, survivor = sorted(pid for pid, files in before.items() if files)
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(
            lambda: set(temp_files(edge.cache_dir)) - set(before), what="the replacement worker"
        )  # it opened the disk tier
        after = temp_files(edge.cache_dir)
        assert victim not in after, "the dead worker's temp files are still there"
        assert not any(p.exists() for p in before[victim])
        assert after[survivor] == before[survivor]  # a live worker's fill is never touched
        assert all(p.stat().st_size >= STALL_AFTER for p in after[survivor])
        assert list((edge.cache_dir / "objects").rglob("*.tmp")) == []
        assert len(replaced) == 1
        for _ in range(6):  # new connections: both workers (the new one too) serve
            with httpx.Client(base_url=edge.url, timeout=10) as client:
                assert client.get("/small").text == "small\n"
        assert any("temp file(s) of dead worker" in line for line in edge.output)
    finally:
        for sock in clients:
            sock.close()
