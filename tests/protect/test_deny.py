"""Deny lists (prefixes, countries, user agents), prefix sets, and the connection cap."""

from __future__ import annotations

import ipaddress
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verge.cidr import CidrSet, normalize_ip, parse_ip, parse_network
from verge.protect.deny import (
    MAX_PATTERNS,
    ConnectionCap,
    DenyList,
    UserAgentPatterns,
    compile_user_agent_pattern,
    open_country_lookup,
)

# ---- prefix sets ------------------------------------------------------------------------------

networks = st.one_of(
    st.builds(
        lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(networks, max_size=40), st.lists(st.ip_addresses(), min_size=1, max_size=40))
def test_cidr_set_is_membership(prefixes, addresses) -> None:
    """Membership as ipaddress sees it, an IPv4-mapped address being the IPv4 one (it is an
    IPv4 client on a dual-stack socket; IPv6 prefixes do not cover it)."""
    cidrs = CidrSet(prefixes)
    for address in addresses:
        plain = address.ipv4_mapped or address if address.version == 6 else address
        expected = any(plain.version == n.version and plain in n for n in prefixes)
        assert (str(address) in cidrs) == expected


def test_thousands_of_prefixes_cost_one_bisect() -> None:
    rng = random.Random(7)
    prefixes = {
        ipaddress.ip_network((rng.getrandbits(32), rng.randint(8, 32)), strict=False)
        for _ in range(5000)
    }
    cidrs = CidrSet(prefixes)
    probes = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(2000)]
    for probe in probes[:200]:
        assert (probe in cidrs) == any(ipaddress.ip_address(probe) in n for n in prefixes)
    start = time.perf_counter()
    for probe in probes:
        probe in cidrs  # noqa: B015
    assert (time.perf_counter() - start) / len(probes) < 50e-6  # ~1 µs; generous for CI


def test_ipv4_mapped_addresses_match_ipv4_prefixes() -> None:
    cidrs = CidrSet(["203.0.113.0/24"])
    assert "::ffff:203.0.113.9" in cidrs
    assert "203.0.113.9" in cidrs
    assert "2001:db8::1" not in cidrs
    assert normalize_ip("::ffff:203.0.113.9") == "203.0.113.9"
    assert normalize_ip("fe80::1%eth0") == "fe80::1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "x",
        "1.2.3.4/33",
        "::/129",
        "1.2.3.4/-1",
        "1.2.3/24",
        "203.0.113.7/24",
        "1.2.3.4/24/8",
        "a" * 10_000,
        "1.2.3.4\x00",
        "\u0661.2.3.4",
        None,
        5,
    ],
)
def test_bad_cidrs(text) -> None:
    with pytest.raises(ValueError):
        parse_network(text)
    with pytest.raises(ValueError):
        CidrSet([text])


def test_host_bits_are_explained() -> None:
    with pytest.raises(ValueError, match="did you mean 203.0.113.0/24"):
        parse_network("203.0.113.7/24")
    assert str(parse_network("203.0.113.7")) == "203.0.113.7/32"


@pytest.mark.parametrize(
    "text", ["", "::ffff:", "1.2.3.4.5", "1.2.3.4 ", "[::1]", "\x00", "1" * 100_000, "\udcff"]
)
def test_non_addresses_are_not_members(text) -> None:
    assert parse_ip(text) is None
    assert text not in CidrSet(["0.0.0.0/0", "::/0"])
    assert 12 not in CidrSet(["0.0.0.0/0"])


# ---- deny lists -------------------------------------------------------------------------------


def test_deny_reasons() -> None:
    countries = {"198.51.100.7": "DE"}
    deny = DenyList(
        ["203.0.113.0/24", "2001:db8:bad::/48"],
        ["de"],
        ["(?i)sqlmap", "^$"],
        country_of=countries.get,
    )
    assert deny.check("203.0.113.9", "Mozilla/5.0") == "cidr"
    assert deny.check("2001:db8:bad::1", None) == "cidr"
    assert deny.check("198.51.100.7", "Mozilla/5.0") == "country:DE"
    assert deny.check("192.0.2.1", "sqlmap/1.7 (https://sqlmap.org)") == "user-agent#0"
    assert deny.check("192.0.2.1", "SQLMap") == "user-agent#0"
    assert deny.check("192.0.2.1", "") == "user-agent#1"
    assert deny.check("192.0.2.1", "Mozilla/5.0") is None
    assert deny.check("192.0.2.1", None) is None
    assert deny.check_address("not an address") is None
    assert not DenyList()


