"""Rate-limit keys: the client address through trusted proxies, and credential keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verge.http.message import Request
from verge.protect.keys import (
    ClientAddresses,
    check_key_spec,
    compile_key,
    cookie_value,
    steerable,
)

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::/48"]


def request(client: str = "192.0.2.1", headers=(), target: str = "/") -> Request:
    return Request("GET", target, headers=list(headers), client=client)


# ---- client address ---------------------------------------------------------------------------


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    addresses = ClientAddresses()
    spoofed = request("192.0.2.1", [("X-Forwarded-For", "203.0.113.9")])
    assert addresses.address(spoofed) == "192.0.2.1"
    assert addresses.key(spoofed) == "192.0.2.1"


def test_an_untrusted_peer_cannot_spoof_x_forwarded_for() -> None:
    addresses = ClientAddresses(PROXIES)
    spoofed = request("192.0.2.1", [("X-Forwarded-For", "10.1.1.1, 203.0.113.9")])
    assert addresses.key(spoofed) == "192.0.2.1"


def test_the_rightmost_untrusted_hop_is_the_client() -> None:
    addresses = ClientAddresses(PROXIES)
    # The client wrote "1.1.1.1" itself; its real address is what the first proxy appended.
    chain = request("10.0.0.2", [("X-Forwarded-For", "1.1.1.1, 198.51.100.7, 10.9.9.9")])
    assert addresses.key(chain) == "198.51.100.7"
    # Several fields are one list, in order.
    split = request(
        "10.0.0.2", [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "198.51.100.7, 10.9.9.9")]
    )
    assert addresses.key(split) == "198.51.100.7"


def test_only_proxies_means_the_leftmost_proxy() -> None:
    addresses = ClientAddresses(PROXIES)
    assert addresses.key(request("10.0.0.2", [("X-Forwarded-For", "10.3.3.3")])) == "10.3.3.3"
    assert addresses.key(request("10.0.0.2")) == "10.0.0.2"  # no header: the proxy itself


@pytest.mark.parametrize(
    "hop",
    [
        "unknown",
        "",
        "999.1.1.1",
        "_hidden",
        "[::1",
        "a" * 5000,
        "1.2.3.4\x00",
        "1.2.3.4 5.6.7.8",
        "\u0661.1.1.1",
    ],
)
def test_garbage_stops_at_the_last_trusted_proxy(hop) -> None:
    addresses = ClientAddresses(PROXIES)
    garbage = request("10.0.0.2", [("X-Forwarded-For", f"198.51.100.7, {hop}, 10.9.9.9")])
    assert addresses.key(garbage) == "10.9.9.9"


@pytest.mark.parametrize(
    "hop,client",
    [
        ("198.51.100.7:4711", "198.51.100.7"),
        ("[2001:db8::7]:443", "2001:db8::/64"),
        ("2001:db8::7", "2001:db8::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        (" 198.51.100.7 ", "198.51.100.7"),
    ],
)
def test_hop_forms(hop, client) -> None:
    addresses = ClientAddresses(PROXIES)
    assert addresses.key(request("10.0.0.2", [("X-Forwarded-For", hop)])) == client


def test_a_long_chain_is_read_only_so_far() -> None:
    addresses = ClientAddresses(PROXIES, max_hops=16)
    chain = ", ".join(["198.51.100.7"] + ["10.0.0.1"] * 10_000)
    assert addresses.key(request("10.0.0.2", [("X-Forwarded-For", chain)])) == "10.0.0.1"


def test_ipv6_clients_are_keyed_by_their_prefix() -> None:
    addresses = ClientAddresses()
    one = addresses.key(request("2001:db8:1:2:aaaa::1"))
    assert one == addresses.key(request("2001:db8:1:2:ffff::9")) == "2001:db8:1:2::/64"
    assert addresses.key(request("2001:db8:1:3::1")) != one
    assert addresses.key(request("::ffff:192.0.2.1")) == "192.0.2.1"
    assert ClientAddresses(ipv6_prefix=128).key(request("2001:db8::1")) == "2001:db8::1"
    assert ClientAddresses(ipv6_prefix=48).key(request("2001:db8:1:2::1")) == "2001:db8:1::/48"
    assert addresses.peer_key("2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert addresses.address(request("::ffff:192.0.2.1")) == "192.0.2.1"


def test_the_memo_stays_bounded() -> None:
    addresses = ClientAddresses()
    for n in range(20_000):
        addresses.key(request(f"2001:db8:{n:x}::1"))
    assert len(addresses._memo) <= 4096


# ---- key specs and credential keys ------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "ip",
        "header:",
        "header:bad name",
        "cookie:a=b",
        "client_ip+client_ip",
        "a+b+c+d+e",
        "header:x" * 100,
        "client_ip+",
        "query:x",
        "header:\u00e9",
    ],
)
def test_bad_key_specs(spec) -> None:
    with pytest.raises(ValueError):
        check_key_spec(spec)


def test_key_spec_normalisation_and_steerability() -> None:
    assert check_key_spec("header:X-Api-Key+cookie:Session") == [
        "header:x-api-key",
        "cookie:Session",
    ]
    assert steerable("client_ip+path")
    assert not steerable("header:X-Api-Key")


def test_header_keys_fall_back_to_the_client_without_colliding() -> None:
    key = compile_key("header:X-Api-Key", ClientAddresses())
    with_key = key(request("192.0.2.1", [("X-Api-Key", "secret")]))
    assert with_key == key(request("198.51.100.1", [("x-api-key", "secret")]))  # any address
    without = key(request("192.0.2.1"))
    posing = key(request("198.51.100.9", [("X-Api-Key", "!192.0.2.1")]))
    assert len({with_key, without, posing}) == 3


@given(
    st.lists(st.text(max_size=300), min_size=2, max_size=2),
    st.lists(st.text(max_size=300), min_size=2, max_size=2),
)
def test_combined_keys_are_injective(first, second) -> None:
    """Two requests share a key only when every part is equal, whatever bytes they hold."""
    key = compile_key("header:A+header:B", ClientAddresses())

    def make(values: list[str]) -> Request:
        return request(headers=[("A", values[0]), ("B", values[1])])

    assert (key(make(first)) == key(make(second))) == (first == second)


def test_odd_and_huge_values_are_bounded() -> None:
    key = compile_key("header:X-Api-Key", ClientAddresses())
    huge = key(request(headers=[("X-Api-Key", "é\x00\x7f" * 3000)]))
    assert len(huge) <= 40
    assert huge != key(request(headers=[("X-Api-Key", "é\x00\x7f" * 3001)]))
    assert key(request(headers=[("X-Api-Key", "\udcff")])).startswith("=")


def test_path_and_combined_keys() -> None:
    addresses = ClientAddresses()
    by_path = compile_key("path", addresses)
    assert by_path(request(target="/a?x=1")) == by_path(request("198.51.100.1", target="/a"))
    both = compile_key("client_ip+path", addresses)
    assert both(request("192.0.2.1", target="/a")) != both(request("192.0.2.2", target="/a"))
    assert both(request("192.0.2.1", target="/a")) != both(request("192.0.2.1", target="/b"))


def test_cookie_values() -> None:
    assert cookie_value("a=1; session=abc; b=2", "session") == "abc"
    assert cookie_value('session="quoted"', "session") == "quoted"
    assert cookie_value("a=1, session=joined", "session") == "joined"  # HTTP/2 split fields
    assert cookie_value("xsession=1", "session") is None
    assert cookie_value("session", "session") is None
    assert cookie_value(None, "session") is None
    assert cookie_value("Session=1", "session") is None  # names are case-sensitive
    assert cookie_value(";" * 10_000 + "session=z", "session") == "z"
    key = compile_key("cookie:session", ClientAddresses())
    assert key(request(headers=[("Cookie", "session=abc")])) == "=abc"
    assert key(request("192.0.2.5")) == "!192.0.2.5"
