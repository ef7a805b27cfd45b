"""Run the public HTTP cache test suite (cache-tests.fyi) against Verge, nginx, Varnish and ATS.

Why: our caching conformance is judged with Mark Nottingham's suite (npm package
``http-cache-tests``), comparing us with the reverse proxies it publishes results for.
This script makes that comparison reproducible on one machine: it starts the suite's own
origin server, puts each cache in front of it with the configuration the suite itself uses
for that product (its docker/ folder), runs the suite's CLI against each, and prints the
outcomes side by side, classified the way cache-tests.fyi shows them (required failures,
optional failures, yes/no checks, setup and dependency failures).

The suite is third-party code and never enters this repository: ``run.sh`` installs it
from npm into a directory outside the tree (default ``/tmp/cache-tests``), and this script
reads it from there. Caches whose binary is missing are skipped with a note.

    bash bench/conformance/run.sh                    # install what is missing, run all
    .venv/bin/python bench/conformance/run.py --only verge nginx
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUITE_PACKAGE = "http-cache-tests"
SUITE_VERSION = "0.4.5"
DEFAULT_SUITE_ROOT = Path("/tmp/cache-tests")
CONTENDERS = ("verge", "nginx", "varnish", "ats")
READY_TIMEOUT_S = 30.0
SUITE_TIMEOUT_S = 600.0
PASSING = ("pass", "yes")


class RunError(RuntimeError):
    """A server or the suite could not be started."""


# ------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A server running in its own session, so stopping it stops its children too."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM the session, SIGKILL it after a grace period; then reap stray children."""
        self._signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.popen.wait(timeout=5.0)
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


def spawn(
    name: str,
    argv: list[str],
    log: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    out = log.open("wb")
    popen = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    out.close()
    return Proc(name, popen, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError):
        return None


def wait_ready(proc: Proc, ready: Callable[[], bool], timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RunError(f"{proc.name} exited at start:\n{proc.tail()}")
        if ready():
            return
        time.sleep(0.2)
    raise RunError(f"{proc.name} not ready after {timeout_s:.0f}s:\n{proc.tail()}")


def proxies_to_origin(port: int) -> Callable[[], bool]:
    """Ready once the proxy forwards to the suite's origin (which 404s an unknown state id)."""
    return lambda: http_status(f"http://127.0.0.1:{port}/state/ready-check") == 404


# --------------------------------------------------------------------------------- servers


@dataclass
class Setup:
    suite: Path  # node_modules/http-cache-tests
    work: Path  # per-run scratch directory (configs, caches, logs)
    origin_port: int
    verge_bin: Path


def start_origin(s: Setup) -> Proc:
    env = {
        "npm_package_config_protocol": "http",
        "npm_config_port": str(s.origin_port),
        "npm_config_pidfile": str(s.work / "origin.pid"),
    }
    proc = spawn("origin", ["node", "server/server.mjs"], s.work / "origin.log", s.suite, env)
    wait_ready(proc, lambda: http_status(f"http://127.0.0.1:{s.origin_port}/state/x") == 404)
    return proc


def start_verge(s: Setup, port: int) -> Proc:
    argv = [
        str(s.verge_bin),
        "edge",
        "--listen",
        f"127.0.0.1:{port}",
        "--origin",
        f"http://127.0.0.1:{s.origin_port}",
        "--cache-dir",
        str(s.work / "verge-cache"),
        "--admin",
        f"127.0.0.1:{free_port()}",
        "--admin-token",
        secrets.token_hex(8),
        "--workers",
        "1",
    ]
    return spawn("verge", argv, s.work / "verge.log")


def nginx_conf(s: Setup, port: int) -> str:
    """The suite's docker/nginx config (proxy_cache + proxy_cache_revalidate), made standalone."""
    d = s.work / "nginx"
    temp = "\n".join(
        f"  {kind}_temp_path {d}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 2048; }}
http {{
  access_log off;
{temp}
  proxy_cache_path {d}/cache levels=1:2 keys_zone=my-cache:8m max_size=1000m inactive=600m;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{s.origin_port};
      proxy_cache my-cache;
      proxy_cache_revalidate on;
    }}
  }}
}}
"""


def start_nginx(s: Setup, port: int) -> Proc:
    d = s.work / "nginx"
    (d / "tmp").mkdir(parents=True)
    (d / "nginx.conf").write_text(nginx_conf(s, port))
    argv = [tool("nginx"), "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"]
    return spawn("nginx", argv, d / "stdout.log")


def start_varnish(s: Setup, port: int) -> Proc:
    """Built-in VCL and the runtime parameters of the suite's docker/serve.sh."""
    d = s.work / "varnish"
    d.mkdir()
    argv = [
        tool("varnishd"),
        "-F",
        "-n",
        str(d / "n"),
        "-a",
        f"127.0.0.1:{port}",
        "-b",
        f"127.0.0.1:{s.origin_port}",
        "-p",
        "default_ttl=0",
        "-p",
        "default_grace=0",
        "-p",
        "default_keep=3600",
        "-s",
        "malloc,64M",
    ]
    return spawn("varnish", argv, d / "stdout.log")


