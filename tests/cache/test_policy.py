"""Table-driven tests of verge.cache.policy against RFC 9111 / 9110 cases.

Many rows mirror cases of the cache-tests.fyi suite (ids noted in the row names), since
that suite is what the edge's conformance is measured by.
"""

from __future__ import annotations

import json

import pytest

from verge.cache.policy import (
    HEURISTICALLY_CACHEABLE,
    MAX_DELTA,
    Freshness,
    PolicyOptions,
    Verdict,
    age_value,
    analyze,
    evaluate,
    format_http_date,
    invalidates,
    merge_304,
    not_modified_for,
    only_if_cached,
    parse_cache_control,
    parse_http_date,
    revalidation_headers,
    secondary_key,
    stale_if_error_ok,
)

T0 = 1_000_000_000.0  # Sun, 09 Sep 2001 01:46:40 GMT
DAY = 86400.0


def d(offset: float) -> str:
    """An HTTP-date ``offset`` seconds from T0."""
    return format_http_date(T0 + offset)


def store(resp: dict, req: dict | None = None, method: str = "GET", status: int = 200, **kw):
    """analyze() with the response arriving at T0 for a request sent at T0."""
    return analyze(
        method=method,
        status=status,
        request_headers=req or {},
        response_headers=resp,
        request_time=T0,
        response_time=T0,
        options=PolicyOptions(**kw),
    )


# ----------------------------------------------------------------- parse_cache_control

# fmt: off
CC_CASES = [
    ("none", None, {}),
    ("empty", "", {}),
    ("simple", "max-age=60", {"max-age": "60"}),
    ("case-folded", "MaX-aGe=60, No-StOrE", {"max-age": "60", "no-store": None}),
    ("quoted", 'max-age="3600"', {"max-age": "3600"}),
    ("single-quoted-kept", "max-age='3600'", {"max-age": "'3600'"}),
    ("quoted-comma-not-split", 'extension="max-age=100", max-age=1', {"extension": "max-age=100", "max-age": "1"}),
    ("field-names", 'no-cache="a, b", private', {"no-cache": "a, b", "private": None}),
    ("escaped-quote", r'x="a\"b", y', {"x": 'a"b', "y": None}),
    ("first-wins", "max-age=1800, max-age=1", {"max-age": "1800"}),
    ("space-before-equals-skipped", "max-age =100, public", {"public": None}),
    ("space-after-equals-skipped", "max-age= 100", {}),
    ("unterminated-quote", 'max-age=5, x="abc', {"max-age": "5"}),
    ("junk-commas", " , ,, no-cache ,", {"no-cache": None}),
    ("valueless-and-empty", "private, max-age=", {"private": None}),
    ("ows-around-members", "  public ,\tmax-age=5  ", {"public": None, "max-age": "5"}),
]
# fmt: on


@pytest.mark.parametrize("value,expected", [c[1:] for c in CC_CASES], ids=[c[0] for c in CC_CASES])
def test_parse_cache_control(value, expected):
    assert parse_cache_control(value) == expected


def test_parse_cache_control_result_is_a_private_copy():
    first = parse_cache_control("max-age=5")
    first["max-age"] = "999"
    assert parse_cache_control("max-age=5") == {"max-age": "5"}


# --------------------------------------------------------------------- HTTP dates

EPOCH_1994 = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
# fmt: off
DATE_CASES = [
    ("imf-fixdate", "Sun, 06 Nov 1994 08:49:37 GMT", EPOCH_1994),
    ("rfc850", "Sunday, 06-Nov-94 08:49:37 GMT", EPOCH_1994),
    ("asctime", "Sun Nov  6 08:49:37 1994", EPOCH_1994),
    ("asctime-2-digit-day", "Thu Nov 10 08:49:37 1994", EPOCH_1994 + 4 * DAY),
    ("surrounding-space", "  Sun, 06 Nov 1994 08:49:37 GMT ", EPOCH_1994),
    ("wrong-case-weekday", "SUN, 06 Nov 1994 08:49:37 GMT", EPOCH_1994),
    ("wrong-case-month", "Sun, 06 NOV 1994 08:49:37 GMT", EPOCH_1994),
    ("wrong-case-tz", "Sun, 06 Nov 1994 08:49:37 gMT", EPOCH_1994),
    ("invalid-utc", "Thu, 18 Aug 2050 02:01:18 UTC", None),
    ("invalid-2-digit-year", "Thu, 18 Aug 50 02:01:18 GMT", None),
    ("invalid-no-comma", "Thu 18 Aug 2050 02:01:18 GMT", None),
    ("invalid-multiple-spaces", "Thu, 18  Aug  2050 02:01:18 GMT", None),
    ("invalid-date-dashes", "Thu, 18-Aug-2050 02:01:18 GMT", None),
    ("invalid-time-periods", "Thu, 18 Aug 2050 02.01.18 GMT", None),
    ("invalid-1-digit-hour", "Thu, 18 Aug 2050 2:01:18 GMT", None),
    ("invalid-zero", "0", None),
    ("invalid-feb-30", "Mon, 30 Feb 2004 00:00:00 GMT", None),
    ("invalid-hour-24", "Sun, 06 Nov 1994 24:00:00 GMT", None),
    ("invalid-two-dates", "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT", None),
    ("empty", "", None),
    ("none", None, None),
]
# fmt: on


@pytest.mark.parametrize(
    "value,expected", [c[1:] for c in DATE_CASES], ids=[c[0] for c in DATE_CASES]
)
def test_parse_http_date(value, expected):
    assert parse_http_date(value) == expected


