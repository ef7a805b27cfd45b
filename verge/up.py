"""`verge up`: the whole platform on one machine — control plane, two edges, a sample origin.

Each edge listens on its own loopback address (127.0.0.2, 127.0.0.3, ...) and the same
port, as separate hosts would. The demo service (hostname ``demo.verge.test``) is created
through the control plane's API like any other and is every edge's default service, so
``curl EDGE_URL/path`` works without a Host header. When everything is ready, the state
directory gets ``up.json`` (written atomically) describing the running platform for scripts
and tests; Ctrl-C or SIGTERM stops every process.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from verge.certs import ensure_ca, issue_cert
from verge.files import write_atomic

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
VERGE = [sys.executable, "-m", "verge.cli"]


class UpError(Exception):
    """A part of the platform did not start; the message says which and why."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    ready_line: str = ""

    def pump(self, marker: str) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if marker in line and not self.ready.is_set():
                self.ready_line = line.strip()
                self.ready.set()
            elif not marker:
                sys.stdout.write(line)
        self.ready.set()


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


class Platform:
    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.children: list[Child] = []
        self.admin_token = os.environ.get("VERGE_ADMIN_TOKEN") or "vrg_admin_" + secrets.token_urlsafe(24)
        self.stream_key = secrets.token_urlsafe(12)

    # ----- processes --------------------------------------------------------------------------
    def spawn(self, name: str, args: list[str], marker: str, timeout: float = 60.0) -> Child:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        child = Child(name, proc)
        self.children.append(child)
        threading.Thread(target=child.pump, args=(marker,), daemon=True).start()
        if not child.ready.wait(timeout) or proc.poll() is not None or not child.ready_line:
            raise UpError(f"{name} did not start:\n" + "".join(child.output[-30:]))
        return child

    def supervise(self, stop: threading.Event) -> None:
        """Run until stopped. An edge that exits is reported and the rest go on (the router
        sends its users elsewhere, as in production); anything else exiting ends the demo."""
        reported: set[str] = set()
        while not stop.is_set():
            for child in self.children:
                code = child.proc.poll()
                if code is None or child.name in reported:
                    continue
                if not child.name.startswith("edge-"):
                    print(f"  {child.name} exited (code {code}); stopping", flush=True)
                    return
                reported.add(child.name)
                print(f"  {child.name} exited (code {code}); the router routes around it",
                      flush=True)
            stop.wait(0.5)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 10
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()

    # ----- start-up -----------------------------------------------------------------------------
    def start(self) -> dict:
        opts = self.options
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        origin_url = f"http://127.0.0.1:{opts.origin_port}"
        origin = self.spawn("origin", [*VERGE, "demo-origin", "--listen",
                                       f"127.0.0.1:{opts.origin_port}"], '"listening"')
        stream_url, rtmp_url = self._start_stream()
        control = self.spawn("control plane", [
            *VERGE, "control", "--listen", f"127.0.0.1:{opts.control_port}",
            "--db", f"sqlite:///{(opts.state_dir / 'control.db').resolve()}",
            "--admin-token", self.admin_token], "verge control ready")
        control_url = control.ready_line.split("ready:", 1)[1].split()[0].rstrip("/")
        api = httpx.Client(base_url=control_url, timeout=10,
                           headers={"Authorization": f"Bearer {self.admin_token}"})
        join_token = self._prepare_control(api, origin_url, stream_url)
        self.ca, self.cert = self._dev_certificate()
        edges = [self._start_edge(i, control_url, join_token) for i in range(opts.edges)]
        self._wait_edges_configured(api, edges)
        dns, router_url = self._start_router(api, control_url, edges)
        up = {
            "control": control_url, "control_pid": control.proc.pid,
            "admin_token": self.admin_token, "edges": edges, "origin": origin_url,
            "ca": str(Path(self.ca.cert_file).resolve()),
            "origin_pid": origin.proc.pid, "service": DEMO_SERVICE, "hostname": DEMO_HOSTNAME,
            "join_token": join_token, "dns": dns, "zone": DEMO_ZONE, "router": router_url,
            "rtmp": rtmp_url, "stream_key": self.stream_key, "stream": stream_url,
            "watch": f"{edges[0]['url']}/{STREAM_APP}",
        }
        # up.json holds the admin token: private, like the edges' credentials
        write_atomic(opts.state_dir / "up.json", (json.dumps(up, indent=2) + "\n").encode())
        return up

    def _start_stream(self) -> tuple[str, str]:
        """The stream server, with one publish key for the demo; its HTTP side is the demo
        service's origin for /live/."""
        opts = self.options
        path = opts.state_dir / "stream.yaml"
        path.write_text(json.dumps({"stream": {
            "apps": [{"name": STREAM_APP, "keys": {"*": self.stream_key}}],
            "data_dir": str((opts.state_dir / "stream-data").resolve())}}, indent=2) + "\n")
        self.spawn("stream", [*VERGE, "stream", "--rtmp", f"127.0.0.1:{opts.rtmp_port}",
                              "--http", f"127.0.0.1:{opts.stream_port}", "--config", str(path)],
                   "verge stream ready")
        return (f"http://127.0.0.1:{opts.stream_port}",
                f"rtmp://127.0.0.1:{opts.rtmp_port}/{STREAM_APP}")

    def _prepare_control(self, api: httpx.Client, origin_url: str, stream_url: str) -> str:
        """The demo service and a join token, created through the API (idempotent)."""
        existing = api.get(f"/api/v1/services/{DEMO_SERVICE}")
        if existing.status_code == 404:
            rules = [*DEMO_RULES, {"path": f"/{STREAM_APP}/", "origins": [{"url": stream_url}]}]
            created = api.post("/api/v1/services", json={
                "name": DEMO_SERVICE, "hosts": [DEMO_HOSTNAME], "default": True,
                "origins": [{"url": origin_url}], "rules": rules,
                "health_check": {"path": "/", "interval": 2}})
            _check(created, "creating the demo service")
        else:
            _check(existing, "reading the demo service")
        token = api.post("/api/v1/tokens", json={"name": "verge-up-join", "role": "join"})
        _check(token, "creating a join token")
        return token.json()["token"]

    def _dev_certificate(self):
        """A local CA (`verge cert dev`'s) and one certificate for the demo name and every edge."""
        out = self.options.state_dir / "certs"
        ca = ensure_ca(out)
        names = [DEMO_HOSTNAME, "localhost", *(f"127.0.0.{i + 2}" for i in range(self.options.edges))]
        cert = issue_cert(ca, names, out / "edges.pem", out / "edges-key.pem")
        return ca, cert

    def _start_edge(self, index: int, control_url: str, join_token: str) -> dict:
        opts = self.options
        host = f"127.0.0.{index + 2}"
        name = f"edge-{index + 1}"
        admin_token = secrets.token_urlsafe(16)
        edge = self.spawn(name, [
            *VERGE, "edge", "--control", control_url, "--join-token", join_token,
            "--listen", f"{host}:{opts.edge_port}", "--admin", f"{host}:{opts.edge_port + 1}",
            "--admin-token", admin_token, "--cache-dir", str((opts.state_dir / name).resolve()),
            "--workers", str(opts.workers), "--name", name, "--region", f"region-{index + 1}",
            "--https", f"{host}:{opts.https_port}",
            "--tls-cert", str(self.cert.cert_file), "--tls-key", str(self.cert.key_file),
        ], "verge edge ready")
        ports = edge.ready_line.split("http://")
        url = "http://" + ports[1].split()[0]
        admin_url = "http://" + ports[2].split()[0]
        https_url = "https://" + edge.ready_line.split("https://")[1].split()[0]
        return {"name": name, "url": url, "https_url": https_url, "admin_url": admin_url,
                "admin_token": admin_token, "pid": edge.proc.pid, "region": f"region-{index + 1}"}

    def _start_router(self, api: httpx.Client, control_url: str,
                      edges: list[dict]) -> tuple[str, str]:
        """The request router over the demo regions; ready once its DNS answers with an edge."""
        opts = self.options
        regions = sorted({edge["region"] for edge in edges})
        config = {"zone": DEMO_ZONE, "ttl": 5, "regions": [
            {"name": name, "cidrs": DEMO_REGION_CIDRS[i:i + 1],
             "neighbours": [other for other in regions if other != name]}
            for i, name in enumerate(regions)]}
        path = opts.state_dir / "router.yaml"
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        token = api.post("/api/v1/tokens", json={"name": "verge-up-router", "role": "read_only"})
        _check(token, "creating the router's token")
        dns = f"127.0.0.1:{opts.dns_port}"
        self.spawn("router", [*VERGE, "router", "--dns", dns, "--http",
                              f"127.0.0.1:{opts.router_port}", "--config", str(path),
                              "--control", control_url, "--token", token.json()["token"]],
                   "verge router ready")
        _wait_dns(opts.dns_port, DEMO_HOSTNAME, {e["url"].split("//")[1].split(":")[0] for e in edges})
        return dns, f"http://127.0.0.1:{opts.router_port}"

    def _wait_edges_configured(self, api: httpx.Client, edges: list[dict],
                               timeout: float = 30.0) -> None:
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


