"""A throwaway PostgreSQL cluster for tests: initdb into a temp dir, pg_ctl start, createdb.

The cluster listens on 127.0.0.1 on a free port (its unix socket stays in the temp dir), runs
with fsync off (nothing here must survive a crash) and is removed at the end of the session.
initdb refuses to run as root, so as root the server runs as the ``postgres`` OS user (via
runuser) in a directory owned by it. Each test gets its own database, copied from a template
that was migrated once, which is much faster than migrating every time.

When PostgreSQL cannot be had (no binaries, root without a ``postgres`` user, start failure)
:func:`start_cluster` raises :class:`Unavailable` with the reason; the fixtures turn that into
a visible skip.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("initdb", "pg_ctl")


class Unavailable(Exception):
    """PostgreSQL cannot run here; the message says why."""


def find_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += [Path(p) for p in versions]
    for directory in candidates:
        if all((directory / name).is_file() for name in BINARIES):
            return directory
    raise Unavailable(
        "PostgreSQL binaries (initdb, pg_ctl) not found in PATH or /usr/lib/postgresql/*/bin"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> list[str]:
    """Command prefix that runs a PostgreSQL binary as a non-root user ([] when not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise Unavailable("running as root and there is no 'postgres' user for initdb") from None
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--"]
    raise Unavailable("running as root and runuser is missing (initdb refuses root)")


@dataclass
class Cluster:
    bin_dir: Path
    root: Path
    port: int
    prefix: list[str]
    _counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if result.returncode != 0:
            raise Unavailable(f"{Path(args[0]).name} failed: {result.stderr.strip()[-500:]}")
        return result

    def sql(self, statement: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as connection:
            connection.execute(statement)

    def new_database(self, template: str | None = None) -> str:
        """A fresh database (a copy of ``template`` when given); returns its URL."""
        name = f"verge_test_{next(self._counter)}"
        self.sql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            [
                *self.prefix,
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=30,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> Cluster:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; raises Unavailable with the reason."""
    bin_dir = find_bin_dir()
    prefix = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="verge-pg-"))
    if prefix:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(bin_dir, root, _free_port(), prefix)
    try:
        cluster.run(
            str(bin_dir / "initdb"),
            "-D",
            str(cluster.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = (
            f"-h 127.0.0.1 -p {cluster.port} -k {root} -F -c full_page_writes=off "
            "-c synchronous_commit=off -c max_connections=200"
        )
        cluster.run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(cluster.data),
            "-o",
            options,
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "30",
            "start",
        )
    except (Unavailable, OSError, subprocess.TimeoutExpired) as exc:
        log = root / "server.log"
        detail = log.read_text()[-500:] if log.exists() else ""
        cluster.stop()
        raise Unavailable(f"PostgreSQL did not start: {exc} {detail}".strip()) from None
    return cluster