def test_rfc850_two_digit_year_far_future_means_past_century():
    # RFC 9110 §5.6.7: "30" is within 50 years of now -> 2030; "94" would be >50 ahead -> 1994
    assert parse_http_date("Wednesday, 01-Jan-30 00:00:00 GMT") == parse_http_date(
        "Tue, 01 Jan 2030 00:00:00 GMT"
    )


def test_format_http_date_round_trips():
    assert format_http_date(EPOCH_1994) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert parse_http_date(format_http_date(T0 + 12345)) == T0 + 12345


# ------------------------------------------------------- analyze: storability + lifetime

# (id, status, method, request headers, response headers, extra kwargs, expected lifetime)
# expected None means "must not be stored".
# fmt: off
STORE_CASES = [
    # cc-freshness
    ("freshness-none", 200, "GET", {}, {}, {}, None),
    ("freshness-max-age", 200, "GET", {}, {"cache-control": "max-age=3600"}, {}, 3600),
    ("max-age-quoted", 200, "GET", {}, {"cache-control": 'max-age="3600"'}, {}, 3600),
    ("max-age-single-quoted", 200, "GET", {}, {"cache-control": "max-age='3600'"}, {}, 0),
    ("max-age-ignore-quoted", 200, "GET", {}, {"cache-control": 'extension="max-age=100", max-age=1'}, {}, 1),
    ("max-age-ignore-quoted-rev", 200, "GET", {}, {"cache-control": 'max-age=1, extension="max-age=100"'}, {}, 1),
    ("max-age-space-before-equals", 200, "GET", {}, {"cache-control": "max-age =100"}, {}, None),
    ("max-age-space-after-equals", 200, "GET", {}, {"cache-control": "max-age= 100"}, {}, None),
    ("max-age-0", 200, "GET", {}, {"cache-control": "max-age=0"}, {}, 0),
    ("max-age-a100", 200, "GET", {}, {"cache-control": "max-age=a100"}, {}, 0),
    ("max-age-100a", 200, "GET", {}, {"cache-control": "max-age=100a"}, {}, 0),
    ("max-age-negative", 200, "GET", {}, {"cache-control": "max-age=-100"}, {}, 0),
    ("max-age-decimal", 200, "GET", {}, {"cache-control": "max-age=3600.5"}, {}, 0),
    ("max-age-max", 200, "GET", {}, {"cache-control": "max-age=2147483648"}, {}, MAX_DELTA),
    ("max-age-max-plus", 200, "GET", {}, {"cache-control": "max-age=99999999999"}, {}, MAX_DELTA),
    ("max-age-leading-zero", 200, "GET", {}, {"cache-control": "max-age=003600"}, {}, 3600),
    ("max-age-case", 200, "GET", {}, {"cache-control": "MaX-aGe=3600"}, {}, 3600),
    ("max-age-extension", 200, "GET", {}, {"cache-control": "foobar, max-age=3600"}, {}, 3600),
    ("max-age-dup-first-wins", 200, "GET", {}, {"cache-control": "max-age=1800, max-age=1"}, {}, 1800),
    ("max-age-dup-stale-first", 200, "GET", {}, {"cache-control": "max-age=1, max-age=1800"}, {}, 1),
    ("s-maxage-shared", 200, "GET", {}, {"cache-control": "s-maxage=3600"}, {}, 3600),
    ("s-maxage-over-longer-max-age", 200, "GET", {}, {"cache-control": "max-age=3600, s-maxage=1"}, {}, 1),
    ("s-maxage-over-longer-rev", 200, "GET", {}, {"cache-control": "s-maxage=1, max-age=3600"}, {}, 1),
    ("s-maxage-over-shorter", 200, "GET", {}, {"cache-control": "max-age=1, s-maxage=3600"}, {}, 3600),
    ("max-age-past-expires", 200, "GET", {}, {"cache-control": "max-age=3600", "expires": d(-10000), "date": d(0)}, {}, 3600),
    ("max-age-invalid-expires", 200, "GET", {}, {"cache-control": "max-age=3600", "expires": "0", "date": d(0)}, {}, 3600),
    ("max-age-0-future-expires", 200, "GET", {}, {"cache-control": "max-age=0", "expires": d(10000), "date": d(0)}, {}, 0),
    # expires-freshness
    ("expires-future", 200, "GET", {}, {"expires": d(30 * DAY), "date": d(0)}, {}, 30 * DAY),
    ("expires-past", 200, "GET", {}, {"expires": d(-30 * DAY), "date": d(0)}, {}, 0),
    ("expires-present", 200, "GET", {}, {"expires": d(0), "date": d(0)}, {}, 0),
    ("expires-old-date", 200, "GET", {}, {"expires": d(300), "date": d(400)}, {}, 0),
    ("expires-invalid-0", 200, "GET", {}, {"expires": "0", "date": d(0)}, {}, 0),
    ("expires-invalid-utc", 200, "GET", {}, {"expires": "Thu, 18 Aug 2050 02:01:18 UTC", "date": d(0)}, {}, 0),
    ("expires-wrong-case", 200, "GET", {}, {"expires": d(100).upper(), "date": d(0)}, {}, 100),
    ("expires-invalid-date", 200, "GET", {}, {"expires": d(10), "date": "foo"}, {}, 10),
    ("expires-no-date", 200, "GET", {}, {"expires": d(50)}, {}, 50),
    ("expires-relative-to-date", 200, "GET", {}, {"expires": d(20), "date": d(-10)}, {}, 30),
    # heuristic-freshness (Last-Modified a day before Date -> 10% = 8640 s)
    ("heuristic-200", 200, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, 8640),
    ("heuristic-203", 203, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, 8640),
    ("heuristic-204", 204, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, 8640),
    ("heuristic-404", 404, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, 8640),
    ("heuristic-405", 405, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, 8640),
    ("heuristic-410", 410, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, 8640),
    ("heuristic-414", 414, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, 8640),
    ("heuristic-501", 501, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, 8640),
    ("heuristic-201-not", 201, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, None),
    ("heuristic-202-not", 202, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, None),
    ("heuristic-403-not", 403, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, None),
    ("heuristic-502-not", 502, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, None),
    ("heuristic-503-not", 503, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, None),
    ("heuristic-599-not", 599, "GET", {}, {"last-modified": d(-DAY), "date": d(0)}, {}, None),
    ("heuristic-599-public", 599, "GET", {}, {"last-modified": d(-DAY), "date": d(0), "cache-control": "public"}, {}, 8640),
    ("heuristic-no-date", 200, "GET", {}, {"last-modified": d(-1000)}, {}, 100),
    ("heuristic-capped", 200, "GET", {}, {"last-modified": d(-100 * DAY)}, {}, DAY),
    ("heuristic-custom", 200, "GET", {}, {"last-modified": d(-1000)}, {"heuristic_fraction": 0.5, "heuristic_max": 300}, 300),
    ("heuristic-lm-in-future", 200, "GET", {}, {"last-modified": d(100), "date": d(0)}, {}, 0),
    ("heuristic-pragma-ignored", 200, "GET", {}, {"last-modified": d(-1000), "pragma": "no-cache"}, {}, 100),
    ("302-lm-validator-only", 302, "GET", {}, {"last-modified": d(-DAY)}, {}, 0),
    ("etag-only", 200, "GET", {}, {"etag": '"x"'}, {}, 0),
    # status
    ("status-299-explicit", 299, "GET", {}, {"cache-control": "max-age=3600"}, {}, 3600),
    ("status-400-explicit", 400, "GET", {}, {"cache-control": "max-age=3600"}, {}, 3600),
    ("status-500-explicit", 500, "GET", {}, {"cache-control": "max-age=3600"}, {}, 3600),
    ("status-503-expires", 503, "GET", {}, {"expires": d(60), "date": d(0)}, {}, 60),
    ("status-500-etag-only", 500, "GET", {}, {"etag": '"x"'}, {}, None),
    ("status-206-never", 206, "GET", {}, {"cache-control": "max-age=3600"}, {}, None),
    ("status-304-never", 304, "GET", {}, {"cache-control": "max-age=3600"}, {}, None),
    ("status-100-never", 100, "GET", {}, {"cache-control": "max-age=3600"}, {}, None),
    ("status-600-unknown", 600, "GET", {}, {"cache-control": "max-age=3600"}, {}, None),
    # methods
    ("method-post", 200, "POST", {}, {"cache-control": "max-age=3600"}, {}, None),
    ("method-head", 200, "HEAD", {}, {"cache-control": "max-age=3600"}, {}, 3600),
    ("method-lower-case", 200, "get", {}, {"cache-control": "max-age=3600"}, {}, 3600),
    # cc-response
    ("no-store", 200, "GET", {}, {"cache-control": "no-store"}, {}, None),
    ("no-store-case", 200, "GET", {}, {"cache-control": "No-StOrE"}, {}, None),
    ("no-store-fresh", 200, "GET", {}, {"cache-control": "max-age=10000, no-store", "expires": d(10000), "date": d(0)}, {}, None),
    ("request-no-store", 200, "GET", {"cache-control": "no-store"}, {"cache-control": "max-age=60"}, {}, None),
    ("private", 200, "GET", {}, {"cache-control": "private, max-age=3600"}, {}, None),
    ("private-field-names", 200, "GET", {}, {"cache-control": 'private="set-cookie", max-age=60'}, {}, None),
    ("no-cache-no-validator", 200, "GET", {}, {"cache-control": "max-age=10000, no-cache"}, {}, None),
    ("must-understand-overrides-no-store", 200, "GET", {}, {"cache-control": "must-understand, no-store, max-age=60"}, {}, 60),
    ("must-understand-unknown-status", 299, "GET", {}, {"cache-control": "must-understand, no-store, max-age=60"}, {}, None),
    # authorization
    ("authorization", 200, "GET", {"authorization": "FOO"}, {"expires": d(DAY), "date": d(0)}, {}, None),
    ("authorization-public", 200, "GET", {"authorization": "FOO"}, {"cache-control": "max-age=3600, public"}, {}, 3600),
    ("authorization-must-revalidate", 200, "GET", {"authorization": "FOO"}, {"cache-control": "max-age=3600, must-revalidate"}, {}, 3600),
    ("authorization-s-maxage", 200, "GET", {"authorization": "FOO"}, {"cache-control": "s-maxage=3600"}, {}, 3600),
    # vary-parse
    ("vary-star", 200, "GET", {}, {"cache-control": "max-age=60", "vary": "*"}, {}, None),
    ("vary-star-star", 200, "GET", {}, {"cache-control": "max-age=60", "vary": "*, *"}, {}, None),
    ("vary-empty-star", 200, "GET", {}, {"cache-control": "max-age=60", "vary": ", *"}, {}, None),
    ("vary-foo-star", 200, "GET", {}, {"cache-control": "max-age=60", "vary": "Foo, *"}, {}, None),
    ("vary-foo", 200, "GET", {}, {"cache-control": "max-age=60", "vary": "Foo"}, {}, 60),
    # operator rules
    ("rule-ttl-no-info", 200, "GET", {}, {}, {"rule_ttl": 60}, 60),
    ("rule-ttl-not-over-explicit", 200, "GET", {}, {"cache-control": "max-age=5"}, {"rule_ttl": 60}, 5),
    ("rule-ttl-over-heuristic", 200, "GET", {}, {"last-modified": d(-DAY)}, {"rule_ttl": 60}, 60),
    ("rule-ttl-over-validator", 200, "GET", {}, {"etag": '"x"'}, {"rule_ttl": 60}, 60),
    ("rule-ttl-not-for-500", 500, "GET", {}, {}, {"rule_ttl": 60}, None),
    ("rule-ttl-private-honoured", 200, "GET", {}, {"cache-control": "private"}, {"rule_ttl": 60}, None),
    ("override-max-age", 200, "GET", {}, {"cache-control": "max-age=5"}, {"rule_ttl": 60, "rule_override": True}, 60),
    ("override-private", 200, "GET", {}, {"cache-control": "private, no-cache"}, {"rule_ttl": 60, "rule_override": True}, 60),
    ("override-past-expires", 200, "GET", {}, {"expires": d(-DAY), "date": d(0)}, {"rule_ttl": 60, "rule_override": True}, 60),
    ("override-no-store-honoured", 200, "GET", {}, {"cache-control": "no-store"}, {"rule_ttl": 60, "rule_override": True}, None),
    ("override-without-ttl", 200, "GET", {}, {"cache-control": "max-age=5"}, {"rule_override": True}, 5),
    # CDN-Cache-Control (RFC 9213)
    ("cdn-max-age", 200, "GET", {}, {"cdn-cache-control": "max-age=3600"}, {}, 3600),
    ("cdn-max-age-max-plus", 200, "GET", {}, {"cdn-cache-control": "max-age=99999999999"}, {}, MAX_DELTA),
    ("cdn-max-age-case", 200, "GET", {}, {"cdn-cache-control": "MaX-aGe=3600"}, {}, 3600),
    ("cdn-max-age-extension", 200, "GET", {}, {"cdn-cache-control": "foobar, max-age=3600"}, {}, 3600),
    ("cdn-max-age-past-expires", 200, "GET", {}, {"cdn-cache-control": "max-age=3600", "expires": d(-10000), "date": d(0)}, {}, 3600),
    ("cdn-max-age-0-future-expires", 200, "GET", {}, {"cdn-cache-control": "max-age=0", "expires": d(10000), "date": d(0)}, {}, 0),
    ("cdn-long-over-short-cc", 200, "GET", {}, {"cache-control": "max-age=1", "cdn-cache-control": "max-age=3600"}, {}, 3600),
    ("cdn-short-over-long-cc", 200, "GET", {}, {"cache-control": "max-age=3600", "cdn-cache-control": "max-age=1"}, {}, 1),
    ("cdn-private", 200, "GET", {}, {"cdn-cache-control": "private", "cache-control": "max-age=10000"}, {}, None),
    ("cdn-no-store-cc-fresh", 200, "GET", {}, {"cdn-cache-control": "no-store", "cache-control": "max-age=10000"}, {}, None),
    ("cdn-fresh-cc-no-store", 200, "GET", {}, {"cdn-cache-control": "max-age=10000", "cache-control": "no-store"}, {}, 10000),
    ("cdn-invalid-sf-ignored", 200, "GET", {}, {"cdn-cache-control": "max-age=10000, &&&&&", "cache-control": "no-store"}, {}, None),
    ("cdn-wrong-type-ignored", 200, "GET", {}, {"cdn-cache-control": 'max-age="10000"', "cache-control": "max-age=7"}, {}, 7),
    ("cdn-space-before-equals-ignored", 200, "GET", {}, {"cdn-cache-control": "max-age =100", "cache-control": "max-age=1"}, {}, 1),
    ("cdn-disabled", 200, "GET", {}, {"cdn-cache-control": "max-age=3600", "cache-control": "max-age=1"}, {"cdn_cache_control": False}, 1),
    ("cdn-beats-surrogate", 200, "GET", {}, {"cdn-cache-control": "max-age=60", "surrogate-control": "no-store"}, {}, 60),
    ("cdn-no-expires-fallback", 200, "GET", {}, {"cdn-cache-control": "public", "expires": d(60), "date": d(0)}, {}, None),
    ("cdn-trailing-comma-invalid", 200, "GET", {}, {"cdn-cache-control": "max-age=60,", "cache-control": "max-age=5"}, {}, 5),
    ("cdn-parameters-allowed", 200, "GET", {}, {"cdn-cache-control": "max-age=60;foo=bar, public"}, {}, 60),
    # Surrogate-Control
    ("surrogate-max-age", 200, "GET", {}, {"surrogate-control": "max-age=3600"}, {}, 3600),
    ("surrogate-short-over-long-cc", 200, "GET", {}, {"cache-control": "max-age=3600", "surrogate-control": "max-age=1"}, {}, 1),
    ("surrogate-space-before-equals", 200, "GET", {}, {"cache-control": "max-age=1", "surrogate-control": "max-age =100"}, {}, 1),
    ("surrogate-max-age-0-expires", 200, "GET", {}, {"surrogate-control": "max-age=0", "expires": d(10000), "date": d(0)}, {}, 0),
    ("surrogate-no-store-cc-fresh", 200, "GET", {}, {"surrogate-control": "no-store", "cache-control": "max-age=10000"}, {}, None),
    ("surrogate-disabled", 200, "GET", {}, {"surrogate-control": "no-store", "cache-control": "max-age=10"}, {"surrogate_control": False}, 10),
]
# fmt: on


