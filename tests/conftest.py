"""Shared fixtures: a programmable origin and real `verge edge` processes on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.origin import origin_fixture

origin = pytest.fixture(origin_fixture, name="origin")

ROOT = Path(__file__).resolve().parent.parent
VERGE = [sys.executable, "-m", "verge.cli"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EdgeProcess:
    """`verge edge` as a child process, ready when it prints its ready line."""

    def __init__(self, workdir: Path, *, origin_url: str | None = None, config: str | None = None,
                 workers: int = 1, token: str = "test-token", access_log: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = 0  # the edge picks free ports and prints them in its ready line
        self.admin_port = 0
        self.token = token
        self.cache_dir = workdir / "cache"
        self.args = [*VERGE, "edge", "--listen", "127.0.0.1:0",
                     "--admin", "127.0.0.1:0", "--admin-token", token,
                     "--cache-dir", str(self.cache_dir), "--workers", str(workers)]
        if origin_url:
            self.args += ["--origin", origin_url]
        if config is not None:
            path = workdir / "verge.yaml"
            path.write_text(config)
            self.args += ["--config", str(path)]
        if access_log:
            self.access_log = workdir / "access.log"
            self.args += ["--access-log", str(self.access_log)]
        self.args += list(extra_args)
        self.https_port = 0
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 30.0) -> EdgeProcess:
        """Start (or restart, on the same ports) and wait for the ready line."""
        args = list(self.args)
        if self.port:
            args[args.index("--listen") + 1] = f"127.0.0.1:{self.port}"
            args[args.index("--admin") + 1] = f"127.0.0.1:{self.admin_port}"
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=self.workdir, start_new_session=True)
        ready = threading.Event()
        seen = []

        def pump() -> None:
            for line in self.proc.stdout:
                self.output.append(line)
                if "verge edge ready" in line:
                    seen.append(line)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not seen:
            self.stop()
            raise RuntimeError("edge did not start:\n" + "".join(self.output))
        match = re.search(r"ready: http://[\d.]+:(\d+) admin http://[\d.]+:(\d+)", seen[0])
        self.port, self.admin_port = int(match.group(1)), int(match.group(2))
        https = re.search(r"https https://[\d.]+:(\d+)", seen[0])
        if https:
            self.https_port = int(https.group(1))
        return self

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kw)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.admin_url, timeout=10,
                            headers={"Authorization": f"Bearer {self.token}"})

    def kill9(self) -> None:
        """SIGKILL the whole process group (supervisor and workers), as a crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def edge_factory(tmp_path):
    started: list[EdgeProcess] = []

    def make(**kw) -> EdgeProcess:
        edge = EdgeProcess(tmp_path, **kw)
        started.append(edge)
        return edge.start()

    yield make
    for edge in started:
        edge.stop()


@pytest.fixture
def edge(edge_factory, origin):
    """One edge (one worker) in front of the test origin."""
    return edge_factory(origin_url=origin.url)


@pytest.fixture
def fleet(tmp_path, origin):
    """A real `verge control` (tests.control.test_fleet.Fleet) in front of the test origin;
    edges are started by the test; everything is stopped after it."""
    from tests.control.test_fleet import Fleet

    fleet = Fleet(tmp_path, origin.url)
    fleet.start_control()
    yield fleet
    fleet.stop()
