"""Hostname ownership rules (verge.control.hostnames), without a database.

Zones, which service hosts a zone lets a tenant claim, wildcard coverage as the edge routes
(any depth) versus as certificates match (one label, RFC 6125), the names a tenant's
certificate may be used for, and the conflicts an admin sees.
"""

from __future__ import annotations

import pytest

from verge.control.hostnames import (
    Claim,
    HostIndex,
    Zone,
    ZoneError,
    covers,
    hostname_report,
    normalize_zone,
    san_touches_zones,
    usable_names,
    wildcard_clashes,
    zone_for_host,
    zones_overlap,
)

A, B, FLEET = 1, 2, 9


@pytest.mark.parametrize(
    ("text", "zone"),
    [
        ("Example.COM.", "example.com"),
        (" shop.example.com ", "shop.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_zones_are_normalised(text: str, zone: str) -> None:
    assert normalize_zone(text) == zone


@pytest.mark.parametrize("text", ["com", "*.example.com", "127.0.0.1", "exa mple.com", "", "a..b"])
def test_unusable_zones_are_refused(text: str) -> None:
    with pytest.raises(ZoneError):
        normalize_zone(text)


def test_zones_overlap_when_one_is_inside_the_other() -> None:
    assert zones_overlap("example.com", "shop.example.com")
    assert zones_overlap("shop.example.com", "example.com")
    assert zones_overlap("example.com", "example.com")
    assert not zones_overlap("example.com", "myexample.com")
    assert not zones_overlap("a.example.com", "b.example.com")


@pytest.mark.parametrize(
    ("host", "zone"),
    [
        ("example.com", "example.com"),
        ("www.example.com", "example.com"),
        ("a.b.example.com", "example.com"),
        ("*.example.com", "example.com"),
        ("*.sub.example.com", "example.com"),
        ("x.shop.example.com", "shop.example.com"),  # the most specific zone
        ("*.com", None),  # a wildcard needs its parent inside a zone
        ("myexample.com", None),
        ("*", None),
        ("10.0.0.1", None),
    ],
)
def test_which_zone_lets_a_tenant_claim_a_host(host: str, zone: str | None) -> None:
    assert zone_for_host(host, ["example.com", "shop.example.com"]) == zone


def test_a_wildcard_certificate_name_touches_a_zone_it_matches_one_name_of() -> None:
    assert san_touches_zones("*.verge.test", ["b.verge.test"])  # matches the zone apex
    assert san_touches_zones("*.b.verge.test", ["b.verge.test"])
    assert san_touches_zones("www.b.verge.test", ["b.verge.test"])
    assert not san_touches_zones("*.test", ["b.verge.test"])  # two labels away
    assert not san_touches_zones("demo.verge.test", ["b.verge.test"])


def test_service_wildcards_cover_any_depth() -> None:
    assert covers("*.verge.test", "demo.verge.test")
    assert covers("*.verge.test", "x.demo.verge.test")
    assert covers("*.verge.test", "*.demo.verge.test")
    assert not covers("*.verge.test", "verge.test")
    assert not covers("*.verge.test", "*.verge.test")
    assert not covers("demo.verge.test", "x.demo.verge.test")
    assert not covers("*.demo.verge.test", "demo.verge.test")


def test_wildcard_clashes_are_across_tenants_only() -> None:
    claims = [Claim("demo.verge.test", "a-web", A, "a"), Claim("b.verge.test", "b-web", B, "b")]
    assert wildcard_clashes("*.verge.test", B, claims) == [claims[0]]
    assert wildcard_clashes("*.demo.verge.test", A, claims) == []
    assert wildcard_clashes("x.b.verge.test", A, [Claim("*.b.verge.test", "b", B, "b")])


def _index(*claims: tuple[str, int]) -> HostIndex:
    return HostIndex.of(Claim(host, f"svc-{host}", tenant) for host, tenant in claims)


def test_hosts_resolve_like_the_edge_routes_them() -> None:
    index = _index(("*.verge.test", B), ("demo.verge.test", A), ("*.demo.verge.test", A))
    assert index.owner("demo.verge.test").tenant_id == A
    assert index.owner("x.demo.verge.test").tenant_id == A  # the most specific wildcard
    assert index.owner("y.x.demo.verge.test").tenant_id == A
    assert index.owner("other.verge.test").tenant_id == B
    assert index.owner("verge.test") is None


def test_a_tenant_certificate_is_cut_down_to_the_tenants_own_hosts() -> None:
    index = _index(("demo.verge.test", A), ("*.demo.verge.test", A), ("b.verge.test", B))
    # B's *.verge.test: only B's own host one label below, never demo.verge.test
    assert usable_names(["*.verge.test"], B, index) == ["b.verge.test"]
    assert usable_names(["*.verge.test", "demo.verge.test"], B, index) == ["b.verge.test"]
    # A's wildcard is A's whole: A's service wildcard serves every name one label below
    assert usable_names(["*.demo.verge.test", "demo.verge.test"], A, index) == [
        "*.demo.verge.test",
        "demo.verge.test",
    ]
    assert usable_names(["nobody.verge.test"], A, index) == []


def test_a_wildcard_certificate_shrinks_where_another_tenant_has_a_host_below_it() -> None:
    # legacy data: B's wildcard over A's exact host (no longer accepted, still possible)
    index = _index(("*.verge.test", B), ("demo.verge.test", A), ("b.verge.test", B))
    assert usable_names(["*.verge.test"], B, index) == ["b.verge.test"]
    assert usable_names(["*.verge.test"], A, index) == ["demo.verge.test"]


def test_the_report_lists_zones_wildcards_and_conflicts() -> None:
    zones = [Zone("demo.verge.test", A, "a"), Zone("b.verge.test", B, "b")]
    claims = [
        Claim("demo.verge.test", "a-web", A, "a"),
        Claim("x.demo.verge.test", "squat", B, "b"),
        Claim("*.verge.test", "wide", B, "b"),
        Claim("b.verge.test", "b-web", B, "b"),
        Claim("ops.verge.test", "ops", FLEET, "default"),
    ]
    rows = {row["host"]: row for row in hostname_report(claims, zones, FLEET)}
    assert rows["demo.verge.test"]["zone"] == "demo.verge.test"
    kinds = {host: sorted(c["kind"] for c in row["conflicts"]) for host, row in rows.items()}
    assert kinds == {
        "demo.verge.test": ["wildcard_overlap"],
        "x.demo.verge.test": ["in_foreign_zone"],  # B's own wildcard covers it: no overlap
        "*.verge.test": ["outside_zones"],
        "b.verge.test": [],
        "ops.verge.test": ["wildcard_overlap"],  # no zone needed, but B's wildcard covers it
    }
    assert [w["service"] for w in rows["demo.verge.test"]["covered_by"]] == ["wide"]
    overlap = rows["demo.verge.test"]["conflicts"][0]
    assert overlap["other_tenant"] == "b" and "*.verge.test" in overlap["message"]