@pytest.mark.parametrize(
    "status,method,req,resp,kw,expected",
    [c[1:] for c in STORE_CASES],
    ids=[c[0] for c in STORE_CASES],
)
def test_analyze_storability_and_lifetime(status, method, req, resp, kw, expected):
    f = store(resp, req, method=method, status=status, **kw)
    if expected is None:
        assert f is None
    else:
        assert f is not None
        assert f.lifetime == pytest.approx(expected)


# (id, response headers, Freshness attribute, expected value)
# fmt: off
FLAG_CASES = [
    ("no-cache", {"cache-control": "max-age=60, no-cache", "etag": '"a"'}, "no_cache", True),
    ("no-cache-case", {"cache-control": "max-age=60, No-CaChE", "etag": '"a"'}, "no_cache", True),
    ("no-cache-field-names-unqualified", {"cache-control": 'no-cache="a", max-age=3600', "etag": '"a"'}, "no_cache", True),
    ("plain-not-no-cache", {"cache-control": "max-age=60"}, "no_cache", False),
    ("must-revalidate", {"cache-control": "max-age=60, must-revalidate"}, "must_revalidate", True),
    ("proxy-revalidate", {"cache-control": "max-age=60, proxy-revalidate"}, "must_revalidate", True),
    ("s-maxage-implies-revalidate", {"cache-control": "s-maxage=60"}, "must_revalidate", True),
    ("plain-not-must-revalidate", {"cache-control": "max-age=60"}, "must_revalidate", False),
    ("swr", {"cache-control": "max-age=0, stale-while-revalidate=3600"}, "stale_while_revalidate", 3600),
    ("swr-invalid", {"cache-control": "max-age=0, stale-while-revalidate=x"}, "stale_while_revalidate", 0),
    ("sie", {"cache-control": "max-age=0, stale-if-error=60"}, "stale_if_error", 60),
    ("cdn-swr", {"cdn-cache-control": "max-age=1, stale-while-revalidate=30"}, "stale_while_revalidate", 30),
    ("etag", {"cache-control": "max-age=1", "etag": 'W/"v1"'}, "etag", 'W/"v1"'),
    ("last-modified", {"cache-control": "max-age=1", "last-modified": d(-5)}, "last_modified", d(-5)),
    ("vary-normalised", {"cache-control": "max-age=1", "vary": "Foo, bar,  FOO,"}, "vary", ("bar", "foo")),
    ("no-vary", {"cache-control": "max-age=1"}, "vary", ()),
    ("no-cache-with-s-maxage", {"cache-control": "no-cache, s-maxage=1", "etag": '"a"'}, "no_cache", True),
]
# fmt: on


