"""`verge up`: the whole platform on one machine — control plane, two edges, a sample origin.

Each edge listens on its own loopback address (127.0.0.2, 127.0.0.3, ...) and the same
port, as separate hosts would. The demo service (hostname ``demo.verge.test``) is created
through the control plane's API like any other and is every edge's default service, so
``curl EDGE_URL/path`` works without a Host header; it sends ``/live/`` and ``/vod/`` to the
stream server. When everything is ready, the state directory gets ``up.json`` (written
atomically) describing the running platform for scripts, tests and ``verge vod add``.

The children run in their own process groups, so a Ctrl-C reaches ``verge up`` alone, which
then stops them in order. The control plane is restarted (with back-off) when it exits: the
edges keep serving from their last config meanwhile, which is the point of their offline
autonomy. An edge that exits is reported and routed around; anything else ends the demo.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from verge.files import write_atomic

DEFAULT_STATE_DIR = Path(".verge-up")
UP_JSON = "up.json"
STREAM_CONFIG = "stream.yaml"
DEMO_SERVICE = "demo"
DEMO_HOSTNAME = "demo.verge.test"
DEMO_ZONE = "verge.test"
# The demo's client networks: they only appear inside DNS queries as client subnets (ECS).
DEMO_REGION_CIDRS = ["10.1.0.0/16", "10.2.0.0/16"]
DEMO_RULES = [
    {"path": "/static/", "kind": "static"},
    {"path": "/api/", "kind": "api"},
    {"path": "/dynamic/", "kind": "dynamic", "micro_cache": 1},
]
STREAM_APP = "live"
STREAM_PATHS = (f"/{STREAM_APP}/", "/vod/")
"""What the demo service sends to the stream server: live streams, VOD and recordings."""
CONTROL = "control plane"
VERGE = [sys.executable, "-m", "verge.cli"]
OUTPUT_LINES = 200
"""Lines of a child's output kept for error messages."""


class UpError(Exception):
    """A part of the platform did not start; the message says which and why."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP: stop everything, like Ctrl-C (a BaseException, as KeyboardInterrupt)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    args: list[str] = field(default_factory=list)
    marker: str = ""
    secret_env: dict[str, str] = field(default_factory=dict)  # tokens: never in argv (ps)
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES))
    ready: threading.Event = field(default_factory=threading.Event)
    ready_line: str = ""

    def pump(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if self.marker in line and not self.ready.is_set():
                self.ready_line = line.strip()
                self.ready.set()
        self.ready.set()

    def tail(self, lines: int = 30) -> str:
        return "".join(list(self.output)[-lines:])


def launch(name: str, args: list[str], marker: str,
           secret_env: dict[str, str] | None = None) -> Child:
    """Start a child in its own process group (Ctrl-C is for `verge up`, which stops it), its
    output collected by a thread; `ready` is set when `marker` appears (or the output ends).
    Tokens go in ``secret_env``: the child's environment, where `ps` does not show them."""
    secret_env = dict(secret_env or {})
    proc = subprocess.Popen(
        args,
        env={**os.environ, **secret_env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,
    )
    child = Child(name, proc, list(args), marker, secret_env=secret_env)
    threading.Thread(target=child.pump, daemon=True, name=f"output of {name}").start()
    return child


def stop_children(children: list[Child], timeout: float = 10.0) -> None:
    """SIGTERM to every child (last started first), SIGKILL to what is left after `timeout`,
    then to anything left in their process groups (an edge's workers, a stream's ffmpeg)."""
    for child in reversed(children):
        if child.proc.poll() is None:
            child.proc.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)


@dataclass
class Backoff:
    """Delays before restarting a child that keeps exiting: 1 s, 2 s, 4 s ... up to `cap`; a
    child that ran `steady` seconds before exiting starts again from `first`."""

    first: float = 1.0
    cap: float = 30.0
    steady: float = 60.0
    current: float = 0.0

    def next(self, ran_for: float) -> float:
        if ran_for >= self.steady or not self.current:
            self.current = self.first
        else:
            self.current = min(self.current * 2, self.cap)
        return self.current


