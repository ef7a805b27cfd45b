"""Edges and several control-plane replicas (issue 19): failover, and purges that are never
reported complete while an edge has not applied them.

Two `verge control` processes on one PostgreSQL database (same VERGE_SECRET and admin
token), real edges listing both; the replica an edge uses is killed with -9.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import free_port
from tests.control.pg import Cluster, Unavailable
from tests.control.test_fleet import ADMIN, VERGE, Proc, get, wait_until
from tests.origin import TestOrigin, make_origin
from verge.control.client import control_urls

pytestmark = pytest.mark.timeout(120)
SERVICE = {"name": "shop", "hosts": ["shop.test"]}


class Replicas:
    """Control-plane replicas on one database, and the edges started against them."""

    def __init__(self, tmp: Path, db: str, origin: TestOrigin) -> None:
        self.tmp, self.db, self.origin = tmp, db, origin
        self.ports = [free_port(), free_port()]
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self.controls: list[Proc | None] = [None, None]
        self.edges: dict[str, Proc] = {}
        self.edge_urls: dict[str, str] = {}

    def start_control(self, index: int) -> None:
        self.controls[index] = Proc(
            [
                *VERGE,
                "control",
                "--listen",
                f"127.0.0.1:{self.ports[index]}",
                "--db",
                self.db,
                "--admin-token",
                ADMIN,
            ],
            "verge control ready",
        )

    def api(self, index: int) -> httpx.Client:
        return httpx.Client(
            base_url=self.urls[index], timeout=10, headers={"Authorization": f"Bearer {ADMIN}"}
        )

    def start_edge(self, name: str, control: list[str], join_token: str | None = None) -> str:
        port = self.edge_urls[name].rsplit(":", 1)[1] if name in self.edge_urls else free_port()
        args = [
            *VERGE,
            "edge",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            "127.0.0.1:0",
            "--admin-token",
            "t",
            "--cache-dir",
            str(self.tmp / name),
            "--workers",
            "1",
            "--name",
            name,
        ]
        for value in control:
            args += ["--control", value]
        if join_token:
            args += ["--join-token", join_token]
        self.edges[name] = Proc(args, "verge edge ready")
        self.edge_urls[name] = self.edges[name].ready_line.split("ready: ")[1].split()[0]
        return self.edge_urls[name]

    def stop(self) -> None:
        for proc in [*self.edges.values(), *self.controls]:
            if proc is not None:
                proc.kill()


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory, pg_cluster: Cluster | Unavailable, pg_template
) -> Iterator[Replicas]:
    """Replicas A and B and an origin for the module: each test kills A (if still up) and
    starts its own edge, revoking it at the end (so purges expect only the next one)."""
    if isinstance(pg_cluster, Unavailable):
        pytest.skip(f"PostgreSQL unavailable: {pg_cluster}")
    origin = make_origin()
    secret = os.environ.get("VERGE_SECRET")
    os.environ["VERGE_SECRET"] = "failover-test-secret"  # inherited by the replicas
    fleet = Replicas(
        tmp_path_factory.mktemp("failover"), pg_cluster.new_database(pg_template), origin
    )
    try:
        fleet.start_control(0)
        fleet.start_control(1)
        with fleet.api(0) as api:
            body = {**SERVICE, "origins": [{"url": origin.url}]}
            assert api.post("/api/v1/services", json=body).status_code == 201
        yield fleet
    finally:
        fleet.stop()
        origin.stop()
        if secret is None:
            os.environ.pop("VERGE_SECRET", None)
        else:
            os.environ["VERGE_SECRET"] = secret


def retire(replicas: Replicas, name: str) -> None:
    """Stop edge ``name`` and revoke it: later purges no longer wait for it."""
    replicas.edges.pop(name).kill()
    with replicas.api(1) as api_b:
        assert api_b.delete(f"/api/v1/nodes/{name}").status_code in (200, 204)


def join_token(api: httpx.Client) -> str:
    response = api.post("/api/v1/tokens", json={"name": "join", "role": "join"})
    assert response.status_code == 201, response.text
    return response.json()["token"]


def cache_status(url: str, path: str) -> str:
    return get(url, path).headers.get("cache-status", "")


def cached(url: str, path: str) -> None:
    """Wait for the edge to serve ``path`` (config applied), then check it is a hit."""
    wait_until(lambda: get(url, path).status_code == 200, what="the edge serves the service")
    assert cache_status(url, path) == "verge; hit"


def purge(control: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VERGE, "purge", "--control", control, "--token", ADMIN, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ----- the flags ---------------------------------------------------------------------------------


def test_control_urls_are_split_checked_and_deduplicated() -> None:
    assert control_urls("http://a:7000, http://b:7000/") == ["http://a:7000", "http://b:7000"]
    assert control_urls(["http://a:7000", "http://b:7000,http://a:7000"]) == [
        "http://a:7000",
        "http://b:7000",
    ]
    for bad in ("a:7000", "http://a:70x0", "ftp://a", "http://a:1?x=1", ",", ""):
        with pytest.raises(ValueError):
            control_urls(bad)


@pytest.fixture
def edge_options(monkeypatch) -> list:
    """Run `verge edge` in-process up to the node start; the NodeOptions it would run with."""
    started: list = []
    monkeypatch.setattr("verge.edge.node.run_node", lambda options, cfg: started.append(options))
    monkeypatch.delenv("VERGE_CONTROL", raising=False)
    return started


def run_edge(*args: str, env: dict[str, str] | None = None):
    from verge.cli import app

    return CliRunner().invoke(
        app,
        ["edge", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--admin-token", "t", *args],
        env=env,
    )


def test_edge_takes_several_control_urls(edge_options: list, tmp_path) -> None:
    both = ["http://127.0.0.1:7000", "http://127.0.0.1:7001"]
    cache = ("--cache-dir", str(tmp_path))
    for args, env in (
        (["--control", ",".join(both)], None),
        (["--control", both[0], "--control", both[1]], None),
        ([], {"VERGE_CONTROL": ",".join(both)}),
    ):
        result = run_edge(*cache, *args, env=env)
        assert result.exit_code == 0, result.output
        assert edge_options.pop().control == both
    result = run_edge(*cache, "--control", f"{both[0]},127.0.0.1:7001")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--control" in result.output and "'127.0.0.1:7001'" in result.output
    assert not edge_options


# ----- failover ----------------------------------------------------------------------------------


def test_edge_fails_over_to_the_other_replica(replicas: Replicas) -> None:
    origin = replicas.origin
    origin.route("/p/item", headers=[("Cache-Control", "max-age=600")], body=b"item")
    a, b = replicas.urls
    with replicas.api(0) as api_a:
        token = join_token(api_a)
    edge = replicas.start_edge("e1", [f"{a},{b}"], token)
    cached(edge, "/p/item")

    replicas.controls[0].kill(signal.SIGKILL)
    with replicas.api(1) as api_b:
        # a config change through B arrives within 1 s
        current = api_b.get("/api/v1/services/shop")
        changed = {
            **SERVICE,
            "origins": [{"url": origin.url}],
            "headers": {"response_add": {"X-Fleet": "v2"}},
        }
        started = time.monotonic()
        r = api_b.put(
            "/api/v1/services/shop", json=changed, headers={"If-Match": current.headers["etag"]}
        )
        assert r.status_code == 200, r.text
        wait_until(
            lambda: get(edge, "/p/item").headers.get("x-fleet") == "v2",
            timeout=5,
            what="the config change through B",
        )
        assert time.monotonic() - started < 1.0

        # a purge through B: acknowledged (the CLI exits 0) and applied within 1 s
        started = time.monotonic()
        r = api_b.post("/api/v1/purge", json={"urls": ["http://shop.test/p/item"]})
        seq = r.json()["seq"]
        status = api_b.get(f"/api/v1/purge/{seq}", params={"wait": 5}).json()
        assert status["pending"] == [] and status["acked"] == ["e1"]
        assert time.monotonic() - started < 1.0
        assert "fwd=miss" in cache_status(edge, "/p/item")
        out = purge(b, "http://shop.test/p/item", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["complete"] is True

        # heartbeats go to B too: the node stays up as seen through B
        beat = api_b.get("/api/v1/nodes").json()["items"][0]["last_heartbeat"]
        wait_until(
            lambda: api_b.get("/api/v1/nodes").json()["items"][0]["last_heartbeat"] != beat,
            timeout=10,
            what="a heartbeat through B",
        )
        assert api_b.get("/api/v1/nodes").json()["items"][0]["status"] == "up"

    # the credential is the fleet's, not A's: restarted with B alone, no join token, it works
    replicas.edges["e1"].kill()
    edge = replicas.start_edge("e1", [b])
    with replicas.api(1) as api_b:
        r = api_b.post("/api/v1/purge", json={"urls": ["http://shop.test/p/item"]})
        status = api_b.get(f"/api/v1/purge/{r.json()['seq']}", params={"wait": 10}).json()
        assert status["acked"] == ["e1"] and status["pending"] == []
    retire(replicas, "e1")


# ----- purges an edge has not applied ------------------------------------------------------------


def test_purge_names_the_edge_away_and_the_edge_applies_it_first_on_return(
    replicas: Replicas,
) -> None:
    origin = replicas.origin
    origin.route("/m", headers=[("Cache-Control", "max-age=600")], body=b"m")
    a, b = replicas.urls
    with replicas.api(1) as api_b:
        token = join_token(api_b)
    replicas.controls[0].kill(signal.SIGKILL)  # A, listed first, is down from the start
    edge = replicas.start_edge("e2", [a, b], token)  # joins through B
    cached(edge, "/m")
    node_json = replicas.tmp / "e2" / "control" / "node.json"
    assert json.loads(node_json.read_text())["controls"] == [a, b]
    assert node_json.stat().st_mode & 0o077 == 0

    os.killpg(replicas.edges["e2"].proc.pid, signal.SIGSTOP)  # unreachable: no acks, no beats
    try:
        out = purge(b, "http://shop.test/m", "--timeout", "1")
        assert out.returncode == 1, out.stdout + out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert "incomplete" in last and "e2" in last
        assert "acknowledged by all" not in out.stdout
        as_json = purge(b, "http://shop.test/m", "--timeout", "0.5", "--json")
        assert as_json.returncode == 1
        status = json.loads(as_json.stdout)
        assert status["complete"] is False and status["pending"] == ["e2"]
    finally:
        replicas.edges["e2"].kill(signal.SIGKILL)  # a stopped process takes SIGKILL too

    # back (A still down): it catches up through B before serving from its cache
    edge = replicas.start_edge("e2", [a, b])
    assert "fwd=miss" in cache_status(edge, "/m")
    with replicas.api(1) as api_b:
        final = api_b.get(f"/api/v1/purge/{status['seq']}", params={"wait": 10}).json()
        assert final["pending"] == [] and final["acked"] == ["e2"]
    retire(replicas, "e2")