@pytest.mark.parametrize(
    "resp,attr,expected", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES]
)
def test_analyze_records_directives(resp, attr, expected):
    f = store(resp)
    assert f is not None
    assert getattr(f, attr) == expected


def test_rule_override_ignores_revalidation_directives():
    f = store(
        {"cache-control": "no-cache, must-revalidate, stale-while-revalidate=9", "etag": '"a"'},
        rule_ttl=30,
        rule_override=True,
    )
    assert f is not None
    assert (f.lifetime, f.no_cache, f.must_revalidate, f.stale_while_revalidate) == (
        30,
        False,
        False,
        0,
    )


# ------------------------------------------------------------------ analyze: Age (§4.2.3)

# (id, response headers, request_time offset, expected corrected_initial_age)
# fmt: off
AGE_CASES = [
    ("age-header", {"date": d(0), "age": "15"}, 0, 15),
    ("no-age", {"date": d(0)}, 0, 0),
    ("age-nonnumeric", {"date": d(0), "age": "abc"}, 0, 0),
    ("age-negative", {"date": d(0), "age": "-7200"}, 0, 0),
    ("age-float", {"date": d(0), "age": "7200.0"}, 0, 0),
    ("age-suffix", {"date": d(0), "age": "7200,0"}, 0, 7200),
    ("age-prefix", {"date": d(0), "age": "0,7200"}, 0, 7200),
    ("age-dup-0", {"date": d(0), "age": "0, 0"}, 0, 0),
    ("age-dup-old", {"date": d(0), "age": "7200, 7200"}, 0, 7200),
    ("age-large", {"date": d(0), "age": "2147483648"}, 0, MAX_DELTA),
    ("age-larger", {"date": d(0), "age": "99999999999999999999"}, 0, MAX_DELTA),
    ("date-slow", {"date": d(-10)}, 0, 10),
    ("date-fast", {"date": d(10)}, 0, 0),
    ("date-slow-beats-small-age", {"date": d(-30), "age": "5"}, 0, 30),
    ("response-delay-added", {"date": d(0), "age": "5"}, -2, 7),
    ("date-missing", {"age": "3"}, 0, 3),
]
# fmt: on