class Keeper:
    """Keeps one child running: reports its exit, restarts it after a back-off, and reports
    when the new one is ready. `check()` is called periodically by the supervisor."""

    def __init__(
        self,
        child: Child,
        *,
        while_down: str,
        backoff: Backoff | None = None,
        on_ready: Callable[[Child], None] | None = None,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.child = child
        self.while_down = while_down
        self.backoff = backoff or Backoff()
        self.on_ready = on_ready
        self.say = say or _say
        self.clock = clock
        self.started = clock()
        self.restart_at: float | None = None
        self.announced = True  # the first start is reported by the banner

    def check(self) -> Child:
        """Advance: note an exit, restart when due, announce readiness; the current child."""
        now = self.clock()
        if self.restart_at is None:
            code = self.child.proc.poll()
            if code is None:
                self._announce_if_ready()
            else:
                self._exited(code, now)
        if self.restart_at is not None and now >= self.restart_at:
            self._restart(now)
        return self.child

    def _exited(self, code: int, now: float) -> None:
        delay = self.backoff.next(now - self.started)
        self.child.ready.wait(1)  # the output thread has read the last lines
        if not self.announced:  # died before it was ready: show why
            self.say(_indent(self.child.tail(5)))
        self.say(
            f"{self.child.name} exited (code {code}); {self.while_down}; "
            f"restarting it in {delay:g} s"
        )
        self.restart_at = now + delay

    def _restart(self, now: float) -> None:
        old = self.child
        self.child = launch(old.name, old.args, old.marker, old.secret_env)
        self.started, self.restart_at, self.announced = now, None, False

    def _announce_if_ready(self) -> None:
        if self.announced or not self.child.ready_line:
            return
        self.announced = True
        if self.on_ready is not None:  # first, so whoever reads the line finds up.json current
            self.on_ready(self.child)
        self.say(f"{self.child.name} is back (pid {self.child.proc.pid})")


@dataclass
class UpOptions:
    state_dir: Path
    control_port: int = 7000
    edge_port: int = 8080
    origin_port: int = 9000
    edges: int = 2
    workers: int = 1
    https_port: int = 8443
    dns_port: int = 5353
    router_port: int = 8053
    rtmp_port: int = 1935
    stream_port: int = 8090
    geoip: Path | None = None
    """A GeoIP database: the router's geoip, and its edges' (services' deny.countries)."""


class Platform:
    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.children: list[Child] = []
        self.admin_token = os.environ.get(
            "VERGE_ADMIN_TOKEN"
        ) or "vrg_admin_" + secrets.token_urlsafe(24)
        self.stream_key = secrets.token_urlsafe(12)
        self.control: Keeper | None = None
        self.up: dict = {}

    # ----- processes --------------------------------------------------------------------------
    def spawn(self, name: str, args: list[str], marker: str, timeout: float = 60.0,
              secret_env: dict[str, str] | None = None) -> Child:
        child = launch(name, args, marker, secret_env)
        self.children.append(child)
        if not child.ready.wait(timeout) or child.proc.poll() is not None or not child.ready_line:
            raise UpError(f"{name} did not start:\n" + child.tail())
        return child

    def supervise(self, stop: threading.Event) -> str:
        """Run until `stop` is set (""), or until a part the demo cannot do without exits (the
        reason). The control plane is restarted when it exits; an edge that exits is reported
        and the rest go on (the router sends its users elsewhere, as in production)."""
        reported: set[str] = set()
        while not stop.is_set():
            self._keep_control()
            for child in self.children:
                code = child.proc.poll()
                if code is None or child.name == CONTROL or child.name in reported:
                    continue
                if not child.name.startswith("edge-"):
                    child.ready.wait(1)
                    return f"the {child.name} exited (code {code})\n{_indent(child.tail(10))}"
                reported.add(child.name)
                _say(f"{child.name} exited (code {code}); the router routes around it")
            stop.wait(0.5)
        return ""

    def _keep_control(self) -> None:
        if self.control is None:
            return
        current = self.control.check()
        self.children = [current if c.name == CONTROL else c for c in self.children]

    def _control_back(self, child: Child) -> None:
        """A restarted control plane: up.json names its pid."""
        self.up["control_pid"] = child.proc.pid
        self._write_up_json()

    def stop(self) -> None:
        stop_children(self.children)

    # ----- start-up -----------------------------------------------------------------------------
    def start(self) -> dict:
        opts = self.options
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        origin_url = f"http://127.0.0.1:{opts.origin_port}"
        origin = self.spawn(
            "origin",
            [*VERGE, "demo-origin", "--listen", f"127.0.0.1:{opts.origin_port}"],
            '"listening"',
        )
        stream_url, rtmp_url = self._start_stream()
        control = self.spawn(
            CONTROL,
            [
                *VERGE,
                "control",
                "--listen",
                f"127.0.0.1:{opts.control_port}",
                "--db",
                f"sqlite:///{(opts.state_dir / 'control.db').resolve()}",
            ],
            "verge control ready",
            secret_env={"VERGE_ADMIN_TOKEN": self.admin_token},
        )
        self.control = Keeper(
            control,
            on_ready=self._control_back,
            while_down="edges keep serving from their last config",
        )
        control_url = control.ready_line.split("ready:", 1)[1].split()[0].rstrip("/")
        api = httpx.Client(
            base_url=control_url,
            timeout=10,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        self._ensure_demo_service(api, origin_url, stream_url)
        join_token = self._join_token(api)
        self.ca, self.cert = self._dev_certificate()
        edges = [self._start_edge(i, control_url, join_token) for i in range(opts.edges)]
        self._wait_edges_configured(api, edges)
        dns, router_url = self._start_router(api, control_url, edges)
        self.up = {
            "control": control_url,
            "control_pid": control.proc.pid,
            "admin_token": self.admin_token,
            "edges": edges,
            "origin": origin_url,
            "ca": str(Path(self.ca.cert_file).resolve()),
            "origin_pid": origin.proc.pid,
            "service": DEMO_SERVICE,
            "hostname": DEMO_HOSTNAME,
            "join_token": join_token,
            "dns": dns,
            "zone": DEMO_ZONE,
            "router": router_url,
            "rtmp": rtmp_url,
            "stream_key": self.stream_key,
            "stream": stream_url,
            "stream_config": str((opts.state_dir / STREAM_CONFIG).resolve()),
            "watch": f"{edges[0]['url']}/{STREAM_APP}",
            "vod": f"{edges[0]['url']}/vod",
        }
        self._write_up_json()
        return self.up

    def _write_up_json(self) -> None:
        # up.json holds the admin token: private, like the edges' credentials
        write_atomic(
            self.options.state_dir / UP_JSON, (json.dumps(self.up, indent=2) + "\n").encode()
        )

    def _start_stream(self) -> tuple[str, str]:
        """The stream server, with one publish key for the demo; its HTTP side is the demo
        service's origin for /live/ and /vod/ (`verge vod add` finds its config in up.json)."""
        opts = self.options
        path = opts.state_dir / STREAM_CONFIG
        path.write_text(
            json.dumps(
                {
                    "stream": {
                        "apps": [{"name": STREAM_APP, "keys": {"*": self.stream_key}}],
                        "data_dir": str((opts.state_dir / "stream-data").resolve()),
                    }
                },
                indent=2,
            )
            + "\n"
        )
        self.spawn(
            "stream server",
            [
                *VERGE,
                "stream",
                "--rtmp",
                f"127.0.0.1:{opts.rtmp_port}",
                "--http",
                f"127.0.0.1:{opts.stream_port}",
                "--config",
                str(path),
            ],
            "verge stream ready",
        )
        return (
            f"http://127.0.0.1:{opts.stream_port}",
            f"rtmp://127.0.0.1:{opts.rtmp_port}/{STREAM_APP}",
        )

    def _ensure_demo_service(self, api: httpx.Client, origin_url: str, stream_url: str) -> None:
        """The demo service, created through the API; one kept from an earlier run (same state
        directory) gets the stream rules it lacks or that point at another port."""
        existing = api.get(f"/api/v1/services/{DEMO_SERVICE}")
        if existing.status_code == 404:
            created = api.post(
                "/api/v1/services",
                json={
                    "name": DEMO_SERVICE,
                    "hosts": [DEMO_HOSTNAME],
                    "default": True,
                    "origins": [{"url": origin_url}],
                    "rules": demo_rules(stream_url),
                    "health_check": {"path": "/", "interval": 2},
                },
            )
            _check(created, "creating the demo service")
            return
        _check(existing, "reading the demo service")
        service = existing.json()
        rules = with_stream_rules(service.get("rules") or [], stream_url)
        if rules != service.get("rules"):
            updated = api.put(
                f"/api/v1/services/{DEMO_SERVICE}",
                json={**service, "rules": rules},
                headers={"If-Match": existing.headers.get("etag", "*")},
            )
            _check(updated, "updating the demo service's stream rules")

    def _join_token(self, api: httpx.Client) -> str:
        token = api.post("/api/v1/tokens", json={"name": "verge-up-join", "role": "join"})
        _check(token, "creating a join token")
        return token.json()["token"]

    def _dev_certificate(self):
        """A local CA (`verge cert dev`'s) and one certificate for the demo name and every edge."""
        from verge.certs import ensure_ca, issue_cert

        out = self.options.state_dir / "certs"
        ca = ensure_ca(out)
        names = [
            DEMO_HOSTNAME,
            "localhost",
            *(f"127.0.0.{i + 2}" for i in range(self.options.edges)),
        ]
        cert = issue_cert(ca, names, out / "edges.pem", out / "edges-key.pem")
        return ca, cert

    def _start_edge(self, index: int, control_url: str, join_token: str) -> dict:
        opts = self.options
        host = f"127.0.0.{index + 2}"
        name = f"edge-{index + 1}"
        admin_token = secrets.token_urlsafe(16)
        edge = self.spawn(
            name,
            [
                *VERGE,
                "edge",
                "--control",
                control_url,
                "--listen",
                f"{host}:{opts.edge_port}",
                "--admin",
                f"{host}:{opts.edge_port + 1}",
                "--cache-dir",
                str((opts.state_dir / name).resolve()),
                "--workers",
                str(opts.workers),
                "--name",
                name,
                "--region",
                f"region-{index + 1}",
                "--https",
                f"{host}:{opts.https_port}",
                "--tls-cert",
                str(self.cert.cert_file),
                "--tls-key",
                str(self.cert.key_file),
                *(["--geoip", str(opts.geoip.resolve())] if opts.geoip else []),
            ],
            "verge edge ready",
            secret_env={"VERGE_JOIN_TOKEN": join_token, "VERGE_ADMIN_TOKEN": admin_token},
        )
        ports = edge.ready_line.split("http://")
        url = "http://" + ports[1].split()[0]
        admin_url = "http://" + ports[2].split()[0]
        https_url = "https://" + edge.ready_line.split("https://")[1].split()[0]
        return {
            "name": name,
            "url": url,
            "https_url": https_url,
            "admin_url": admin_url,
            "admin_token": admin_token,
            "pid": edge.proc.pid,
            "region": f"region-{index + 1}",
        }

    def _start_router(
        self, api: httpx.Client, control_url: str, edges: list[dict]
    ) -> tuple[str, str]:
        """The request router over the demo regions; ready once its DNS answers with an edge."""
        opts = self.options
        regions = sorted({edge["region"] for edge in edges})
        config = {
            "zone": DEMO_ZONE,
            "ttl": 5,
            "regions": [
                {
                    "name": name,
                    "cidrs": DEMO_REGION_CIDRS[i : i + 1],
                    "neighbours": [other for other in regions if other != name],
                }
                for i, name in enumerate(regions)
            ],
        }
        if opts.geoip:
            config["geoip"] = str(opts.geoip.resolve())
        path = opts.state_dir / "router.yaml"
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        token = api.post("/api/v1/tokens", json={"name": "verge-up-router", "role": "read_only"})
        _check(token, "creating the router's token")
        dns = f"127.0.0.1:{opts.dns_port}"
        self.spawn(
            "router",
            [
                *VERGE,
                "router",
                "--dns",
                dns,
                "--http",
                f"127.0.0.1:{opts.router_port}",
                "--config",
                str(path),
                "--control",
                control_url,
            ],
            "verge router ready",
            secret_env={"VERGE_TOKEN": token.json()["token"]},
        )
        _wait_dns(
            opts.dns_port, DEMO_HOSTNAME, {e["url"].split("//")[1].split(":")[0] for e in edges}
        )
        return dns, f"http://127.0.0.1:{opts.router_port}"

    def _wait_edges_configured(
        self, api: httpx.Client, edges: list[dict], timeout: float = 30.0
    ) -> None:
        """Ready means: every edge serves the demo service (its bundle has arrived)."""
        deadline = time.monotonic() + timeout
        pending = {e["name"]: e["url"] for e in edges}
        while pending and time.monotonic() < deadline:
            for name, url in list(pending.items()):
                try:
                    r = httpx.get(url + "/", headers={"Host": DEMO_HOSTNAME}, timeout=2)
                    if r.status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if pending:
                time.sleep(0.1)
        if pending:
            raise UpError(f"edges never received the demo service: {', '.join(pending)}")


# ----- the demo service's rules -----------------------------------------------------------------


def stream_rule(path: str, stream_url: str) -> dict:
    return {"path": path, "origins": [{"url": stream_url}]}


def demo_rules(stream_url: str) -> list[dict]:
    """The demo service's rules: static, API and dynamic paths from the sample origin; live
    streams, VOD and recordings from the stream server."""
    return [*DEMO_RULES, *(stream_rule(path, stream_url) for path in STREAM_PATHS)]


def with_stream_rules(rules: list[dict], stream_url: str) -> list[dict]:
    """`rules` with every stream path sent to `stream_url`: a rule that already does so is
    kept as it is, one that sends the path elsewhere is replaced, a missing one appended."""
    result = list(rules)
    for path in STREAM_PATHS:
        wanted = stream_rule(path, stream_url)
        at = next((i for i, rule in enumerate(result) if rule.get("path") == path), None)
        if at is None:
            result.append(wanted)
        elif [o.get("url") for o in result[at].get("origins") or []] != [stream_url]:
            result[at] = wanted
    return result


# ----- what `verge vod add` needs to know ------------------------------------------------------


@dataclass(frozen=True)
class DemoStream:
    """A `verge up` state directory's stream server: its config, and where VOD is watched."""

    state_dir: Path
    config: Path
    vod_url: str | None


def find_demo_stream(state_dir: Path = DEFAULT_STATE_DIR) -> DemoStream | None:
    """The stream config of the `verge up` whose state is in `state_dir` (it has up.json and
    the config it names), or None. Running or not: its stream server serves the library."""
    try:
        up = json.loads((state_dir / UP_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(up, dict):
        return None
    config = Path(up.get("stream_config") or state_dir / STREAM_CONFIG)
    if not config.is_file():
        return None
    vod = up.get("vod")
    if not vod and up.get("edges"):
        vod = f"{up['edges'][0]['url']}/vod"
    return DemoStream(state_dir, config, vod)


# ----- helpers ---------------------------------------------------------------------------------


def _wait_dns(port: int, name: str, addresses: set[str], timeout: float = 30.0) -> None:
    """Until the router answers `name` with one of the edges (it has read the fleet)."""
    import dnslib

    deadline = time.monotonic() + timeout
    query = dnslib.DNSRecord.question(name)
    while time.monotonic() < deadline:
        try:
            reply = dnslib.DNSRecord.parse(query.send("127.0.0.1", port, timeout=1))
            if {str(rr.rdata) for rr in reply.rr} & addresses:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise UpError(f"the router never answered {name} with an edge")


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise UpError(f"{what}: HTTP {response.status_code}: {response.text.strip()}")


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _indent(text: str, prefix: str = "    | ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


# ----- the banner ------------------------------------------------------------------------------


def scripts_dir() -> Path:
    """Where this Python's console scripts (`verge`) are: the venv's bin directory."""
    return Path(sysconfig.get_path("scripts")).resolve()


def shell_lines(up: dict) -> list[str]:
    """Lines to paste into another shell so that `verge ...` works there against this demo."""
    return [
        f"export PATH={scripts_dir()}:$PATH",
        f"export VERGE_CONTROL={up['control']}",
        f"export VERGE_TOKEN={up['admin_token']}",
    ]


def banner(up: dict, state_dir: Path) -> str:
    edges = "\n".join(
        f"    {e['name']:<13} {e['url']}/   (admin {e['admin_url']})" for e in up["edges"]
    )
    shell = "\n".join(f"    {line}" for line in shell_lines(up))
    dns_port = up["dns"].split(":")[1]
    return f"""
  Verge is up
    control       {up["control"]}/        admin token {up["admin_token"]}
    dashboard     {up["control"]}/        sign in with the admin token (field "API token")
{edges}
    origin        {up["origin"]}/
    router        DNS {up["dns"]} (zone {up["zone"]}), HTTP {up["router"]}/
    stream        publish to {up["rtmp"]}/NAME?key={up["stream_key"]}
                  watch {up["watch"]}/NAME (player), NAME.m3u8, NAME.mpd, NAME.flv
                  WebRTC (WHEP) {up["watch"]}/NAME/whep, player {up["watch"]}/NAME?mode=webrtc
    vod           verge vod add FILE --name NAME, then {up["vod"]}/NAME.m3u8 (recordings too)
    service       {up["service"]} ({up["hostname"]}, the default service on every edge)
    state         {state_dir / UP_JSON}
  In another shell, for the `verge` command:
{shell}
  Try: curl -i {up["edges"][0]["url"]}/static/app.js   (twice)
       dig @127.0.0.1 -p {dns_port} +subnet=10.2.0.0/24 {up["hostname"]}   (region-2's edge)
       verge node list
  Ctrl-C stops everything.
"""


# ----- running ---------------------------------------------------------------------------------


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def _catch_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt even where it was inherited as ignored (a background
    job of a script); SIGTERM and SIGHUP raise Stopped, unless SIGHUP is ignored (nohup)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_stopped)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _raise_stopped)


def _ignore_signals() -> None:
    """While stopping: a second Ctrl-C must not leave half the children running."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def run_up(options: UpOptions) -> None:
    """Start the platform, print the banner, supervise until Ctrl-C (or SIGTERM, SIGHUP) or
    until a part the demo cannot do without exits (then exit 1); stop every child either way."""
    platform = Platform(options)
    _catch_signals()
    failure = ""
    try:
        failure = _start_and_supervise(platform, options)
    except KeyboardInterrupt:
        print(flush=True)  # after the terminal's ^C
        _say("stopping Verge (Ctrl-C)")
    except Stopped as stopped:
        _say(f"stopping Verge ({stopped.reason})")
    finally:
        _ignore_signals()
        platform.stop()
    if failure:
        raise SystemExit(failure)
    _say("stopped")


def _start_and_supervise(platform: Platform, options: UpOptions) -> str:
    """What went wrong ("error: ..." when starting), if it returns at all."""
    try:
        up = platform.start()
    except (UpError, httpx.HTTPError) as exc:
        return f"error: {exc}"
    print(banner(up, options.state_dir), flush=True)
    reason = platform.supervise(threading.Event())
    _say(f"stopping Verge: {reason}")
    return f"error: {reason.splitlines()[0]}"
