"""The multi-region simulation end to end: each region's user gets its own edge, and failover."""

from __future__ import annotations

import shutil

import pytest

from verge.demo.netsim import Topology, preflight
from verge.demo.regions import RegionsDemo

REASON = preflight() or (None if shutil.which("dig") and shutil.which("curl")
                         else "dig and curl are needed")
pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def test_users_reach_their_nearest_edge_and_move_when_it_dies(tmp_path):
    with Topology(3, tag="t") as topo:
        demo = RegionsDemo(topo, tmp_path)
        try:
            demo.start()
            edges = {i: topo.address(f"region-{i}") for i in (1, 2, 3)}
            for i in (1, 2, 3):
                assert demo.wait_resolves(f"client-{i}", lambda a, i=i: a == edges[i])
            demo.fetch_ms("client-1", edges[1])  # fill edge-1's cache
            local = min(demo.fetch_ms("client-1", edges[1]) for _ in range(3))
            far = min(demo.fetch_ms("client-1", edges[3]) for _ in range(3))
            assert local < 60 and far > 120 > local  # 5 ms vs 120 ms RTT, two round trips
            demo.kill_edge("edge-1")
            # health interval + TTL later, region 1's user is on its nearest neighbour, region 2
            assert demo.wait_resolves("client-1", lambda a: a == edges[2]) == edges[2]
        finally:
            demo.platform.stop()