@pytest.mark.parametrize(
    "resp,req_offset,expected", [c[1:] for c in AGE_CASES], ids=[c[0] for c in AGE_CASES]
)
def test_corrected_initial_age(resp, req_offset, expected):
    f = analyze(
        method="GET",
        status=200,
        request_headers={},
        response_headers={"cache-control": "max-age=3600", **resp},
        request_time=T0 + req_offset,
        response_time=T0,
    )
    assert f is not None
    assert f.corrected_initial_age == pytest.approx(expected)


# (id, response headers, "fresh at T0+1?")  -- Age/Date interplay from cache-tests
# fmt: off
AGED_FRESHNESS_CASES = [
    ("freshness-max-age-age", {"date": d(0), "cache-control": "max-age=10", "age": "15"}, False),
    ("expires-age-slow-date", {"date": d(-10), "expires": d(10), "age": "25"}, False),
    ("expires-age-fast-date", {"date": d(10), "expires": d(20), "age": "15"}, False),
    ("age-parse-negative", {"date": d(0), "cache-control": "max-age=3600", "age": "-7200"}, True),
    ("cdn-max-age-age", {"date": d(0), "cdn-cache-control": "max-age=3600", "age": "7200"}, False),
    ("surrogate-max-age-age", {"surrogate-control": "max-age=3600", "age": "12000"}, False),
]
# fmt: on


@pytest.mark.parametrize(
    "resp,fresh", [c[1:] for c in AGED_FRESHNESS_CASES], ids=[c[0] for c in AGED_FRESHNESS_CASES]
)
def test_aged_responses(resp, fresh):
    f = store(resp)
    assert f is not None
    assert (evaluate(f, {}, T0 + 1) is Verdict.FRESH) is fresh