def run_up(options: UpOptions) -> None:
    platform = Platform(options)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        up = platform.start()
    except (UpError, httpx.HTTPError) as exc:
        platform.stop()
        raise SystemExit(f"error: {exc}") from None
    edges = "\n".join(f"    {e['name']:<13} {e['url']}/   (admin {e['admin_url']})"
                      for e in up["edges"])
    print(f"""
  Verge is up
    control       {up['control']}/        admin token {up['admin_token']}
{edges}
    origin        {up['origin']}/
    router        DNS {up['dns']} (zone {up['zone']}), HTTP {up['router']}/
    stream        publish to {up['rtmp']}/NAME?key={up['stream_key']}
                  watch {up['watch']}/NAME (player), NAME.m3u8, NAME.mpd, NAME.flv
    service       {up['service']} ({up['hostname']}, the default service on every edge)
    state         {options.state_dir / 'up.json'}
  Try: curl -i {up['edges'][0]['url']}/static/app.js   (twice)
       dig @127.0.0.1 -p {up['dns'].split(':')[1]} +subnet=10.2.0.0/24 {up['hostname']}   (region-2's edge)
  Ctrl-C stops everything.
""", flush=True)
    try:
        platform.supervise(stop)
    except KeyboardInterrupt:
        pass
    finally:
        platform.stop()
