"""Region selection, rendezvous hashing, health transitions and the routing table (no I/O)."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from verge.config import ConfigError
from verge.config.router import RegionSpec, RouterConfig, load_router_config
from verge.health import HealthState
from verge.routing.geo import RegionMap
from verge.routing.hashing import rank
from verge.routing.table import Edge, RoutingTable, edge_addresses

ip = ipaddress.ip_address


# ----- hashing ---------------------------------------------------------------------------------
def test_rank_is_stable_and_spreads_keys():
    members = ["a", "b", "c", "d"]
    owners = Counter(rank(f"/object/{i}", members)[0] for i in range(4000))
    assert set(owners) == set(members)
    assert all(800 < count < 1200 for count in owners.values()), owners
    assert rank("/x", members) == rank("/x", list(reversed(members)))


def test_removing_a_member_moves_only_its_keys():
    members = ["a", "b", "c", "d"]
    keys = [f"/k{i}" for i in range(2000)]
    before = {k: rank(k, members)[0] for k in keys}
    after = {k: rank(k, ["a", "b", "d"])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "c" for k in moved)
    # and the new owner is the old second choice: the ranking is the failover order
    assert all(after[k] == rank(k, members)[1] for k in moved)


def test_weights_skew_ownership():
    owners = Counter(rank(f"k{i}", ["big", "small"], weight=lambda m: 3.0 if m == "big" else 1.0)[0]
                     for i in range(4000))
    assert 2700 < owners["big"] < 3300


# ----- regions ---------------------------------------------------------------------------------
def _regions() -> RegionMap:
    return RegionMap([
        RegionSpec(name="east", cidrs=["10.1.0.0/16", "192.0.2.0/24"], neighbours=["west"]),
        RegionSpec(name="west", cidrs=["10.2.0.0/16", "10.1.7.0/24"], neighbours=["east"]),
        RegionSpec(name="south", cidrs=["2001:db8::/32"]),
    ])


def test_longest_prefix_wins_and_scope_is_the_prefix():
    regions = _regions()
    assert regions.place(ip("10.1.3.4")).region == "east"
    assert regions.place(ip("10.1.3.4")).scope == 16
    assert regions.place(ip("10.1.7.9")).region == "west"  # the /24 inside east's /16
    assert regions.place(ip("10.1.7.9")).scope == 24
    assert regions.place(ip("2001:db8::1")).region == "south"


def test_unknown_clients_go_to_the_default_region_with_a_narrow_scope():
    regions = _regions()
    placed = regions.place(ip("203.0.113.9"))
    assert (placed.region, placed.scope) == ("east", 24)
    assert RegionMap(_regions_specs(), default_region="west").place(ip("8.8.8.8")).region == "west"
    assert regions.place(None).region == "east"


def _regions_specs():
    return [RegionSpec(name="east"), RegionSpec(name="west")]


def test_geoip_database_maps_countries_and_continents(tmp_path):
    mmdb_writer = pytest.importorskip("mmdb_writer")
    from netaddr import IPSet

    writer = mmdb_writer.MMDBWriter(ip_version=4, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["198.51.100.0/24"]),
                          {"country": {"iso_code": "DE"}, "continent": {"code": "EU"}})
    writer.insert_network(IPSet(["203.0.113.0/24"]),
                          {"country": {"iso_code": "JP"}, "continent": {"code": "AS"}})
    path = tmp_path / "geo.mmdb"
    writer.to_db_file(str(path))
    regions = RegionMap([RegionSpec(name="eu", countries=["de"]),
                         RegionSpec(name="asia", continents=["AS"]),
                         RegionSpec(name="lab", cidrs=["198.51.100.128/25"])], geoip=path)
    assert regions.place(ip("198.51.100.7")) .region == "eu"
    assert regions.place(ip("198.51.100.7")).scope == 24
    assert regions.place(ip("198.51.100.200")).region == "lab"  # the CIDR map comes first
    assert regions.place(ip("203.0.113.5")).region == "asia"
    assert regions.place(ip("192.0.2.1")).region == "eu"  # not in the database: default
    regions.close()


# ----- health ----------------------------------------------------------------------------------
def test_health_hysteresis():
    state = HealthState(fails_to_down=3, passes_to_up=2)
    assert not state.record(False) and not state.record(False) and state.up
    assert state.record(False) and not state.up  # the third failure flips it
    assert not state.record(True) and not state.up  # one pass is not enough
    assert not state.record(False)  # and a failure resets the streak
    assert not state.record(True)
    assert state.record(True) and state.up
    assert state.view()["state"] == "up"


# ----- the table -------------------------------------------------------------------------------
def _edge(name, region, address, up=True):
    return Edge(name, region, f"http://{address}:8080", edge_addresses(f"http://{address}:8080"),
                up=up)


def _table(edges, affinity=False, answers=1):
    return RoutingTable(
        zone="verge.test", ttl=10, serial=1, regions=_regions(),
        neighbours={"east": ["west"], "west": ["east"], "south": ["west"]},
        edges=edges, hostnames=["demo.verge.test", "*.img.verge.test"],
        nameservers=[("ns1.verge.test", ("127.0.0.1",))], affinity=affinity, answers=answers)


FLEET = [_edge("e1", "east", "127.0.0.2"), _edge("w1", "west", "127.0.0.3"),
         _edge("s1", "south", "127.0.0.4")]


def test_clients_get_their_region_then_neighbours_then_the_rest():
    table = _table(FLEET)
    assert [e.name for e in table.choose(ip("10.1.0.1"))] == ["e1", "w1", "s1"]
    assert [e.name for e in table.choose(ip("10.2.0.1"))] == ["w1", "e1", "s1"]
    assert [e.name for e in table.choose(ip("2001:db8::5"))] == ["s1", "w1", "e1"]


def test_down_edges_are_skipped_until_all_are_down():
    down_east = [_edge("e1", "east", "127.0.0.2", up=False), *FLEET[1:]]
    assert table_names(_table(down_east), "10.1.0.1") == ["w1", "s1"]
    all_down = [_edge(e.name, e.region, e.url.split("//")[1].split(":")[0], up=False) for e in FLEET]
    assert table_names(_table(all_down), "10.1.0.1") == ["e1", "w1", "s1"]


def table_names(table, client):
    return [e.name for e in table.choose(ip(client))]


def test_affinity_keeps_a_url_on_one_edge_of_the_region():
    fleet = [_edge(f"e{i}", "east", f"127.0.1.{i}") for i in range(1, 5)]
    with_affinity = _table(fleet, affinity=True)
    owners = {with_affinity.choose(ip(f"10.1.{i}.1"), key="/video/1.ts")[0].name for i in range(50)}
    assert len(owners) == 1
    spread = {with_affinity.choose(ip("10.1.0.1"), key=f"/v/{i}")[0].name for i in range(50)}
    assert len(spread) == 4
    without = _table(fleet)
    by_client = {without.choose(ip(f"10.1.{i}.1"), key="/video/1.ts")[0].name for i in range(50)}
    assert len(by_client) > 1  # clients spread, each sticking to its edge
    assert without.choose(ip("10.1.9.1"))[0] == without.choose(ip("10.1.9.1"))[0]


def test_resolve_names_in_the_zone():
    table = _table(FLEET, answers=2)
    answer = table.resolve("demo.verge.test", ip("10.2.3.4"))
    assert answer.ipv4 == ("127.0.0.3", "127.0.0.2") and answer.scope_prefix == 16
    assert table.resolve("cdn.img.verge.test", ip("10.1.3.4")).ipv4[0] == "127.0.0.2"
    assert table.resolve("w1.demo.verge.test", ip("10.1.0.1")).ipv4 == ("127.0.0.3",)
    assert table.resolve("e1.verge.test", None).ipv4 == ("127.0.0.2",)
    assert table.resolve("ns1.verge.test", None).ipv4 == ("127.0.0.1",)
    assert table.resolve("verge.test", None).ipv4 == ()  # the apex exists, without addresses
    assert table.resolve("nope.verge.test", None) is None
    assert table.resolve("x1.demo.verge.test", None) is None  # no such edge


# ----- settings --------------------------------------------------------------------------------
def test_router_config_checks_references(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("zone: verge.test\nregions:\n  - name: east\n    neighbours: [west]\n")
    with pytest.raises(ConfigError) as caught:
        load_router_config(path)
    assert "router.yaml:4" in str(caught.value) and "'west' is not another region" in str(caught.value)
    path.write_text("zone: verge.test\nhostnames: [demo.example.com]\n")
    with pytest.raises(ConfigError, match="outside the zone"):
        load_router_config(path)
    path.write_text("zone: verge.test\nregion: []\n")
    with pytest.raises(ConfigError, match="did you mean 'regions'"):
        load_router_config(path)
    ok = RouterConfig.model_validate({"zone": "Verge.Test.", "health": {"interval": "500ms"}})
    assert ok.zone == "verge.test" and ok.health.interval == 0.5


def test_scope_narrows_when_the_answer_depends_on_the_clients_network():
    two_east = [_edge("e1", "east", "127.0.0.2"), _edge("e2", "east", "127.0.0.5"),
                _edge("w1", "west", "127.0.0.3")]
    assert _table(two_east).resolve("demo.verge.test", ip("10.1.3.4")).scope_prefix == 24
    assert _table(two_east, affinity=True).resolve("demo.verge.test", ip("10.1.3.4")).scope_prefix == 16
    assert _table(FLEET).resolve("demo.verge.test", ip("10.1.3.4")).scope_prefix == 16
    # the same /24 always gets the same edge
    table = _table(two_east)
    assert len({table.choose(ip(f"10.1.3.{i}"))[0].name for i in range(1, 50)}) == 1


def test_router_cli_reports_an_unreadable_geoip_database(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "router.yaml"
    config.write_text('zone: verge.test\ngeoip: /nonexistent.mmdb\n'
                      'edges: [{name: e, url: "http://127.0.0.2:1"}]\n')
    out = subprocess.run([sys.executable, "-m", "verge.cli", "router", "--config", str(config),
                          "--dns", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "geoip: cannot open /nonexistent.mmdb" in out.stderr
    assert "Traceback" not in out.stderr
