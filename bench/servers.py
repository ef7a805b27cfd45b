"""The servers a benchmark run starts: the origin, nginx with proxy_cache, and Verge.

Every server runs in its own session (process group) with its files under one temporary
directory, so that stopping it kills its workers too and nothing is left behind, even after
Ctrl-C. Servers that are measured can be pinned to a CPU with taskset so that the load
generator, pinned to another core, does not steal their cycles.

The nginx configs are deliberately close to nginx's own defaults (not Debian's): one
worker, `tcp_nopush off`, access log on, and either `sendfile on` or `sendfile off`. The
two deviations, a buffered access log and unlimited keep-alive requests, both favour
nginx, so a Verge/nginx ratio is never flattered by a handicapped nginx.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STOP_GRACE_S = 5.0
READY_TIMEOUT_S = 30.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """A server did not start or stopped unexpectedly."""


@dataclass
class Server:
    """A running server process (leader of its own session) and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory of every process in this server's session (master + workers)."""
        return session_rss_bytes(self.process.pid)

    def stop(self) -> None:
        """Terminate the whole process group; escalate to SIGKILL after a grace period."""
        if not self.alive():
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_GRACE_S)
        # Workers may outlive a master that exited first.
        _signal_group(self.process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_stat_fields(pid: str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is index 0)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def worker_pids(server: Server) -> list[int]:
    """A `verge edge`'s worker processes: children of its supervisor running
    verge.edge.worker."""
    pids = []
    for entry in os.listdir("/proc"):
        fields = _proc_stat_fields(entry) if entry.isdigit() else None
        if fields is None or int(fields[1]) != server.process.pid:
            continue
        with contextlib.suppress(OSError):
            if b"verge.edge.worker" in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
    if not pids:
        raise ServerError(f"no workers found under the {server.name} edge ({server.process.pid})")
    return sorted(pids)


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        fields = _proc_stat_fields(entry) if entry.isdigit() else None
        if fields is not None:
            parents[int(entry)] = int(fields[1])
    tree, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        tree += frontier
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes, from /proc/PID/stat."""
    total = 0
    for pid in pids:
        fields = _proc_stat_fields(str(pid))
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def session_rss_bytes(session_id: int) -> int:
    """Sum of RSS over all processes whose session id is `session_id`.

    Pages shared between a master and its forked workers are counted once per process,
    which is what `ps` and most dashboards show; it overstates, never understates.
    """
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat_fields(entry)
        if fields and int(fields[3]) == session_id:
            total += int(fields[21]) * PAGE_SIZE
    return total


def spawn(name: str, argv: list[str], log_path: Path, port: int, cpus: str | None) -> Server:
    """Start `argv` in a new session, optionally pinned to `cpus`, logging to `log_path`."""
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name=name, process=process, log_path=log_path, port=port)


def wait_until(server: Server, ready: Callable[[], bool], timeout_s: float) -> None:
    """Poll `ready` until it is true; fail early, with the server's log, if it dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerError(
                f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        if ready():
            return
        time.sleep(0.05)
    raise ServerError(f"{server.name} not ready after {timeout_s:.0f}s:\n{server.log_tail()}")


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return check


# --- nginx -------------------------------------------------------------------------------


def _nginx_main_conf(workdir: Path, http_body: str) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / ('tmp_' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    keepalive_requests 1000000000;
{temp}
{http_body}
}}
"""


def _start_nginx(name: str, workdir: Path, http_body: str, port: int, cpus: str | None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(_nginx_main_conf(workdir, http_body))
    argv = ["nginx", "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "error.log")]
    server = spawn(name, argv, workdir / "stdout.log", port, cpus)
    server.log_path = workdir / "error.log"
    wait_until(server, port_open(port), READY_TIMEOUT_S)
    return server


def start_origin(workdir: Path, files_dir: Path) -> Server:
    """A tiny nginx serving `files_dir` with `Cache-Control: max-age=3600` (hit only in warm-up)."""
    port = free_port()
    body = f"""    access_log {workdir / "access.log"};
    server {{
        listen 127.0.0.1:{port};
        root {files_dir};
        location / {{ add_header Cache-Control "max-age=3600" always; }}
    }}"""
    return _start_nginx("origin", workdir, body, port, cpus=None)


def start_nginx_cache(
    name: str, workdir: Path, origin_port: int, *, sendfile: bool, cpus: str | None
) -> Server:
    """nginx as a caching reverse proxy (proxy_cache) in front of the origin."""
    port = free_port()
    body = f"""    sendfile {"on" if sendfile else "off"};
    tcp_nopush off;
    access_log {workdir / "access.log"} combined buffer=64k flush=1s;
    proxy_cache_path {workdir / "cache"} levels=1:2 keys_zone=bench:16m max_size=4g
                     inactive=24h use_temp_path=off;
    upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            add_header Cache-Status "nginx; $upstream_cache_status" always;
        }}
    }}"""
    return _start_nginx(name, workdir, body, port, cpus)


# --- Verge -------------------------------------------------------------------------------


def start_verge(
    name: str,
    workdir: Path,
    verge_bin: str,
    origin_port: int,
    *,
    workers: int,
    cpus: str | None,
    admin_token: str,
    extra_args: Sequence[str] = (),
) -> Server:
    """`verge edge` with its own cache dir and access log; ready when /healthz answers 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    argv = [
        verge_bin,
        "edge",
        "--listen",
        f"127.0.0.1:{port}",
        "--origin",
        f"http://127.0.0.1:{origin_port}",
        "--cache-dir",
        str(workdir / "cache"),
        "--admin",
        f"127.0.0.1:{admin_port}",
        "--admin-token",
        admin_token,
        "--workers",
        str(workers),
        "--access-log",
        str(workdir / "access.log"),
        *extra_args,
    ]
    server = spawn(name, argv, workdir / "verge.log", port, cpus)
    server.extra["admin"] = f"http://127.0.0.1:{admin_port}"
    wait_until(server, http_ok(f"{server.extra['admin']}/healthz"), READY_TIMEOUT_S)
    wait_until(server, port_open(port), READY_TIMEOUT_S)
    return server