def start_ats(s: Setup, port: int) -> Proc:
    """Apache Traffic Server with the suite's docker/trafficserver records.config, in a runroot."""
    d = s.work / "ats"
    etc = d / "etc"
    shutil.copytree("/etc/trafficserver", etc)
    for sub in ("cache", "run", "log", "var"):
        (d / sub).mkdir()
    records = (s.suite / "docker/trafficserver/records.config").read_text()
    records = records.replace("server_ports STRING 8003", f"server_ports STRING 127.0.0.1:{port}")
    if os.geteuid() == 0:  # ATS refuses to keep root unless told to
        records = records.replace("admin.user_id STRING trafficserver", "admin.user_id STRING #-1")
    (etc / "records.config").write_text(records)
    (etc / "storage.config").write_text(f"{d / 'cache'} 256M\n")
    (etc / "remap.config").write_text(
        "".join(
            f"map http://{host}:{port}/ http://127.0.0.1:{s.origin_port}/\n"
            for host in ("127.0.0.1", "localhost")
        )
    )
    layout = {
        "prefix": d,
        "exec_prefix": "/usr",
        "bindir": "/usr/bin",
        "sbindir": "/usr/sbin",
        "sysconfdir": etc,
        "datadir": d / "cache",
        "includedir": "/usr/include",
        "libdir": "/usr/lib/trafficserver",
        "libexecdir": "/usr/lib/trafficserver/modules",
        "localstatedir": d / "var",
        "runtimedir": d / "run",
        "logdir": d / "log",
        "cachedir": d / "cache",
    }
    (d / "runroot.yaml").write_text("".join(f"{k}: {v}\n" for k, v in layout.items()))
    argv = [tool("traffic_server"), f"--run-root={d / 'runroot.yaml'}"]
    return spawn("ats", argv, d / "stdout.log", cwd=d)


STARTERS: dict[str, tuple[str, Callable[[Setup, int], Proc]]] = {
    "verge": ("", start_verge),
    "nginx": ("nginx", start_nginx),
    "varnish": ("varnishd", start_varnish),
    "ats": ("traffic_server", start_ats),
}


def tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise RunError(f"{name} is not installed")
    return path


def version_of(name: str, s: Setup) -> str:
    if name == "verge":
        return "verge " + first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    argv = {
        "nginx": [tool("nginx"), "-v"],
        "varnish": [tool("varnishd"), "-V"],
        "ats": [tool("traffic_server"), "-V"],
    }[name]
    return first_line(argv)


def first_line(argv: list[str]) -> str:
    """The first meaningful line a command prints (stdout or stderr), "" on failure."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        lines = (done.stdout + done.stderr).strip().splitlines()
        return next((ln for ln in lines if ln and "using root" not in ln), "")
    return ""


# ----------------------------------------------------------------------------------- suite


def run_suite(s: Setup, base_url: str, out: Path) -> None:
    """The suite's CLI (``npm run cli --base=URL``) with its results JSON written to ``out``."""
    env = {"npm_config_base": base_url, "npm_package_config_id": "", "npm_config_id": ""}
    with out.open("wb") as fh:
        done = subprocess.run(
            ["node", "--no-warnings", "cli.mjs"],
            cwd=s.suite,
            stdout=fh,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            timeout=SUITE_TIMEOUT_S,
            check=False,
        )
    try:
        json.loads(out.read_text())
    except ValueError as err:
        raise RunError(
            f"suite produced no JSON for {base_url}: {done.stderr.decode()[-2000:]}"
        ) from err


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def test_contender(name: str, s: Setup, results: Path) -> str:
    """Start one cache in front of the origin, run the suite through it, stop it."""
    port = free_port()
    out = results / f"{name}.json"
    with running(STARTERS[name][1](s, port)) as proc:
        try:
            wait_ready(proc, proxies_to_origin(port))
            started = time.monotonic()
            run_suite(s, f"http://127.0.0.1:{port}", out)
            print(f"  {name}: suite ran in {time.monotonic() - started:.0f}s", flush=True)
        finally:
            shutil.copyfile(proc.log, results / f"{name}.log")
    warn_on_transport_errors(name, out)
    return version_of(name, s)


def warn_on_transport_errors(name: str, out: Path) -> None:
    """Connection errors mean the server died or hung, not that it judged a test wrongly."""
    raw = json.loads(out.read_text())
    broken = [k for k, v in raw.items() if v is not True and v[0] == "FetchError"]
    if broken:
        print(
            f"  WARNING {name}: {len(broken)} tests failed on connection errors "
            f"(e.g. {broken[0]}: {raw[broken[0]][1]}); see {name}.log",
            flush=True,
        )