# ------------------------------------------------------------------------- evaluate


def fr(lifetime=100.0, cia=0.0, **kw) -> Freshness:
    return Freshness(response_time=T0, corrected_initial_age=cia, lifetime=lifetime, **kw)


# (id, Freshness, request headers, seconds after T0, expected verdict)
# fmt: off
EVAL_CASES = [
    ("fresh", fr(), {}, 50, Verdict.FRESH),
    ("stale", fr(), {}, 150, Verdict.REVALIDATE),
    ("boundary-is-stale", fr(), {}, 100, Verdict.REVALIDATE),
    ("initial-age-counts", fr(1500, cia=1000), {}, 600, Verdict.REVALIDATE),
    ("max-age-0-response", fr(0), {}, 0, Verdict.REVALIDATE),
    ("response-no-cache", fr(no_cache=True), {}, 1, Verdict.REVALIDATE),
    ("response-no-cache-beats-max-stale", fr(no_cache=True), {"cache-control": "max-stale"}, 1, Verdict.REVALIDATE),
    ("request-no-cache", fr(), {"cache-control": "no-cache"}, 1, Verdict.REVALIDATE),
    ("request-pragma-no-cache-ignored", fr(), {"pragma": "no-cache"}, 1, Verdict.FRESH),
    ("request-pragma-other", fr(), {"pragma": "unrecognised-extension"}, 1, Verdict.FRESH),
    ("pragma-ignored-with-cc", fr(), {"pragma": "no-cache", "cache-control": "max-stale"}, 1, Verdict.FRESH),
    ("request-max-age-0", fr(), {"cache-control": "max-age=0"}, 1, Verdict.REVALIDATE),
    ("request-max-age-1", fr(3600), {"cache-control": "max-age=1"}, 3, Verdict.REVALIDATE),
    ("request-max-age-ok", fr(3600), {"cache-control": "max-age=60"}, 3, Verdict.FRESH),
    ("request-max-age-aged", fr(3600, cia=1800), {"cache-control": "max-age=600"}, 1, Verdict.REVALIDATE),
    ("request-max-age-invalid-ignored", fr(), {"cache-control": "max-age=abc"}, 50, Verdict.FRESH),
    ("request-max-age-quoted", fr(3600), {"cache-control": 'max-age="1"'}, 3, Verdict.REVALIDATE),
    ("min-fresh", fr(1500), {"cache-control": "min-fresh=2000"}, 1, Verdict.REVALIDATE),
    ("min-fresh-aged", fr(1500, cia=1000), {"cache-control": "min-fresh=1000"}, 1, Verdict.REVALIDATE),
    ("min-fresh-ok", fr(1500), {"cache-control": "min-fresh=10"}, 1, Verdict.FRESH),
    ("max-stale-within", fr(1), {"cache-control": "max-stale=1000"}, 5, Verdict.STALE_OK),
    ("max-stale-aged", fr(1500, cia=2000), {"cache-control": "max-stale=1000"}, 1, Verdict.STALE_OK),
    ("max-stale-beyond", fr(1), {"cache-control": "max-stale=100"}, 500, Verdict.REVALIDATE),
    ("max-stale-any", fr(1), {"cache-control": "max-stale"}, 1e6, Verdict.STALE_OK),
    ("max-stale-invalid-ignored", fr(1), {"cache-control": "max-stale=x"}, 5, Verdict.REVALIDATE),
    ("max-stale-must-revalidate", fr(1, must_revalidate=True), {"cache-control": "max-stale"}, 5, Verdict.REVALIDATE),
    ("max-stale-on-fresh", fr(), {"cache-control": "max-stale=10"}, 1, Verdict.FRESH),
    ("swr-within", fr(0, stale_while_revalidate=3600), {}, 10, Verdict.STALE_WHILE_REVALIDATE),
    ("swr-beyond", fr(0, stale_while_revalidate=3600), {}, 4000, Verdict.REVALIDATE),
    ("swr-must-revalidate", fr(0, stale_while_revalidate=3600, must_revalidate=True), {}, 10, Verdict.REVALIDATE),
    ("swr-request-no-cache", fr(0, stale_while_revalidate=3600), {"cache-control": "no-cache"}, 10, Verdict.REVALIDATE),
    ("swr-on-fresh", fr(100, stale_while_revalidate=3600), {}, 10, Verdict.FRESH),
    ("invalidated", fr(invalidated=True), {}, 1, Verdict.REVALIDATE),
    ("invalidated-swr", fr(invalidated=True, stale_while_revalidate=60), {}, 1, Verdict.STALE_WHILE_REVALIDATE),
    ("invalidated-max-stale", fr(invalidated=True), {"cache-control": "max-stale"}, 1, Verdict.STALE_OK),
    ("clock-went-backwards", fr(), {}, -50, Verdict.FRESH),
]
# fmt: on


@pytest.mark.parametrize(
    "f,req,after,expected", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES]
)
def test_evaluate(f, req, after, expected):
    assert evaluate(f, req, T0 + after) is expected


