"""Cache keys: RFC 3986 normalisation, query handling, key headers, prefixes, URLs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verge.cache.keys import (
    CacheKey,
    cache_key,
    key_for_url,
    key_prefix,
    normalize_path,
    normalize_query,
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "/"),
        ("/a/b.css", "/a/b.css"),
        ("", "/"),
        ("a/b", "/a/b"),
        # unreserved escapes are decoded, in either hex case
        ("/%7Euser", "/~user"),
        ("/%7euser", "/~user"),
        ("/%41%62%2D%2e%5F", "/Ab-._"),
        # reserved and other escapes stay encoded, hex upper-cased
        ("/a%2Fb", "/a%2Fb"),
        ("/a%2fb", "/a%2Fb"),
        ("/a%3fb%23c%25d", "/a%3Fb%23c%25d"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
        # %25 decodes to nothing: '%2541' must not become 'A'
        ("/%2541", "/%2541"),
        # malformed escapes are left alone
        ("/100%", "/100%"),
        ("/%zz/%4", "/%zz/%4"),
        # dot segments
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/..", "/"),
        ("/../../a", "/a"),
        ("/a/../../b", "/b"),
        ("/a//../b", "/b"),  # slashes merged first (as the edge does)
        ("//a///b", "/a/b"),
        ("/a/.b/..c/...", "/a/.b/..c/..."),
        ("/.well-known/x", "/.well-known/x"),
        # escaped dots are decoded first, then removed (§6.2.2 order)
        ("/a/%2E%2E/b", "/b"),
        ("/a/%2e/b", "/a/b"),
        # raw '+' and sub-delims untouched
        ("/a+b;c=d,e", "/a+b;c=d,e"),
    ],
)
def test_normalize_path(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


def test_normalize_path_common_case_returns_same_object() -> None:
    path = "/static/app.js"
    assert normalize_path(path) is path


_PATH_PIECES = st.sampled_from(
    ["/", ".", "..", "a", "Z", "~", "+", "%2e", "%2E", "%2f", "%7e", "%25", "%c3", "%41"]
)


@given(st.lists(_PATH_PIECES, max_size=12).map("".join))
def test_normalize_path_is_idempotent_and_dot_free(path: str) -> None:
    once = normalize_path(path)
    assert normalize_path(once) == once
    assert once.startswith("/")
    segments = once.split("/")
    assert "." not in segments and ".." not in segments


@pytest.mark.parametrize(
    ("query", "kwargs", "expected"),
    [
        ("", {}, ""),
        ("b=2&a=1", {}, "b=2&a=1"),
        ("b=2&a=1", {"drop": True}, ""),
        ("b=2&a=1", {"sort": True, "drop": True}, ""),
        ("b=2&a=1", {"sort": True}, "a=1&b=2"),
        ("a=2&a=1&b", {"sort": True}, "a=1&a=2&b"),
        ("&&b=1&&a=1&", {"sort": True}, "a=1&b=1"),
        # stable: equal parts keep their order; "a" and "a=" share key and value
        ("a=&a&a=", {"sort": True}, "a=&a&a="),
        # escapes normalised in both modes; reserved ones kept
        ("x=%7e%2f", {}, "x=~%2F"),
        ("b=%7e&a=%26", {"sort": True}, "a=%26&b=~"),
        ("%62=1&a=2", {"sort": True}, "a=2&b=1"),
        # '+' kept as is
        ("q=a+b&p=c%20d", {"sort": True}, "p=c%20d&q=a+b"),
    ],
)
def test_normalize_query(query: str, kwargs: dict[str, bool], expected: str) -> None:
    assert normalize_query(query, **kwargs) == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("example.com", "/a/b", "x=1&y=2"), {}, "example.com/a/b?x=1&y=2"),
        (("Example.COM:8080", "/", ""), {}, "example.com/"),
        (("[::1]:8080", "/a", ""), {}, "[::1]/a"),
        (("[::1]", "/a", ""), {}, "[::1]/a"),
        (("example.com", "/a/./%7ex", ""), {}, "example.com/a/~x"),
        (("h", "/", "y=2&x=1"), {"sort_query": True}, "h/?x=1&y=2"),
        (("h", "/", "y=2&x=1"), {"ignore_query": True}, "h/"),
        (("h", "/", "&&"), {"sort_query": True}, "h/"),
        (("h", "", ""), {}, "h/"),
    ],
)
def test_cache_key(args: tuple[str, str, str], kwargs: dict[str, bool], expected: str) -> None:
    assert cache_key(*args, **kwargs) == expected


def test_cache_key_headers_sorted_and_lowercased() -> None:
    key = cache_key(
        "h",
        "/a",
        "q=1",
        key_headers=("X-Device", "Accept-Language"),
        request_headers={"accept-language": " fr ", "x-device": "mobile"},
    )
    assert key == "h/a?q=1\naccept-language:fr\nx-device:mobile"


def test_cache_key_headers_lookup_is_case_insensitive() -> None:
    key = cache_key("h", "/", "", key_headers=("x-device",), request_headers={"X-Device": "tv"})
    assert key == "h/\nx-device:tv"


def test_cache_key_header_values_make_different_keys() -> None:
    def key(headers: dict[str, str] | None) -> str:
        return cache_key("h", "/", "", key_headers=("X-Device",), request_headers=headers)

    keys = {key({"x-device": "mobile"}), key({"x-device": "desktop"}), key({"x-device": ""})}
    keys |= {key({}), key(None)}
    assert len(keys) == 4  # absent (no ':') differs from present-but-empty
    assert key(None) == "h/\nx-device"


def test_cache_key_duplicate_key_header_names_appear_once() -> None:
    key = cache_key("h", "/", "", key_headers=("A", "a"), request_headers={"a": "1"})
    assert key == "h/\na:1"


def test_equivalent_urls_share_a_key() -> None:
    assert cache_key("EXAMPLE.com:443", "/%7Ea/./b", "") == cache_key("example.com", "/~a/b", "")
    assert cache_key("h", "/a%2fb", "") != cache_key("h", "/a/b", "")


@pytest.mark.parametrize(
    ("host", "prefix", "expected"),
    [
        ("Example.com:80", "/img/", "example.com/img/"),
        ("example.com", "", "example.com/"),
        ("example.com", "/a/%7e/../b", "example.com/a/b"),
    ],
)
def test_key_prefix(host: str, prefix: str, expected: str) -> None:
    assert key_prefix(host, prefix) == expected


def test_key_prefix_matches_keys_under_it_only() -> None:
    prefix = key_prefix("example.com", "/img/")
    assert cache_key("example.com", "/img/a.png", "v=1").startswith(prefix)
    assert cache_key("EXAMPLE.COM", "/img/b/%7ec.png", "").startswith(prefix)
    assert not cache_key("example.com", "/images/a.png", "").startswith(prefix)
    assert not cache_key("example.community", "/img/a.png", "").startswith(prefix)
    whole_host = key_prefix("example.com", "")
    assert cache_key("example.com", "/", "").startswith(whole_host)
    assert not cache_key("example.community", "/", "").startswith(whole_host)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/a?b", "example.com/a?b"),
        ("https://Example.com:8443/a/../%7Eb?y=2&x=1#frag", "example.com/~b?y=2&x=1"),
        ("http://user:pw@example.com/a", "example.com/a"),
        ("http://example.com", "example.com/"),
        ("//example.com/a", "example.com/a"),
        ("example.com/a?q", "example.com/a?q"),
        ("http://[::1]:8080/a", "[::1]/a"),
    ],
)
def test_key_for_url(url: str, expected: str) -> None:
    assert key_for_url(url) == expected


def test_key_for_url_matches_cache_key() -> None:
    assert key_for_url("http://Example.com:80/x/./y?a=%7e") == cache_key(
        "example.com", "/x/y", "a=~"
    )


def _rule(**settings) -> SimpleNamespace:
    return SimpleNamespace(**{"sort_query": False, "ignore_query": False, "key_headers": (),
                              **settings})


def test_cache_key_value_without_rule_is_the_default_key() -> None:
    key = CacheKey.under(None, "Example.com:8080", "/a/./b", "y=2&x=1")
    assert key.text == key.url == cache_key("example.com", "/a/b", "y=2&x=1")
    assert key.scope() == ("url", key.text)


def test_cache_key_value_folds_the_query_as_its_rule_says() -> None:
    assert CacheKey.under(_rule(sort_query=True), "h", "/p", "y=2&x=1").text == "h/p?x=1&y=2"
    assert CacheKey.under(_rule(ignore_query=True), "h", "/p", "utm=1").text == "h/p"


def test_cache_key_value_with_key_headers_invalidates_every_header_variant() -> None:
    rule = _rule(key_headers=("X-Tenant",))
    a = CacheKey.under(rule, "h", "/api", "", {"x-tenant": "a"})
    b = CacheKey.under(rule, "h", "/api", "", {"x-tenant": "b"})
    bare = CacheKey.under(rule, "h", "/api", "")  # an unsafe method's invalidation
    assert a.url == b.url == bare.url == "h/api" and a.text != b.text
    kind, prefix = bare.scope()
    assert kind == "prefix" and a.text.startswith(prefix) and b.text.startswith(prefix)
    # a longer path is not swept along: the prefix ends with the key-header separator
    assert not CacheKey.under(rule, "h", "/api2", "", {"x-tenant": "a"}).text.startswith(prefix)
