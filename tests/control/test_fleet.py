"""A control plane and real edge processes: join, config push, global purge, offline autonomy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.timeout(120)
VERGE = [sys.executable, "-m", "verge.cli"]
ADMIN = "vrg_admin_fleet-test-token"


class Proc:
    """A child process whose output is collected; ready when a marker line appears."""

    def __init__(self, args: list[str], marker: str, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if marker in line:
                    self.ready_line = line
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"{args[3]} did not start:\n" + "".join(self.lines))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll a condition with a deadline (these are events in other processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def probe_streams(url: str) -> str:
    """The codecs ffprobe finds at url ('' when not yet: the caller retries)."""
    try:
        return subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name",
                               "-of", "csv", url], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except subprocess.TimeoutExpired:
        return ""


class Fleet:
    def __init__(self, tmp: Path, origin_url: str) -> None:
        self.tmp = tmp
        self.origin_url = origin_url
        self.control_port = free_port()
        self.control_url = f"http://127.0.0.1:{self.control_port}"
        self.api = httpx.Client(base_url=self.control_url, timeout=10,
                                headers={"Authorization": f"Bearer {ADMIN}"})
        self.control: Proc | None = None
        self.edges: dict[str, Proc] = {}
        self.edge_urls: dict[str, str] = {}

    def start_control(self) -> None:
        self.control = Proc([*VERGE, "control", "--listen", f"127.0.0.1:{self.control_port}",
                             "--db", f"sqlite:///{self.tmp / 'control.db'}",
                             "--admin-token", ADMIN], "verge control ready")

    def join_token(self) -> str:
        r = self.api.post("/api/v1/tokens", json={"name": "join", "role": "join"})
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def start_edge(self, name: str, token: str | None, host: str = "127.0.0.1",
                   extra: tuple[str, ...] = ()) -> None:
        port = (free_port(host) if name not in self.edge_urls
                else self.edge_urls[name].rsplit(":", 1)[1])
        args = [*VERGE, "edge", "--control", self.control_url, "--listen", f"{host}:{port}",
                "--admin", f"{host}:0", "--admin-token", "t", "--cache-dir",
                str(self.tmp / name), "--workers", "1", "--name", name, *extra]
        if token:
            args += ["--join-token", token]
        proc = Proc(args, "verge edge ready")
        self.edges[name] = proc
        self.edge_urls[name] = proc.ready_line.split("ready: ")[1].split()[0]

    def stop(self) -> None:
        for proc in self.edges.values():
            proc.kill(signal.SIGTERM)
        if self.control:
            self.control.kill(signal.SIGTERM)


def get(url: str, path: str, host: str = "shop.test") -> httpx.Response:
    return httpx.get(url + path, headers={"Host": host}, timeout=10)


def test_join_config_purge_and_offline_autonomy(fleet, origin):
    origin.route("/p/item", headers=[("Cache-Control", "max-age=600"),
                                     ("Surrogate-Key", "items")], body=b"item v1")
    service = {"name": "shop", "hosts": ["shop.test"], "origins": [{"url": origin.url}]}
    assert fleet.api.post("/api/v1/services", json=service).status_code == 201
    token = fleet.join_token()
    for name in ("e1", "e2", "e3"):
        fleet.start_edge(name, token)

    # join + config push: every edge serves the service
    for url in fleet.edge_urls.values():
        wait_until(lambda url=url: get(url, "/p/item").status_code == 200, what="config applied")
        assert get(url, "/p/item").headers["cache-status"] == "verge; hit"
    nodes = fleet.api.get("/api/v1/nodes").json()["items"]
    assert {n["name"] for n in nodes} == {"e1", "e2", "e3"}

    # config change through the API reaches every edge
    current = fleet.api.get("/api/v1/services/shop")
    changed = {**service, "headers": {"response_add": {"X-Fleet": "v2"}}}
    r = fleet.api.put("/api/v1/services/shop", json=changed,
                      headers={"If-Match": current.headers["etag"]})
    assert r.status_code == 200, r.text
    for url in fleet.edge_urls.values():
        wait_until(lambda url=url: get(url, "/p/item").headers.get("x-fleet") == "v2",
                   what="config change")

    # global purge, acknowledged by all edges
    out = subprocess.run([*VERGE, "purge", "--control", fleet.control_url, "--token", ADMIN,
                          "--service", "shop", "--tag", "items", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for url in fleet.edge_urls.values():
        assert "fwd=miss" in get(url, "/p/item").headers["cache-status"]

    # control plane dies: edges keep serving from their caches and last bundle
    fleet.control.kill()
    for url in fleet.edge_urls.values():
        r = get(url, "/p/item")
        assert r.status_code == 200 and r.headers["cache-status"] == "verge; hit"
    # an edge restarted while the control plane is down still serves (bundle on disk)
    fleet.edges["e3"].kill()
    fleet.start_edge("e3", None)
    assert get(fleet.edge_urls["e3"], "/p/item").status_code == 200

    # control plane back: a purge issued now reaches everyone, stats arrive
    fleet.start_control()
    r = fleet.api.post("/api/v1/purge", json={"service": "shop", "tags": ["items"]})
    assert r.status_code == 202, r.text
    seq = r.json()["seq"]
    wait_until(lambda: not fleet.api.get(f"/api/v1/purge/{seq}").json()["pending"],
               timeout=30, what="purge acknowledged after restart")
    for url in fleet.edge_urls.values():
        assert "fwd=miss" in get(url, "/p/item").headers["cache-status"]
    wait_until(lambda: sum(p["requests"] for p in fleet.api.get(
        "/api/v1/stats", params={"service": "shop"}).json()["series"]) > 0,
        timeout=30, what="stats pushed")


def test_missed_purge_applied_after_reconnect(fleet, origin):
    origin.route("/m", headers=[("Cache-Control", "max-age=600")], body=b"m")
    service = {"name": "shop", "hosts": ["shop.test"], "origins": [{"url": origin.url}]}
    assert fleet.api.post("/api/v1/services", json=service).status_code == 201
    fleet.start_edge("e1", fleet.join_token())
    url = fleet.edge_urls["e1"]
    wait_until(lambda: get(url, "/m").status_code == 200, what="config applied")
    assert get(url, "/m").headers["cache-status"] == "verge; hit"
    fleet.edges["e1"].kill()  # offline while the purge is issued
    r = fleet.api.post("/api/v1/purge", json={"urls": ["http://shop.test/m"]})
    assert r.status_code == 202, r.text
    seq = r.json()["seq"]
    assert fleet.api.get(f"/api/v1/purge/{seq}").json()["pending"] == ["e1"]
    fleet.start_edge("e1", None)
    # applied before the edge serves from cache again: the very first request misses
    assert "fwd=miss" in get(url, "/m").headers["cache-status"]
    wait_until(lambda: not fleet.api.get(f"/api/v1/purge/{seq}").json()["pending"],
               timeout=30, what="missed purge acknowledged")


def test_verge_up_writes_up_json(tmp_path):
    state = tmp_path / "up"
    port, dns_port = free_port(), free_port()
    proc = subprocess.Popen([*VERGE, "up", "--state-dir", str(state), "--control-port",
                             str(free_port()), "--edge-port", str(port), "--origin-port",
                             str(free_port()), "--https-port", str(free_port()),
                             "--dns-port", str(dns_port), "--router-port", str(free_port()),
                             "--rtmp-port", str(free_port()), "--stream-port", str(free_port())],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        up_json = state / "up.json"
        wait_until(lambda: up_json.exists() or proc.poll() is not None, timeout=90,
                   what="up.json")
        assert proc.poll() is None, proc.stdout.read()
        up = json.loads(up_json.read_text())
        assert up["hostname"] == "demo.verge.test" and up["service"] == "demo"
        assert [e["url"] for e in up["edges"]] == [f"http://127.0.0.2:{port}",
                                                    f"http://127.0.0.3:{port}"]
        for edge in up["edges"]:
            first = httpx.get(edge["url"] + "/static/app.js", timeout=10)
            again = httpx.get(edge["url"] + "/static/app.js", timeout=10)
            assert first.status_code == 200 and again.headers["cache-status"] == "verge; hit"
        for edge in up["edges"]:  # HTTPS with the dev CA, HTTP/2 by ALPN
            with httpx.Client(verify=ssl.create_default_context(cafile=up["ca"]), http2=True) as tls:
                r = tls.get(edge["https_url"] + "/static/app.js", timeout=10)
            assert r.status_code == 200 and r.http_version == "HTTP/2"
        nodes = httpx.get(up["control"] + "/api/v1/nodes", timeout=10,
                          headers={"Authorization": f"Bearer {up['admin_token']}"}).json()
        assert len(nodes["items"]) == 2
        # the router: DNS for the demo zone, a region per edge, client subnets from the CIDR map
        assert up["dns"] == f"127.0.0.1:{dns_port}" and up["zone"] == "verge.test"
        assert [e["region"] for e in up["edges"]] == ["region-1", "region-2"]
        if shutil.which("dig"):
            for subnet, edge in (("10.1.0.0/24", "127.0.0.2"), ("10.2.0.0/24", "127.0.0.3")):
                out = subprocess.run(["dig", "@127.0.0.1", "-p", str(dns_port), "+short",
                                      f"+subnet={subnet}", up["hostname"]],
                                     capture_output=True, text=True, timeout=10)
                assert out.stdout.split() == [edge]
        # the stream server: publish with the demo key, watch through the first edge
        assert up["rtmp"].startswith("rtmp://127.0.0.1:") and up["rtmp"].endswith("/live")
        if shutil.which("ffmpeg"):
            publisher = subprocess.Popen([
                "ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
                "-f", "lavfi", "-i", "sine", "-t", "40", "-c:v", "libx264", "-preset", "ultrafast",
                "-g", "25", "-c:a", "aac", "-f", "flv", f"{up['rtmp']}/cam?key={up['stream_key']}"])
            try:
                probe = wait_until(lambda: probe_streams(up["watch"] + "/cam.flv"), timeout=45,
                                   what="the stream through the edge")
                assert "h264" in probe and "aac" in probe
            finally:
                publisher.kill()
                publisher.wait()
        redirect = httpx.get(up["router"] + "/static/app.js?v=1", timeout=10,
                             headers={"Host": up["hostname"]})
        assert redirect.status_code == 302
        assert redirect.headers["location"].endswith(f".demo.verge.test:{port}/static/app.js?v=1")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