# (id, Freshness, request headers, seconds after T0, kwargs, expected)
# fmt: off
SIE_CASES = [
    ("fresh", fr(100), {}, 10, {}, True),
    ("response-window", fr(0, stale_if_error=60), {}, 30, {}, True),
    ("response-window-elapsed", fr(0, stale_if_error=1), {}, 30, {}, False),
    ("request-window", fr(0), {"cache-control": "stale-if-error=3600"}, 30, {}, True),
    ("request-window-elapsed", fr(0), {"cache-control": "stale-if-error=1"}, 30, {}, False),
    ("no-window", fr(0), {}, 30, {}, False),
    ("operator-grace", fr(0), {}, 30, {"grace": 300}, True),
    ("must-revalidate", fr(0, stale_if_error=60, must_revalidate=True), {}, 30, {}, False),
    ("no-cache", fr(100, no_cache=True, stale_if_error=60), {}, 1, {}, False),
    ("invalidated-within", fr(100, invalidated=True, stale_if_error=60), {}, 30, {}, True),
    ("just-stale-no-window", fr(100), {}, 100, {}, False),
]
# fmt: on


@pytest.mark.parametrize(
    "f,req,after,kw,expected", [c[1:] for c in SIE_CASES], ids=[c[0] for c in SIE_CASES]
)
def test_stale_if_error_ok(f, req, after, kw, expected):
    assert stale_if_error_ok(f, req, T0 + after, **kw) is expected


@pytest.mark.parametrize(
    "req,expected",
    [
        ({}, False),
        ({"cache-control": "only-if-cached"}, True),
        ({"cache-control": "max-age=0"}, False),
    ],
)
def test_only_if_cached(req, expected):
    assert only_if_cached(req) is expected


# ---------------------------------------------------------------- Freshness record


def test_freshness_clock_helpers():
    f = fr(100, cia=30)
    assert f.age(T0 + 10) == 40
    assert f.ttl(T0 + 10) == 60
    assert f.ttl(T0 + 100) == -30
    assert f.fresh_until() == T0 + 70
    f.invalidated = True
    assert f.fresh_until() == float("-inf")
    assert f.ttl(T0 + 10) == -40


@pytest.mark.parametrize(
    "cia,after,expected", [(0, 0.9, 0), (30, 12.7, 42), (MAX_DELTA, 100, MAX_DELTA)]
)
def test_age_value(cia, after, expected):
    assert age_value(fr(cia=cia), T0 + after) == expected


def test_freshness_dict_round_trip_through_json():
    f = store(
        {
            "cache-control": "max-age=60, stale-if-error=5, must-revalidate",
            "etag": '"e"',
            "last-modified": d(-100),
            "vary": "Accept-Encoding, Origin",
            "age": "3",
        }
    )
    assert f is not None
    f.invalidated = True
    again = Freshness.from_dict(json.loads(json.dumps(f.to_dict())))
    assert again == f
    assert Freshness.from_dict(
        {"response_time": 1, "corrected_initial_age": 0, "lifetime": 5}
    ) == Freshness(1.0, 0.0, 5.0)


# ---------------------------------------------------------------- validation (§4.3)

# fmt: off
REVALIDATION_CASES = [
    ("none", fr(), []),
    ("etag", fr(etag='"abc"'), [("If-None-Match", '"abc"')]),
    ("weak-etag", fr(etag='W/"abc"'), [("If-None-Match", 'W/"abc"')]),
    ("unquoted-etag-quoted", fr(etag="abc"), [("If-None-Match", '"abc"')]),
    ("last-modified", fr(last_modified=d(-5)), [("If-Modified-Since", d(-5))]),
    ("both", fr(etag='"abc"', last_modified=d(-5)), [("If-None-Match", '"abc"'), ("If-Modified-Since", d(-5))]),
]
# fmt: on


@pytest.mark.parametrize(
    "f,expected", [c[1:] for c in REVALIDATION_CASES], ids=[c[0] for c in REVALIDATION_CASES]
)
def test_revalidation_headers(f, expected):
    assert revalidation_headers(f) == expected


STORED = [
    ("Date", "old"),
    ("Content-Type", "text/plain"),
    ("Content-Length", "10"),
    ("ETag", '"e1"'),
    ("Set-Cookie", "a=1"),
    ("Set-Cookie", "b=2"),
    ("Test-Header", "A"),
    ("Age", "30"),
]

# (id, 304 header fields, expected merged fields)
MERGE_CASES = [
    (
        "replace-in-place",
        [("Test-Header", "B"), ("Date", "new")],
        [
            ("Date", "new"),
            ("Content-Type", "text/plain"),
            ("Content-Length", "10"),
            ("ETag", '"e1"'),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Test-Header", "B"),
        ],
    ),
    (
        "content-length-kept-type-updated",
        [("Content-Length", "0"), ("content-type", "text/plain;charset=utf-8")],
        [
            ("Date", "old"),
            ("content-type", "text/plain;charset=utf-8"),
            ("Content-Length", "10"),
            ("ETag", '"e1"'),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Test-Header", "A"),
        ],
    ),
    (
        "repeated-field-replaced-as-group",
        [("Set-Cookie", "c=3")],
        [
            ("Date", "old"),
            ("Content-Type", "text/plain"),
            ("Content-Length", "10"),
            ("ETag", '"e1"'),
            ("Set-Cookie", "c=3"),
            ("Test-Header", "A"),
        ],
    ),
    (
        "new-fields-appended-hop-by-hop-skipped",
        [
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Encoding", "gzip"),
            ("Content-Range", "bytes 0-1/2"),
            ("Keep-Alive", "timeout=5"),
            ("Cache-Control", "max-age=3600"),
            ("Age", "2"),
        ],
        [
            ("Date", "old"),
            ("Content-Type", "text/plain"),
            ("Content-Length", "10"),
            ("ETag", '"e1"'),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Test-Header", "A"),
            ("Age", "2"),
            ("Cache-Control", "max-age=3600"),
        ],
    ),
]


@pytest.mark.parametrize(
    "not_modified,expected", [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES]
)
def test_merge_304(not_modified, expected):
    assert merge_304(STORED, not_modified) == expected