def test_countries_need_a_lookup_and_survive_its_failures() -> None:
    with pytest.raises(ValueError):
        DenyList(countries=["DE"])

    def broken(address: str) -> str | None:
        raise ValueError("corrupt database")

    assert DenyList(countries=["DE"], country_of=broken).check("192.0.2.1", None) is None


def test_country_lookup_on_a_maxmind_database(tmp_path) -> None:
    mmdb_writer = pytest.importorskip("mmdb_writer")
    from netaddr import IPSet

    writer = mmdb_writer.MMDBWriter(ip_version=4, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"registered_country": {"iso_code": "JP"}})
    path = tmp_path / "geo.mmdb"
    writer.to_db_file(str(path))
    deny = DenyList(countries=["DE", "JP"], country_of=open_country_lookup(str(path)))
    assert deny.check("198.51.100.7", None) == "country:DE"
    assert deny.check("203.0.113.7", None) == "country:JP"
    assert deny.check("192.0.2.1", None) is None
    with pytest.raises(ValueError):
        open_country_lookup(str(tmp_path / "missing.mmdb"))


@pytest.mark.parametrize(
    "pattern", [r"(a+)+$", r"(a|aa)*b", r"(.*a){20}", r"(\w+\s?)*!", r"((a*)*)*x", r"(?i)(x+x+)+y"]
)
def test_catastrophic_patterns_run_in_linear_time(pattern) -> None:
    """Each of these takes Python's re seconds to years on such input; RE2 milliseconds."""
    patterns = UserAgentPatterns([pattern])
    hostile = "a" * 20_000 + "!" + "x" * 20_000
    start = time.perf_counter()
    patterns.match(hostile)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "pattern",
    [
        r"(a)\1",
        r"(?=x)",
        r"(?<=x)y",
        r"(?!x)",
        "[",
        "",
        "a" * 257,
        r"(a{1000}){1000}",
        r"a{1001}",
        None,
    ],
)
def test_unsafe_or_bad_patterns_are_refused(pattern) -> None:
    with pytest.raises(ValueError):
        compile_user_agent_pattern(pattern)


def test_pattern_count_is_bounded_and_results_memoised() -> None:
    with pytest.raises(ValueError):
        UserAgentPatterns(["x"] * (MAX_PATTERNS + 1))
    patterns = UserAgentPatterns([f"bot{n};" for n in range(MAX_PATTERNS)])
    assert patterns.match("a bot63; b") == 63
    assert patterns.match("a bot63; bot7;") == 7  # the first pattern wins, not the first hit
    for n in range(10_000):
        patterns.match(f"Mozilla/{n}")
    assert len(patterns._memo) <= 4096
    assert patterns.match("x" * 100_000) is None  # long agents are matched, not memoised


# ---- connection cap ---------------------------------------------------------------------------


def test_connection_cap() -> None:
    cap = ConnectionCap(2, exempt=["10.0.0.0/8"])
    assert cap.opened("192.0.2.1") and cap.opened("192.0.2.1")
    assert not cap.opened("192.0.2.1")
    assert cap.refused == 1 and cap.count("192.0.2.1") == 2
    cap.closed("192.0.2.1")
    assert cap.opened("192.0.2.1")
    assert all(cap.opened("10.1.1.1") for _ in range(100))  # a trusted proxy
    assert cap.count("10.1.1.1") == 0
    for _ in range(5):
        cap.closed("192.0.2.1")  # closing more than opened does not go negative
    assert cap.count("192.0.2.1") == 0 and len(cap) == 0
    cap.closed("10.1.1.1")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            ConnectionCap(bad)
