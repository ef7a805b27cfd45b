"""`verge router --control`: real edges, the control plane's health monitor, answers seen by dig."""

from __future__ import annotations

import shutil
import signal
import subprocess

import httpx
import pytest

from tests.conftest import free_port
from tests.control.test_fleet import VERGE, Fleet, Proc, wait_until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) not installed")]

ROUTER_YAML = """\
zone: verge.test
ttl: 1
regions:
  - {name: east, cidrs: [10.1.0.0/16], neighbours: [west]}
  - {name: west, cidrs: [10.2.0.0/16], neighbours: [east]}
"""


def dig(port: int, name: str, subnet: str) -> list[str]:
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), f"+subnet={subnet}", "+short",
                          "+tries=1", "+time=2", name], capture_output=True, text=True, timeout=10)
    return out.stdout.split()


def test_clients_follow_edge_health_through_the_control_plane(tmp_path, origin):
    fleet = Fleet(tmp_path, origin.url)
    fleet.start_control()
    router = None
    try:
        service = {"name": "demo", "hosts": ["demo.verge.test"], "origins": [{"url": origin.url}]}
        assert fleet.api.post("/api/v1/services", json=service).status_code == 201
        token = fleet.join_token()
        fleet.start_edge("edge-a", token, host="127.0.0.2", extra=("--region", "east"))
        fleet.start_edge("edge-b", token, host="127.0.0.3", extra=("--region", "west"))
        reader = fleet.api.post("/api/v1/tokens", json={"name": "router", "role": "read_only"})
        assert reader.status_code == 201, reader.text
        config = tmp_path / "router.yaml"
        config.write_text(ROUTER_YAML)
        dns_port = free_port()
        router = Proc([*VERGE, "router", "--dns", f"127.0.0.1:{dns_port}", "--config", str(config),
                       "--control", fleet.control_url, "--token", reader.json()["token"]],
                      "verge router ready")

        wait_until(lambda: dig(dns_port, "demo.verge.test", "10.1.0.0/24") == ["127.0.0.2"],
                   what="region east's clients on edge-a")
        assert dig(dns_port, "demo.verge.test", "10.2.0.0/24") == ["127.0.0.3"]

        fleet.edges["edge-a"].kill()  # SIGKILL: the edge is gone
        wait_until(lambda: dig(dns_port, "demo.verge.test", "10.1.0.0/24") == ["127.0.0.3"],
                   what="region east's clients moved to edge-b")
        nodes = {n["name"]: n for n in fleet.api.get("/api/v1/nodes").json()["items"]}
        assert nodes["edge-a"]["monitor"]["state"] == "down"
        assert nodes["edge-b"]["monitor"]["state"] == "up"

        fleet.start_edge("edge-a", None, host="127.0.0.2", extra=("--region", "east"))
        wait_until(lambda: dig(dns_port, "demo.verge.test", "10.1.0.0/24") == ["127.0.0.2"],
                   what="region east's clients back on edge-a")
        # EDGE.HOST (where HTTP redirects point) is served as the service's own host
        origin.route("/hello", headers=[("Cache-Control", "max-age=60")], body=b"hi\n")
        served = httpx.get(fleet.edge_urls["edge-a"] + "/hello",
                           headers={"Host": "edge-a.demo.verge.test"}, timeout=10)
        assert served.status_code == 200 and served.content == b"hi\n"
        assert origin.requests[-1].headers["host"] == "demo.verge.test"
    finally:
        if router is not None:
            router.kill(signal.SIGTERM)
        fleet.stop()