# (id, request headers, etag, last_modified, stored_date, expected)
# fmt: off
NOT_MODIFIED_CASES = [
    ("inm-strong", {"if-none-match": '"abcdef"'}, '"abcdef"', None, None, True),
    ("inm-weak-both", {"if-none-match": 'W/"abcdef"'}, 'W/"abcdef"', None, None, True),
    ("inm-weak-vs-strong", {"if-none-match": 'W/"abcdef"'}, '"abcdef"', None, None, True),
    ("inm-weak-lowercase", {"if-none-match": 'w/"abcdef"'}, 'w/"abcdef"', None, None, True),
    ("inm-list-first", {"if-none-match": '"abcdef", "1234", "5678"'}, '"abcdef"', None, None, True),
    ("inm-list-middle", {"if-none-match": '"1234", "abcdef", "5678"'}, '"abcdef"', None, None, True),
    ("inm-list-last", {"if-none-match": '"1234","5678","abcdef"'}, '"abcdef"', None, None, True),
    ("inm-comma-inside-tag", {"if-none-match": '"a,b"'}, '"a,b"', None, None, True),
    ("inm-obs-text", {"if-none-match": '"abcdefü"'}, '"abcdefü"', None, None, True),
    ("inm-unquoted-vs-quoted", {"if-none-match": "abcdef"}, '"abcdef"', None, None, True),
    ("inm-star", {"if-none-match": "*"}, None, None, None, True),
    ("inm-mismatch", {"if-none-match": '"zzz"'}, '"abcdef"', None, None, False),
    ("inm-no-etag", {"if-none-match": '"abc"'}, None, d(-100), None, False),
    ("inm-precedence-over-ims", {"if-none-match": '"zzz"', "if-modified-since": d(0)}, '"abcdef"', d(-100), None, False),
    ("inm-match-ims-ignored", {"if-none-match": '"abcdef"', "if-modified-since": d(-5000)}, '"abcdef"', d(-100), None, True),
    ("ims-equal", {"if-modified-since": d(-3000)}, None, d(-3000), None, True),
    ("ims-later", {"if-modified-since": d(-2000)}, None, d(-3000), None, True),
    ("ims-earlier", {"if-modified-since": d(-4000)}, None, d(-3000), None, False),
    ("ims-rfc850", {"if-modified-since": "Sunday, 06-Nov-94 08:49:37 GMT"}, None, "Sun, 06 Nov 1994 08:49:37 GMT", None, True),
    ("ims-invalid", {"if-modified-since": "yesterday"}, None, d(-3000), None, False),
    ("ims-no-lm-uses-date", {"if-modified-since": d(-3000)}, None, None, T0 - 5000, True),
    ("ims-no-lm-newer-date", {"if-modified-since": d(-3000)}, None, None, T0, False),
    ("ims-no-lm-no-date", {"if-modified-since": d(-3000)}, None, None, None, False),
    ("no-conditionals", {}, '"abc"', d(-5), None, False),
]
# fmt: on


@pytest.mark.parametrize(
    "req,etag,lm,stored_date,expected",
    [c[1:] for c in NOT_MODIFIED_CASES],
    ids=[c[0] for c in NOT_MODIFIED_CASES],
)
def test_not_modified_for(req, etag, lm, stored_date, expected):
    assert not_modified_for(req, etag, lm, stored_date=stored_date) is expected


# ------------------------------------------------------------- Vary, invalidation

# (id, vary, request A, request B, same key?)
# fmt: off
VARY_CASES = [
    ("no-vary", (), {"foo": "1"}, {"foo": "2"}, True),
    ("match", ("foo",), {"foo": "1"}, {"foo": "1"}, True),
    ("no-match", ("foo",), {"foo": "1"}, {"foo": "2"}, False),
    ("omit", ("foo",), {"foo": "1"}, {}, False),
    ("absent-vs-empty", ("foo",), {"foo": ""}, {}, False),
    ("both-omit", ("bar", "baz", "foo"), {"foo": "1", "baz": "789"}, {"foo": "1", "baz": "789"}, True),
    ("not-listed-ignored", ("foo",), {"foo": "1", "other": "2"}, {"foo": "1", "other": "3"}, True),
    ("three-way-mismatch", ("bar", "baz", "foo"), {"foo": "1", "bar": "abc4", "baz": "789"}, {"foo": "1", "bar": "abc", "baz": "789"}, False),
    ("normalise-space", ("foo",), {"foo": "1,2"}, {"foo": " 1, 2 "}, True),
    ("normalise-combined", ("foo",), {"foo": "1, 2"}, {"foo": "1,2"}, True),
    ("case-sensitive-values", ("foo",), {"foo": "a"}, {"foo": "A"}, False),
]
# fmt: on


@pytest.mark.parametrize(
    "vary,a,b,same", [c[1:] for c in VARY_CASES], ids=[c[0] for c in VARY_CASES]
)
def test_secondary_key(vary, a, b, same):
    assert (secondary_key(vary, a) == secondary_key(vary, b)) is same


def test_secondary_key_empty_without_vary():
    assert secondary_key((), {"foo": "1"}) == ""


# fmt: off
INVALIDATION_CASES = [
    ("POST", 200, True),
    ("PUT", 201, True),
    ("DELETE", 204, True),
    ("M-SEARCH", 200, True),
    ("POST", 303, True),
    ("post", 200, True),
    ("POST", 404, False),
    ("POST", 500, False),
    ("GET", 200, False),
    ("HEAD", 200, False),
    ("OPTIONS", 200, False),
    ("TRACE", 200, False),
]
# fmt: on


@pytest.mark.parametrize("method,status,expected", INVALIDATION_CASES)
def test_invalidates(method, status, expected):
    assert invalidates(method, status) is expected


def test_heuristically_cacheable_statuses():
    expected = {200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501}
    assert expected == HEURISTICALLY_CACHEABLE
