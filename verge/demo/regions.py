"""`make demo-regions`: three regions in network namespaces, a user in each, routed by DNS.

Builds the :mod:`verge.demo.netsim` topology (client↔own edge 5 ms, regions 40/80/120 ms
apart, core 2 ms away), then runs the platform inside it: control plane, sample origin and
router in ``core``, one edge per region joined to the control plane. The router's CIDR map
puts each region's client network (10.20.i.0/24) in that region, so it routes by the
resolver's address — each client asks the router itself with dig.

It prints which edge each client got and the latency it saw (first request: usually a miss
that goes to the origin; second: a hit), next to the latency via the other edges; then kills
region 1's edge and shows region 1's client moving to its nearest neighbour.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from verge.demo.netsim import Topology, preflight
from verge.up import VERGE, Platform, UpOptions

CORE = "core"
ZONE = "verge.test"
HOSTNAME = "demo.verge.test"
PATH = "/static/app.js"
REGIONS = 3


def _router_config() -> dict:
    """Regions by client network, neighbours in order of distance (the netsim's delays)."""
    neighbours = {1: [2, 3], 2: [1, 3], 3: [2, 1]}
    return {"zone": ZONE, "ttl": 2, "regions": [
        {"name": f"region-{i}", "cidrs": [f"10.20.{i}.0/24", f"10.10.{i}.0/24"],
         "neighbours": [f"region-{n}" for n in neighbours[i]]} for i in range(1, REGIONS + 1)],
        "health": {"interval": "500ms"}}


class RegionsDemo:
    def __init__(self, topo: Topology, state: Path) -> None:
        self.topo = topo
        self.state = state
        self.platform = Platform(UpOptions(state_dir=state))
        self.core = topo.address(CORE)
        self.control = f"http://{self.core}:7000"

    def run_in(self, host: str, args: list[str], timeout: float = 30) -> str:
        out = subprocess.run([*self.topo.exec_args(host), *args], capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])} in {host}: {out.stderr or out.stdout}")
        return out.stdout

    def verge(self, host: str, *args: str) -> dict:
        return json.loads(self.run_in(host, [*VERGE, *args, "--control", self.control,
                                             "--token", self.platform.admin_token, "--json"]))

    def start(self) -> None:
        ns = self.topo.exec_args
        self.platform.spawn("origin", [*ns(CORE), *VERGE, "demo-origin", "--listen",
                                       f"{self.core}:9000"], '"listening"')
        self.platform.spawn("control plane", [
            *ns(CORE), *VERGE, "control", "--listen", f"{self.core}:7000",
            "--db", f"sqlite:///{self.state / 'control.db'}",
            "--admin-token", self.platform.admin_token], "verge control ready")
        self.verge(CORE, "service", "add", "demo", "--host", HOSTNAME,
                   "--origin", f"http://{self.core}:9000")
        join = self.verge(CORE, "token", "create", "--role", "join")["token"]
        reader = self.verge(CORE, "token", "create", "--role", "read_only")["token"]
        for i in range(1, REGIONS + 1):
            host = f"region-{i}"
            address = self.topo.address(host)
            self.platform.spawn(f"edge-{i}", [
                *ns(host), *VERGE, "edge", "--control", self.control, "--join-token", join,
                "--listen", f"{address}:8080", "--admin", f"{address}:8081",
                "--admin-token", secrets.token_urlsafe(12), "--workers", "1",
                "--cache-dir", str(self.state / host), "--name", f"edge-{i}", "--region", host,
            ], "verge edge ready")
        config = self.state / "router.yaml"
        config.write_text(json.dumps(_router_config(), indent=2) + "\n")
        self.platform.spawn("router", [
            *ns(CORE), *VERGE, "router", "--dns", f"{self.core}:5353", "--config", str(config),
            "--control", self.control, "--token", reader], "verge router ready")

    # ----- what a user in each region sees ---------------------------------------------------
    def resolve(self, client: str) -> str:
        out = self.run_in(client, ["dig", f"@{self.core}", "-p", "5353", "+short", "+tries=1",
                                   "+time=2", HOSTNAME])
        return out.strip().splitlines()[0] if out.strip() else ""

    def wait_resolves(self, client: str, accept, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            address = self.resolve(client)
            if accept(address):
                return address
            time.sleep(0.2)
        raise RuntimeError(f"{client}: the router never gave an expected edge")

    def fetch_ms(self, client: str, address: str) -> float:
        out = self.run_in(client, ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}",
                                   "-H", f"Host: {HOSTNAME}", f"http://{address}:8080{PATH}"])
        return float(out) * 1000

    def report(self, title: str, clients: list[str]) -> None:
        edges = {self.topo.address(f"region-{i}"): f"edge-{i}" for i in range(1, REGIONS + 1)}
        print(f"\n{title}")
        print(f"  {'client':<10} {'DNS gave':<20} {'1st':>9} {'2nd':>9}   "
              + "  ".join(f"{'via ' + name:>11}" for name in edges.values()))
        for client in clients:
            address = self.wait_resolves(client, lambda a: a in edges)
            first, second = self.fetch_ms(client, address), self.fetch_ms(client, address)
            others = [f"{self.fetch_ms(client, a):>9.1f}ms" if self._alive(edges[a])
                      else f"{'down':>11}" for a in edges]
            print(f"  {client:<10} {edges[address] + ' ' + address:<20} {first:>7.1f}ms "
                  f"{second:>7.1f}ms   " + "  ".join(others))

    def _alive(self, name: str) -> bool:
        return any(c.name == name and c.proc.poll() is None for c in self.platform.children)

    def kill_edge(self, name: str) -> None:
        child = next(c for c in self.platform.children if c.name == name)
        child.proc.kill()
        child.proc.wait(10)


def main() -> int:
    reason = preflight()
    if reason:
        print(f"demo-regions cannot run here: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="verge-regions-") as tmp, Topology(REGIONS) as topo:
        demo = RegionsDemo(topo, Path(tmp))
        try:
            print("building 3 regions (client<->own edge 5 ms RTT; regions 40/80/120 ms apart)...")
            demo.start()
            clients = [f"client-{i}" for i in range(1, REGIONS + 1)]
            demo.report("Each client resolves demo.verge.test with the router, then fetches "
                        f"{PATH} twice:", clients)
            demo.kill_edge("edge-1")
            edge1 = topo.address("region-1")
            demo.wait_resolves("client-1", lambda a: a and a != edge1)
            demo.report("edge-1 killed: region-1's client is sent to its nearest healthy "
                        "neighbour:", ["client-1"])
        finally:
            demo.platform.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
