"""Memory-hit p99 while another worker stores large objects: does disk work stall hits?

Why it exists: a node's workers share one disk tier whose index is an SQLite file. Storing
an object takes the index write lock (and evicts when the tier is full); if that ran on a
worker's event loop, every memory hit of that worker would wait behind it, and behind
any other process holding the lock. The target (issue "Edge core, second generation"):
the p99 of memory hits while another worker commits large objects to disk stays within 2x
of the p99 without that disk load.

What it does: a local nginx origin, a 2-worker `verge edge` with a small disk tier (so
that every stored object evicts another), then rounds of two wrk runs on a 1 KiB object
that every worker holds in memory: one alone, one while a filler client fetches distinct
large objects (20 MiB by default; each a miss that is streamed, written to disk,
committed and evicts) through one worker, continuously. It prints both p99s (median over
the rounds) and their ratio.

    .venv/bin/python bench/storage_p99.py [--rounds N] [--duration S] [--connections C]
                                          [--object-mib M] [--fill-rate R] [--disk-mib D]
                                          [--fill-through one|all] [--hold-index-ms MS]
                                          [--probe-rate R] [--tree DIR] [--json PATH]
                                          [--quick]

The fill rate is capped (2 objects/s, 40 MiB/s, by default): on a 2-core machine,
back-to-back fills take a whole core for streaming alone, and the hits' p99 then measures
how the CPUs are shared, not whether storage work blocks them (``--fill-rate 0`` does it
anyway). ``--hold-index-ms MS`` adds another process's long index transaction once a
second (BEGIN IMMEDIATE held MS ms, as a large purge or a slow checkpoint would): the
contention the index's busy timeout is for, and what a commit on the event loop waits out.

wrk's connections land on both workers (the kernel's SO_REUSEPORT hash picks), as real
clients' do, so its p99 covers hits on the filling worker and on the other one. And wrk
is a closed loop: a connection stuck behind a stalled event loop records one slow request
while the others record thousands of fast ones, so a stall barely moves its p99. So each
run also has an open-loop probe on each worker (``--probe-rate`` requests/s, each timed
from when it was due, as wrk2 does), reported per worker: the filling one and the other.
Its default of one request per 20 ms lets CPU jitter below that pass without a backlog,
while a stalled loop delays every request due during the stall.
The filler's and the probes' connections are kept only once /proc shows which worker
accepted them.
``--tree DIR`` runs the ``verge`` package of another source tree (say, the previous commit
from ``git archive HEAD | tar -x -C DIR``) for a before/after comparison on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadgen import WrkError, WrkResult, run_wrk
from servers import Server, ServerError, free_port, http_ok, port_open, start_origin, wait_until
from tools import BUSY_LOAD, ToolError, add_sbin_to_path, install_signal_handlers, require

PROJECT = Path(__file__).resolve().parents[1]
HOT_BYTES = 1024
WORKERS = 2
TARGET_RATIO = 2.0
WARMUP_S = 1.0
FILL_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """The benchmark cannot produce trustworthy numbers; the message says why."""


# --- options -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/storage_p99.py",
        description="p99 of memory hits alone and while another worker stores large objects.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alone/loaded pairs (median)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--object-mib", type=int, default=20, help="size of each filled object")
    parser.add_argument(
        "--fill-rate", type=float, default=2.0, help="objects/s per filler (0: back to back)"
    )
    parser.add_argument(
        "--hold-index-ms",
        type=int,
        default=0,
        help="another process holds the index write lock this long once a second",
    )
    parser.add_argument(
        "--disk-mib", type=int, default=200, help="disk tier size (small: commits evict)"
    )
    parser.add_argument(
        "--fill-through",
        choices=("one", "all"),
        default="one",
        help="fill through one worker (default) or through every worker at once",
    )
    parser.add_argument("--tree", type=Path, help="run the verge package of this source tree")
    parser.add_argument(
        "--probe-rate", type=float, default=50.0, help="open-loop probe requests/s per worker"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round of 3 s")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration = 1, 3.0
    if min(opts.rounds, opts.duration, opts.connections, opts.object_mib) < 1:
        parser.error("--rounds, --duration, --connections and --object-mib must be >= 1")
    if opts.fill_rate < 0 or opts.probe_rate <= 0 or not 0 <= opts.hold_index_ms < 1000:
        parser.error("--fill-rate >= 0, --probe-rate > 0 and --hold-index-ms in [0, 1000)")
    if opts.disk_mib < 2 * opts.object_mib:
        parser.error("--disk-mib must hold at least two objects")
    if opts.tree is not None and not (opts.tree / "verge" / "__init__.py").is_file():
        parser.error(f"--tree {opts.tree}: no verge package there")
    return opts


# --- servers ----------------------------------------------------------------------------------


def write_origin_files(files: Path, object_mib: int) -> None:
    """The hot object and the large one (every ?n=... query is a distinct cache key)."""
    files.mkdir(parents=True)
    (files / "hot.bin").write_bytes(os.urandom(HOT_BYTES))
    with (files / "big.bin").open("wb") as out:
        for _ in range(object_mib):
            out.write(os.urandom(1 << 20))


def verge_env(tree: Path | None) -> tuple[dict[str, str], Path]:
    """Environment and working directory that make ``python -m verge.cli`` import ``tree``."""
    env = dict(os.environ)
    if tree is None:
        return env, PROJECT
    tree = tree.resolve()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env, tree


def verge_package(tree: Path | None) -> str:
    """Where the edge's ``verge`` package is imported from (shown in the report)."""
    env, cwd = verge_env(tree)
    done = subprocess.run(
        [sys.executable, "-c", "import verge; print(verge.__file__)"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return str(Path(done.stdout.strip()).parent)


def start_edge(workdir: Path, origin_port: int, opts: argparse.Namespace) -> Server:
    """`verge edge --workers 2` with a small disk tier, in its own session."""
    workdir.mkdir(parents=True)
    config = workdir / "verge.yaml"
    config.write_text(f"cache:\n  disk_bytes: {opts.disk_mib}MiB\n")
    port, admin_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "verge.cli", "edge",
        "--listen", f"127.0.0.1:{port}",
        "--origin", f"http://127.0.0.1:{origin_port}",
        "--cache-dir", str(workdir / "cache"),
        "--admin", f"127.0.0.1:{admin_port}",
        "--admin-token", secrets.token_hex(16),
        "--workers", str(WORKERS),
        "--config", str(config),
    ]  # fmt: skip
    env, cwd = verge_env(opts.tree)
    log_path = workdir / "verge.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    server = Server(name="verge", process=process, log_path=log_path, port=port)
    try:
        wait_until(server, http_ok(f"http://127.0.0.1:{admin_port}/healthz"), 30.0)
        wait_until(server, port_open(port), 30.0)
    except ServerError:
        server.stop()
        raise
    return server


def worker_pids(server: Server) -> list[int]:
    """The edge's worker processes (children of its supervisor)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == server.process.pid:
                pids.append(int(entry))
    return sorted(pids)


def accepting_worker(server_port: int, client_port: int, pids: Sequence[int]) -> int | None:
    """The worker that holds the server side of the loopback connection from client_port."""
    inode = None
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)) == (
                server_port,
                client_port,
            ):
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


# --- the filler -------------------------------------------------------------------------------


def get(conn: http.client.HTTPConnection, path: str, buffer: bytearray) -> tuple[int, str, int]:
    """GET path on a kept-alive connection: status, Cache-Status, body length (body dropped)."""
    conn.request("GET", path)
    response = conn.getresponse()
    view, length = memoryview(buffer), 0
    while n := response.readinto(view):
        length += n
    return response.status, response.getheader("Cache-Status", ""), length


def connect_to_worker(port: int, pid: int, pids: Sequence[int]) -> http.client.HTTPConnection:
    """A keep-alive connection that the given worker accepted (new ones until it is so)."""
    buffer = bytearray(1 << 16)
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=FILL_TIMEOUT_S)
        get(conn, "/hot.bin", buffer)  # answered: accepted by a worker by now
        if accepting_worker(port, conn.sock.getsockname()[1], pids) == pid:
            return conn
        conn.close()
    raise BenchError(f"no connection to worker {pid} after 200 tries")


@dataclass
class Filler:
    """Fetches distinct large objects through one worker, back to back, until stopped."""

    port: int
    worker: int
    pids: list[int]
    object_bytes: int
    prefix: str
    rate: float  # objects per second; 0: back to back
    fills: int = 0
    errors: list[str] = field(default_factory=list)
    first: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        buffer = bytearray(1 << 20)
        try:
            conn = connect_to_worker(self.port, self.worker, self.pids)
            n = 0
            interval = 1.0 / self.rate if self.rate else 0.0
            due = time.monotonic()
            while not self.stop.wait(max(0.0, due - time.monotonic())):
                due = max(due + interval, time.monotonic())  # late: no catching up in a burst
                n += 1
                status, cache_status, length = get(conn, f"/big.bin?{self.prefix}{n}", buffer)
                if status != 200 or length != self.object_bytes or "stored" not in cache_status:
                    raise BenchError(f"fill {n}: {status}, {length} bytes, {cache_status!r}")
                self.fills += 1
                self.first.set()
            conn.close()
        except (BenchError, OSError, http.client.HTTPException) as exc:
            self.errors.append(str(exc))
            self.first.set()


@contextlib.contextmanager
def filling(
    port: int, fill_pids: Sequence[int], pids: list[int], opts: argparse.Namespace, tag: str
) -> Iterator[list[Filler]]:
    """Fillers running (one per worker in fill_pids) from the first completed fill on."""
    fillers = [
        Filler(port, pid, pids, opts.object_mib << 20, f"{tag}w{pid}n", opts.fill_rate)
        for pid in fill_pids
    ]
    threads = [threading.Thread(target=f.run, daemon=True) for f in fillers]
    for thread in threads:
        thread.start()
    try:
        for filler in fillers:
            if not filler.first.wait(FILL_TIMEOUT_S):
                raise BenchError("no large object was filled within a minute")
            if filler.errors:
                raise BenchError(f"filler failed: {filler.errors[0]}")
        yield fillers
    finally:
        for filler in fillers:
            filler.stop.set()
        for thread in threads:
            thread.join(FILL_TIMEOUT_S)
    errors = [e for f in fillers for e in f.errors]
    if errors:
        raise BenchError(f"filler failed: {errors[0]}")


# --- another process's long index transaction ---------------------------------------------------


@contextlib.contextmanager
def index_held(index: Path, hold_ms: int) -> Iterator[None]:
    """Hold the index write lock for hold_ms once a second (from this process: not the
    edge's) until the block ends."""
    if hold_ms <= 0:
        yield
        return
    stop = threading.Event()

    def hold() -> None:
        db = sqlite3.connect(index, isolation_level=None, timeout=30.0)
        try:
            while not stop.is_set():
                db.execute("BEGIN IMMEDIATE")
                stop.wait(hold_ms / 1000)
                db.execute("COMMIT")
                stop.wait(1.0 - hold_ms / 1000)
        finally:
            db.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --- measurement ------------------------------------------------------------------------------


@dataclass
class Probe:
    """Open-loop memory hits on one worker: one request every 1/rate s on one kept-alive
    connection, each timed from when it was due. A stalled loop then shows up in every
    request it delays — wrk's closed loop records one slow request per stalled connection
    and many fast ones from the others (coordinated omission)."""

    port: int
    worker: int
    pids: list[int]
    rate: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        buffer = bytearray(1 << 16)
        try:
            conn = connect_to_worker(self.port, self.worker, self.pids)
            due = time.monotonic()
            while not self.stop.wait(max(0.0, due - time.monotonic())):
                status, _, length = get(conn, "/hot.bin", buffer)
                self.latencies.append(time.monotonic() - due)
                if status != 200 or length != HOT_BYTES:
                    raise BenchError(f"probe: {status}, {length} bytes")
                due += 1.0 / self.rate
            conn.close()
        except (BenchError, OSError, http.client.HTTPException) as exc:
            self.errors.append(str(exc))

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@contextlib.contextmanager
def probing(port: int, pids: list[int], rate: float) -> Iterator[dict[int, Probe]]:
    """A probe on every worker while the block runs."""
    probes = {pid: Probe(port, pid, pids, rate) for pid in pids}
    threads = [threading.Thread(target=p.run, daemon=True) for p in probes.values()]
    for thread in threads:
        thread.start()
    try:
        yield probes
    finally:
        for probe in probes.values():
            probe.stop.set()
        for thread in threads:
            thread.join(FILL_TIMEOUT_S)
    errors = [e for p in probes.values() for e in p.errors]
    if errors or not all(p.latencies for p in probes.values()):
        raise BenchError(f"probe failed: {errors[:1] or 'no answers'}")


@dataclass
class Run:
    """One wrk run and the probes' view of the same seconds."""

    wrk: WrkResult
    probe_p99_ms: dict[str, float]  # "filling" / "other" worker
    probe_max_ms: dict[str, float]


@dataclass
class Round:
    alone: Run
    loaded: Run
    fills: int  # large objects stored while the loaded wrk ran


def wrk(url: str, opts: argparse.Namespace) -> WrkResult:
    result = run_wrk(url, duration_s=opts.duration, connections=opts.connections, threads=1,
                     cpus=None)  # fmt: skip
    if result.errors:
        raise BenchError(f"wrk saw {result.errors} socket errors or non-2xx answers")
    return result


def measured_run(edge: Server, pids: list[int], filling_pid: int, opts: argparse.Namespace) -> Run:
    """wrk on the hot object, probes on both workers meanwhile."""
    with probing(edge.port, pids, opts.probe_rate) as probes:
        result = wrk(f"{edge.base_url}/hot.bin", opts)
    roles = {"filling": probes[filling_pid], "other": next(
        p for pid, p in probes.items() if pid != filling_pid)}  # fmt: skip
    return Run(
        result,
        {role: probe.percentile_ms(99) for role, probe in roles.items()},
        {role: probe.percentile_ms(100) for role, probe in roles.items()},
    )


def warm(edge: Server, opts: argparse.Namespace) -> None:
    """The hot object in every worker's memory tier (a short wrk run reaches both)."""
    buffer = bytearray(1 << 16)
    conn = http.client.HTTPConnection("127.0.0.1", edge.port)
    for _ in range(20):
        status, cache_status, length = get(conn, "/hot.bin", buffer)
        if status != 200 or length != HOT_BYTES:
            raise BenchError(f"hot object: {status}, {length} bytes")
        if "hit" in cache_status:
            break
    conn.close()
    run_wrk(f"{edge.base_url}/hot.bin", duration_s=WARMUP_S, connections=opts.connections,
            threads=1, cpus=None)  # fmt: skip


def measure(edge: Server, pids: list[int], opts: argparse.Namespace, index: Path) -> list[Round]:
    fill_pids = pids[-1:] if opts.fill_through == "one" else pids
    rounds = []
    for index_ in range(opts.rounds):
        step = f"round {index_ + 1}/{opts.rounds}"
        say(f"{step}: wrk alone …")
        alone = measured_run(edge, pids, pids[-1], opts)
        say(f"{step}: wrk while filling through worker(s) {fill_pids} …")
        with filling(edge.port, fill_pids, pids, opts, f"r{index_}") as fillers:
            before = sum(f.fills for f in fillers)
            with index_held(index, opts.hold_index_ms):
                loaded = measured_run(edge, pids, pids[-1], opts)
            fills = sum(f.fills for f in fillers) - before
        rounds.append(Round(alone, loaded, fills))
        say(
            f"  wrk p99 {alone.wrk.p99_ms:.2f} -> {loaded.wrk.p99_ms:.2f} ms; probe p99 other "
            f"worker {alone.probe_p99_ms['other']:.2f} -> {loaded.probe_p99_ms['other']:.2f} ms, "
            f"filling worker {alone.probe_p99_ms['filling']:.2f} -> "
            f"{loaded.probe_p99_ms['filling']:.2f} ms ({fills} objects stored)"
        )
    return rounds


def summarise(rounds: list[Round], opts: argparse.Namespace, package: str) -> dict:
    def median(pick) -> float:
        return statistics.median(pick(r) for r in rounds)

    rows = {
        "wrk p99 (all workers)": (
            median(lambda r: r.alone.wrk.p99_ms), median(lambda r: r.loaded.wrk.p99_ms)),
        "probe p99, other worker": (
            median(lambda r: r.alone.probe_p99_ms["other"]),
            median(lambda r: r.loaded.probe_p99_ms["other"])),
        "probe p99, filling worker": (
            median(lambda r: r.alone.probe_p99_ms["filling"]),
            median(lambda r: r.loaded.probe_p99_ms["filling"])),
        "probe max, filling worker": (
            median(lambda r: r.alone.probe_max_ms["filling"]),
            median(lambda r: r.loaded.probe_max_ms["filling"])),
    }  # fmt: skip
    warnings = []
    load = os.getloadavg()[0]
    if load > BUSY_LOAD + WORKERS + 1:
        warnings.append(f"1-minute load average {load:.2f}: other work shared the CPUs")
    return {
        "verge_package": package,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "rows_ms": {
            name: {"alone": a, "loaded": b, "ratio": b / a} for name, (a, b) in rows.items()
        },
        "p99_alone_ms": rows["wrk p99 (all workers)"][0],
        "p99_loaded_ms": rows["wrk p99 (all workers)"][1],
        "target_ratio": TARGET_RATIO,
        "stored_objects_per_s": median(lambda r: r.fills / r.loaded.wrk.duration_s),
        "rounds": [asdict(r) for r in rounds],
        "warnings": warnings,
    }


def report(summary: dict) -> None:
    opts = summary["options"]
    held = opts["hold_index_ms"]
    print()
    print(f"verge package: {summary['verge_package']}")
    print(
        f"memory hits of a {HOT_BYTES} B object: wrk -t1 -c{opts['connections']} "
        f"-d{opts['duration']:g}s, and an open-loop probe of {opts['probe_rate']:g} req/s on each "
        f"worker; median of {opts['rounds']} round(s); {WORKERS} workers, disk tier "
        f"{opts['disk_mib']} MiB"
    )
    print(
        f"loaded: {opts['object_mib']} MiB objects stored through {opts['fill_through']} "
        f"worker(s), {summary['stored_objects_per_s']:.1f}/s"
        + (f"; another process holds the index write lock {held} ms every second" if held else "")
    )
    print(f"  {'':28} {'alone':>9} {'loaded':>9} {'ratio':>7}")
    for name, row in summary["rows_ms"].items():
        flag = "" if row["ratio"] <= TARGET_RATIO or "max" in name else "  > target"
        print(
            f"  {name:28} {row['alone']:7.2f}ms {row['loaded']:7.2f}ms {row['ratio']:6.2f}x{flag}"
        )
    print(f"  (target: p99 loaded within {TARGET_RATIO:g}x of alone)")
    for warning in summary["warnings"]:
        print(f"  warning: {warning}")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the run ----------------------------------------------------------------------------------


def run(opts: argparse.Namespace) -> dict:
    package = verge_package(opts.tree)
    tmp = Path(tempfile.mkdtemp(prefix="verge-storage-p99-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        say(f"writing origin files ({opts.object_mib} MiB object) …")
        write_origin_files(tmp / "files", opts.object_mib)
        origin = start_origin(tmp / "origin", tmp / "files")
        stack.callback(origin.stop)
        say(f"starting verge edge ({package}) …")
        edge = start_edge(tmp / "verge", origin.port, opts)
        stack.callback(edge.stop)
        pids = worker_pids(edge)
        if len(pids) != WORKERS:
            raise BenchError(f"expected {WORKERS} workers, found {pids}")
        warm(edge, opts)
        rounds = measure(edge, pids, opts, tmp / "verge" / "cache" / "index.db")
        if not edge.alive():
            raise BenchError(f"verge died:\n{edge.log_tail()}")
        return summarise(rounds, opts, package)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    add_sbin_to_path()
    try:
        require({"wrk": "wrk", "nginx": "nginx-light"}, say=say)
    except ToolError as error:
        say(f"missing tools: {error}; run `bash bench/setup.sh`")
        return 2
    install_signal_handlers()
    try:
        summary = run(opts)
    except (BenchError, ServerError, WrkError) as error:
        say(f"benchmark failed: {error}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; all servers stopped")
        return 130
    report(summary)
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"results written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