# ---------------------------------------------------------------------------------- report


def classify(s: Setup, results: Path, names: Sequence[str]) -> list[dict]:
    argv = ["node", str(HERE / "classify.mjs"), str(s.suite)]
    argv += [f"{n}={results / f'{n}.json'}" for n in names]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    rows = json.loads(done.stdout)
    (results / "classified.json").write_text(json.dumps(rows, indent=1))
    return rows


COLUMNS = (
    ("passed", PASSING),
    ("required fail", ("fail",)),
    ("optional fail", ("optional_fail",)),
    ("check: no", ("no",)),
    ("setup fail", ("setup_fail",)),
    ("dependency fail", ("dependency_fail",)),
    ("other", ("harness_fail", "retry", "untested")),
)


def summary(rows: list[dict], names: Sequence[str]) -> str:
    counts = {n: Counter(r["results"][n]["outcome"] for r in rows) for n in names}
    width = max(len(c[0]) for c in COLUMNS) + 2
    lines = [f"{'':{width}}" + "".join(f"{n:>10}" for n in names)]
    for label, outcomes in COLUMNS:
        cells = "".join(f"{sum(counts[n][o] for o in outcomes):>10}" for n in names)
        lines.append(f"{label:{width}}{cells}")
    lines.append(f"{'tests':{width}}" + "".join(f"{len(rows):>10}" for _ in names))
    raw = {n: sum(r["results"][n]["raw_pass"] for r in rows) for n in names}
    lines.append(f"{'raw true':{width}}" + "".join(f"{raw[n]:>10}" for n in names))
    lines.append(
        "passed = pass + 'yes' on checks, a test counting only when the tests it depends on\n"
        "pass (as cache-tests.fyi shows it); raw true = the suite's own true, ignoring that"
    )
    return "\n".join(lines)


def verge_behind(rows: list[dict], names: Sequence[str]) -> str:
    """Tests Verge does not pass that at least one other cache passes, by suite section."""
    if "verge" not in names or len(names) < 2:
        return ""
    lines = ["Verge does not pass, another cache does:"]
    section = None
    for r in rows:
        mine = r["results"]["verge"]
        others = [n for n in names if n != "verge" and r["results"][n]["outcome"] in PASSING]
        if mine["outcome"] in PASSING or not others:
            continue
        if r["suite_name"] != section:
            section = r["suite_name"]
            lines.append(f"  [{section}]")
        lines.append(
            f"    {r['id']} ({r['kind']}; verge {mine['outcome']}; passed by "
            f"{', '.join(others)}): {mine['detail']}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument(
        "--suite-root",
        type=Path,
        default=DEFAULT_SUITE_ROOT,
        help="where run.sh installed the npm package (node_modules/ under it)",
    )
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--verge-bin", type=Path, default=Path(sys.executable).parent / "verge")
    p.add_argument("--keep-work", action="store_true", help="keep configs and logs")
    return p.parse_args(argv)


def available(names: Sequence[str], s: Setup) -> list[str]:
    keep = []
    for name in names:
        binary = STARTERS[name][0]
        if name == "verge" and not s.verge_bin.exists():
            print(f"skip verge: {s.verge_bin} not found (make install)")
        elif binary and shutil.which(binary, path=os.environ["PATH"] + ":/usr/sbin:/sbin") is None:
            print(f"skip {name}: {binary} not installed (bench/conformance/run.sh installs it)")
        else:
            keep.append(name)
    return keep


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    suite = opts.suite_root / "node_modules" / SUITE_PACKAGE
    if not (suite / "cli.mjs").exists():
        print(
            f"missing: the test suite ({SUITE_PACKAGE} from npm) at {suite}; "
            "run bench/conformance/run.sh, which installs it there"
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="verge-conformance-"))
    work.chmod(0o755)  # nginx, Varnish and ATS workers drop root and must reach their dirs
    s = Setup(suite=suite, work=work, origin_port=free_port(), verge_bin=opts.verge_bin)
    names = available(opts.only, s)
    if not names:
        return 2
    opts.results.mkdir(parents=True, exist_ok=True)
    suite_version = json.loads((suite / "package.json").read_text())["version"]
    meta = {"suite": f"{SUITE_PACKAGE}@{suite_version}", "versions": {}, "started": time.time()}
    print(f"{meta['suite']}: origin on 127.0.0.1:{s.origin_port}, work dir {work}", flush=True)
    try:
        with running(start_origin(s)):
            for name in names:
                meta["versions"][name] = test_contender(name, s, opts.results)
    finally:
        if not opts.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    (opts.results / "meta.json").write_text(json.dumps(meta, indent=1))
    rows = classify(s, opts.results, names)
    report = "\n\n".join(filter(None, [summary(rows, names), verge_behind(rows, names)]))
    (opts.results / "summary.txt").write_text(report + "\n")
    print(f"\n{report}\n\nresults: {opts.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
