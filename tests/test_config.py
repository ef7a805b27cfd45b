"""Tests for verge.config: defaults, parsing of every setting, kind defaults, lookups, and
error messages that point at the right file, line, column and setting."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from verge.config import (
    MAX_FUNCTION_MEMORY_MB,
    MAX_HEADER_EDITS,
    MAX_HOST,
    MAX_HOSTS_PER_SERVICE,
    MAX_ORIGIN_WEIGHT,
    MAX_ORIGINS,
    MAX_RULES,
    MAX_TTL,
    MAX_URL_PATH,
    Compression,
    Config,
    ConfigError,
    HealthCheck,
    OriginSpec,
    Redirect,
    config_for_origin,
    config_from_data,
    load_config,
    parse_bytes,
    parse_config,
    parse_duration,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "verge.yaml"

MiB = 1024 * 1024


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "verge.yaml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def one_service(rules: str = "", extra: str = "") -> str:
    """A minimal valid service with the given (already indented) rules and extra keys."""
    text = "services:\n  - name: site\n    hosts: [example.com]\n    origins: [http://127.0.0.1:8080]\n"
    if extra:
        text += extra
    if rules:
        text += "    rules:\n" + rules
    return text


def rule_of(rule_yaml: str):
    """The first rule of a service whose rules list holds just this (dedented) rule mapping."""
    first, *rest = textwrap.dedent(rule_yaml).strip().splitlines()
    rules = f"      - {first}\n" + "".join(f"        {line}\n" for line in rest)
    return parse(one_service(rules)).services[0].rules[0]


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_without_file_and_for_empty_text():
    for config in (Config(), load_config(None), parse(""), parse("# nothing set\n")):
        assert config.cache.memory_bytes == 256 * MiB
        assert config.cache.disk_bytes == 1024 * MiB
        assert config.cache.max_memory_object_bytes == 8 * MiB
        assert config.cache.eviction == "s3fifo"
        assert config.cache.heuristic_fraction == 0.1
        assert config.cache.heuristic_max == 86400.0
        assert config.limits.max_header_bytes == 16 * 1024
        assert config.limits.max_url_bytes == 8 * 1024
        assert config.limits.max_body_bytes == 100 * MiB
        assert (config.limits.header_timeout, config.limits.keepalive_timeout) == (10.0, 75.0)
        assert config.limits.body_timeout == 60.0
        timeouts = config.origin_timeouts
        assert (timeouts.connect, timeouts.first_byte, timeouts.idle) == (3.0, 30.0, 30.0)
        assert config.compression.enabled is True
        assert config.compression.algorithms == ["zstd", "br", "gzip"]
        assert (config.compression.min_bytes, config.compression.max_bytes) == (256, 8 * MiB)
        assert "application/*+json" in config.compression.types
        levels = config.compression
        assert (levels.gzip_level, levels.brotli_quality, levels.zstd_level) == (6, 4, 3)
        assert config.access_log is None
        assert config.services == []
        assert config.service_for_host("example.com") is None


def test_service_and_rule_defaults():
    service = parse(one_service("      - path: /\n")).services[0]
    assert service.default is False and service.health_check is None
    assert service.origins[0].weight == 1 and service.origins[0].host_header is None
    assert service.headers.request_add == {} and service.headers.response_remove == []
    rule = service.rules[0]
    assert rule.kind == "default" and rule.ttl is None and rule.micro_cache is None
    assert not (rule.override or rule.bypass or rule.ignore_query or rule.ignore_cookies)
    assert rule.sort_query is False and rule.key_headers == [] and rule.redirect is None


def test_health_check_defaults_mean_any_status_below_400():
    check = parse(one_service(extra="    health_check: {}\n")).services[0].health_check
    assert check is not None
    assert (check.path, check.interval, check.timeout, check.fails, check.passes) == (
        "/",
        5,
        2,
        3,
        2,
    )
    assert check.expect_status == ["2xx", "3xx"]
    assert [check.is_healthy_status(s) for s in (200, 204, 301, 399, 400, 404, 500, 101)] == [
        True, True, True, True, False, False, False, False,
    ]  # fmt: skip


# --- sizes and durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("500k", 500 * 1024),
        ("500kb", 500 * 1024),
        ("64MiB", 64 * MiB),
        ("64 mb", 64 * MiB),
        ("1GiB", 1024 * MiB),
        ("1.5GiB", 1536 * MiB),
        ("1T", 1024**4),
        ("10b", 10),
        (2048.0, 2048),
    ],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize(
    "value", ["", "abc", "10 parsecs", "-5k", "1.2.3M", True, -1, float("inf"), None, [1]]
)
def test_parse_bytes_rejects(value):
    with pytest.raises(ValueError):
        parse_bytes(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1.5s", 1.5),
    ],
)
def test_parse_duration(value, expected):
    assert parse_duration(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", ["", "abc", "5 years", "5x", "-1s", "s", "1h-", False, -3, float("nan"), None]
)
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_sizes_and_durations_in_yaml_are_stored_as_numbers():
    config = parse("""
        cache: {memory_bytes: 64MiB, disk_bytes: 10737418240, max_memory_object_bytes: 500k,
                eviction: lru, heuristic_fraction: 0.2, heuristic_max: 2h}
        limits: {max_header_bytes: 32KiB, max_url_bytes: 4096, max_body_bytes: 1GiB,
                 header_timeout: 500ms, keepalive_timeout: 1m, body_timeout: 90}
        origin_timeouts: {connect: 1s, first_byte: 1m, idle: 45s}
        """)
    assert config.cache.memory_bytes == 64 * MiB
    assert config.cache.disk_bytes == 10 * 1024 * MiB
    assert config.cache.max_memory_object_bytes == 500 * 1024
    assert (config.cache.eviction, config.cache.heuristic_fraction) == ("lru", 0.2)
    assert config.cache.heuristic_max == 7200.0
    assert config.limits.max_header_bytes == 32 * 1024 and config.limits.max_url_bytes == 4096
    assert config.limits.max_body_bytes == 1024 * MiB
    assert config.limits.header_timeout == 0.5 and config.limits.keepalive_timeout == 60.0
    assert config.limits.body_timeout == 90.0
    assert (config.origin_timeouts.connect, config.origin_timeouts.first_byte) == (1.0, 60.0)
    assert config.origin_timeouts.idle == 45.0


# --- every section ----------------------------------------------------------------------------


def test_compression_settings_and_type_matching():
    compression = parse("""
        compression:
          enabled: false
          algorithms: [gzip, br]
          min_bytes: 1k
          max_bytes: 1MiB
          types: [Text/*, application/json, "application/*+json"]
          gzip_level: 9
          brotli_quality: 11
          zstd_level: 19
        """).compression
    assert compression.enabled is False and compression.algorithms == ["gzip", "br"]
    assert (compression.min_bytes, compression.max_bytes) == (1024, MiB)
    assert compression.types == ["text/*", "application/json", "application/*+json"]
    assert (compression.gzip_level, compression.brotli_quality, compression.zstd_level) == (
        9,
        11,
        19,
    )
    assert compression.compressible("text/html; charset=utf-8")
    assert compression.compressible("APPLICATION/JSON")
    assert compression.compressible("application/ld+json")
    assert not compression.compressible("application/javascript")
    assert not compression.compressible("image/png")
    assert not compression.compressible("")


def test_default_compressible_types():
    compression = Compression()
    for mime in ("text/css", "application/javascript", "application/problem+json", "image/svg+xml"):
        assert compression.compressible(mime), mime
    assert not compression.compressible("video/mp4")


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("algorithms: [gzip, gzip]", "more than once"),
        ("algorithms: [deflate]", "Input should be 'zstd', 'br' or 'gzip'"),
        ("algorithms: []", "at least 1 item"),
        ("types: [texthtml]", "invalid media type pattern"),
        ("{min_bytes: 2MiB, max_bytes: 1MiB}", "min_bytes is larger than max_bytes"),
        ("gzip_level: 10", "less than or equal to 9"),
    ],
)
def test_compression_rejects(setting, reason):
    section = setting if setting.startswith("{") else "{" + setting + "}"
    assert reason in error_of(f"compression: {section}\n")


def test_access_log():
    assert parse("access_log: '-'\n").access_log == "-"
    assert (
        parse("access_log: /var/log/verge/access.log\n").access_log == "/var/log/verge/access.log"
    )
    assert parse("access_log: null\n").access_log is None
    assert "access_log" in error_of("access_log: ''\n")


def test_service_fields():
    service = parse("""
        services:
          - name: my-site-2
            hosts: [Example.COM, "*.Example.com", example.org.]
            default: true
            origins:
              - http://a.internal:8080
              - url: HTTPS://B.internal
                weight: 3
                host_header: example.com
            health_check:
              path: /healthz
              interval: 10s
              timeout: 1500ms
              fails: 5
              passes: 1
              expect_status: [200, "204", 3xx]
            headers:
              request_add: {X-Edge: verge, X-Number: 5}
              request_remove: [Cookie]
              response_add: {Cache-Control: "public, max-age=60"}
              response_remove: [Server, X-Powered-By]
        """).services[0]
    assert service.name == "my-site-2" and service.default is True
    assert service.hosts == ["example.com", "*.example.com", "example.org"]
    first, second = service.origins
    assert (first.url, first.weight, first.scheme, first.host, first.port, first.tls) == (
        "http://a.internal:8080", 1, "http", "a.internal", 8080, False,
    )  # fmt: skip
    assert (second.url, second.weight, second.host_header) == (
        "https://b.internal",
        3,
        "example.com",
    )
    assert (second.port, second.tls) == (443, True)
    check = service.health_check
    assert check is not None and check.path == "/healthz"
    assert (check.interval, check.timeout, check.fails, check.passes) == (10.0, 1.5, 5, 1)
    assert check.expect_status == [200, 204, "3xx"]
    assert check.is_healthy_status(204) and check.is_healthy_status(302)
    assert not check.is_healthy_status(201)
    assert service.headers.request_add == {"x-edge": "verge", "x-number": "5"}
    assert service.headers.request_remove == ["cookie"]
    assert service.headers.response_add == {"cache-control": "public, max-age=60"}
    assert service.headers.response_remove == ["server", "x-powered-by"]


def test_rule_fields():
    rule = rule_of("""
        path: /api/*.json
        kind: default
        ttl: 10m
        override: true
        ignore_query: true
        ignore_cookies: true
        sort_query: true
        key_headers: [Accept-Language, X-Device, accept-language]
        headers:
          response_add: {X-Rule: "1"}
        redirect: {to: "https://new.example.com$path?$query", status: 308}
        """)
    assert rule.path == "/api/*.json" and rule.kind == "default"
    assert (rule.ttl, rule.override, rule.bypass) == (600.0, True, False)
    assert rule.ignore_query and rule.ignore_cookies and rule.sort_query
    assert rule.key_headers == ["accept-language", "x-device"]
    assert rule.headers.response_add == {"x-rule": "1"}
    assert rule.redirect is not None and rule.redirect.status == 308
    assert rule.redirect.to == "https://new.example.com$path?$query"


def test_redirect_placeholders_and_shorthand():
    redirect = Redirect(to="https://new.example.com$path?$query")
    assert redirect.status == 301
    assert redirect.location("/a/b", "x=1&y=2") == "https://new.example.com/a/b?x=1&y=2"
    assert redirect.location("/a/b", "") == "https://new.example.com/a/b"
    assert Redirect(to="/moved").location("/old") == "/moved"
    glued = Redirect(to="https://new.example.com$path$query")
    assert glued.location("/a", "x=1") == "https://new.example.com/a?x=1"
    assert glued.location("/a", "") == "https://new.example.com/a"
    extra = Redirect(to="/search?from=old&$query", status=302)
    assert extra.location("/s", "q=1") == "/search?from=old&q=1"
    assert extra.location("/s") == "/search?from=old"
    assert rule_of("path: /old/\nredirect: /new/\n").redirect == Redirect(to="/new/")


@pytest.mark.parametrize(
    ("redirect", "reason"),
    [
        ("{to: 'https://x.example$host'}", "unknown placeholder $host"),
        ("{to: 'ftp://x.example/'}", "must be a path or an http(s):// URL"),
        ("{to: /new, status: 200}", "Input should be 301, 302, 303, 307 or 308"),
    ],
)
def test_redirect_rejects(redirect, reason):
    assert reason in error_of(one_service(f"      - path: /old/\n        redirect: {redirect}\n"))


def test_origin_spec_accepts_bare_string_and_normalises():
    assert (
        OriginSpec.model_validate("http://Origin.Example:8080/").url == "http://origin.example:8080"
    )
    ipv6 = OriginSpec.model_validate("http://[::1]:9000")
    assert (ipv6.url, ipv6.host, ipv6.port) == ("http://[::1]:9000", "::1", 9000)
    assert OriginSpec.model_validate("http://10.0.0.1").port == 80


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://x.example", "must look like http://host[:port]"),
        ("localhost:8080", "must look like http://host[:port]"),
        ("http://", "must look like http://host[:port]"),
        ("http://x.example/path", "without a path"),
        ("http://x.example?q=1", "without a path"),
        ("http://user:pw@x.example", "credentials"),
        ("http://x.example:99999", "invalid port"),
        ("http://x.example:0", "invalid port"),
        ("http://bad_host!:80", "invalid host"),
    ],
)
def test_origin_spec_rejects(url, reason):
    message = error_of(f"services:\n  - name: s\n    hosts: [a.example]\n    origins: ['{url}']\n")
    assert "services[0].origins[0].url" in message and reason in message


# --- kind defaults ----------------------------------------------------------------------------


def test_static_kind_defaults():
    rule = rule_of("path: /static/\nkind: static\n")
    assert (rule.ttl, rule.ignore_cookies, rule.bypass, rule.override) == (
        86400.0,
        True,
        False,
        False,
    )


def test_kind_defaults_do_not_override_what_the_user_set():
    rule = rule_of("path: /static/\nkind: static\nttl: 1h\nignore_cookies: false\n")
    assert (rule.ttl, rule.ignore_cookies) == (3600.0, False)
    assert rule_of("path: /api/\nkind: api\nsort_query: false\n").sort_query is False
    assert rule_of("path: /d/\nkind: dynamic\nbypass: false\n").bypass is False


def test_api_kind_sorts_query():
    rule = rule_of("path: /api/\nkind: api\n")
    assert rule.sort_query is True and rule.bypass is False and rule.ttl is None


def test_dynamic_kind_bypasses_unless_micro_cached():
    assert rule_of("path: /cart/\nkind: dynamic\n").bypass is True
    rule = rule_of("path: /news/\nkind: dynamic\nmicro_cache: 2s\n")
    assert (rule.bypass, rule.micro_cache, rule.ttl, rule.override) == (False, 2.0, 2.0, True)


def test_micro_cache_on_any_kind_implies_override():
    rule = rule_of("path: /x/\nmicro_cache: 500ms\n")
    assert (rule.ttl, rule.override, rule.bypass) == (0.5, True, False)
    assert rule_of("path: /x/\nkind: static\nmicro_cache: 1s\n").ttl == 1.0


@pytest.mark.parametrize(
    ("rule", "path", "reason"),
    [
        ("override: true", "rules[0].override", "override: true needs a ttl"),
        ("micro_cache: 1s\n        bypass: true", "rules[0].bypass", "contradicts micro_cache"),
        ("micro_cache: 1s\n        ttl: 1m", "rules[0].ttl", "micro_cache sets the ttl"),
        ("micro_cache: 1s\n        override: false", "rules[0].override", "always overrides"),
        ("micro_cache: 0", "rules[0].micro_cache", "greater than 0"),
        ("kind: fast", "rules[0].kind", "Input should be 'static', 'dynamic', 'api' or 'default'"),
    ],
)
def test_rule_contradictions_are_errors(rule, path, reason):
    message = error_of(one_service(f"      - path: /x/\n        {rule}\n"))
    assert f"services[0].{path}: " in message and reason in message


def test_rule_path_must_be_a_url_path():
    assert "must start with '/'" in error_of(one_service("      - path: static/\n"))
    assert "no spaces, query or fragment" in error_of(one_service("      - path: /a?b=1\n"))


def test_round_trip_through_json_is_stable():
    config = load_config(EXAMPLE)
    bundle = json.loads(json.dumps(config.model_dump(mode="json")))
    again = config_from_data(bundle)
    assert again == config
    assert again.model_dump(mode="json") == bundle


# --- lookups ----------------------------------------------------------------------------------


def test_match_rule_prefix_glob_and_order():
    service = parse(
        one_service(
            "      - path: /static/\n"
            "      - path: /api/*.json\n"
            "      - path: /img/*/thumb-*.png\n"
            "      - path: /api/\n"
        )
    ).services[0]

    def path_of(url):
        rule = service.match_rule(url)
        return rule.path if rule else None

    assert path_of("/static/app.js") == "/static/"
    assert path_of("/static") is None
    assert path_of("/api/users.json") == "/api/*.json"
    assert path_of("/api/v1/users.json") == "/api/*.json"  # "*" crosses "/"
    assert path_of("/api/users.json.bak") == "/api/"  # globs match the whole path
    assert path_of("/api/users") == "/api/"
    assert path_of("/img/a/b/thumb-1.png") == "/img/*/thumb-*.png"
    assert path_of("/img/thumb-1.png") is None
    assert path_of("/") is None
    assert service.rules[1].matches("/api/x.json") and not service.rules[0].matches("/api/")


def test_glob_special_characters_are_literal():
    rule = rule_of("path: /a.b/*(x)+\n")
    assert rule.matches("/a.b/zz(x)+") and not rule.matches("/aXb/zz(x)+")


def test_service_for_host():
    config = parse("""
        services:
          - {name: exact, hosts: [example.com, "[::1]", 10.0.0.1], origins: [http://o1]}
          - {name: wild, hosts: ["*.example.com"], origins: [http://o2]}
          - {name: deeper, hosts: ["*.eu.example.com"], origins: [http://o3]}
          - {name: fallback, hosts: [fallback.test], default: true, origins: [http://o4]}
        """)

    def name_for(host):
        service = config.service_for_host(host)
        return service.name if service else None

    assert name_for("example.com") == "exact"
    assert name_for("EXAMPLE.com:8080") == "exact"
    assert name_for("example.com.") == "exact"
    assert name_for("[::1]:443") == "exact"
    assert name_for("10.0.0.1:80") == "exact"
    assert name_for("www.example.com") == "wild"
    assert name_for("a.b.example.com") == "wild"
    assert name_for("x.eu.example.com") == "deeper"  # most specific wildcard wins
    assert name_for("eu.example.com") == "wild"
    assert name_for("notexample.com") == "fallback"
    assert name_for("") == "fallback"
    assert name_for("fallback.test") == "fallback"


def test_star_host_catches_everything_before_the_default():
    config = parse("""
        services:
          - {name: a, hosts: [a.test], default: true, origins: [http://o1]}
          - {name: any, hosts: ["*"], origins: [http://o2]}
        """)
    assert config.service_for_host("a.test").name == "a"
    assert config.service_for_host("other.test").name == "any"
    assert parse(one_service()).service_for_host("other.test") is None


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("example.com:8080", "has a port"),
        ("exa mple.com", "invalid host"),
        ("a.*.example.com", "invalid host"),
        ("-bad.example", "invalid host"),
    ],
)
def test_bad_hosts(host, reason):
    message = error_of(f"services:\n  - name: s\n    hosts: ['{host}']\n    origins: [http://o]\n")
    assert "verge.yaml:3:13: services[0].hosts[0]: " in message and reason in message


def test_international_host_names_become_punycode():
    service = parse(
        "services:\n  - {name: s, hosts: [bücher.example], origins: [http://o]}\n"
    ).services[0]
    assert service.hosts == ["xn--bcher-kva.example"]


# --- config_for_origin ------------------------------------------------------------------------


def test_config_for_origin_adds_a_default_service():
    config = config_for_origin("http://127.0.0.1:8080")
    service = config.service_for_host("anything.test")
    assert service is not None and service.name == "default" and service.default
    assert service.hosts == ["*"] and service.origins[0].url == "http://127.0.0.1:8080"
    assert service.match_rule("/") is None


def test_config_for_origin_keeps_the_base_config():
    base = parse("cache: {memory_bytes: 1MiB}\n" + one_service())
    config = config_for_origin("https://origin.test", base)
    assert config.cache.memory_bytes == MiB
    assert config.service_for_host("example.com").name == "site"
    assert config.service_for_host("other.test").name == "default"
    assert base.service_for_host("other.test") is None  # the base is not modified


def test_config_for_origin_errors():
    with pytest.raises(ConfigError, match=r"^--origin: origin URL 'localhost:80' must look like"):
        config_for_origin("localhost:80")
    base = parse(one_service(extra="    default: true\n"))
    with pytest.raises(ConfigError, match="'site' is already the default"):
        config_for_origin("http://o.test", base)


# --- error messages: file, line, column, path, reason -----------------------------------------


def test_error_message_names_file_line_column_path_and_reason():
    message = error_of("""\
        services:
          - name: site
            hosts: [example.com]
            origins: [http://o]
            rules:
              - path: /a/
              - path: /b/
                ttl: [1, 2]
        """)
    assert message == "verge.yaml:8:14: services[0].rules[1].ttl: Input should be a valid number"


def test_unknown_key_points_at_the_key_and_suggests_a_fix():
    message = error_of(one_service("      - path: /a/\n        tll: 5m\n"))
    assert message == "verge.yaml:7:9: services[0].rules[0].tll: unknown key; did you mean 'ttl'?"
    message = error_of("cache:\n  zzz: 1\n")
    assert message.startswith(
        "verge.yaml:2:3: cache.zzz: unknown key; expected one of: memory_bytes"
    )
    assert (
        error_of("servics: []\n")
        == "verge.yaml:1:1: servics: unknown key; did you mean 'services'?"
    )


def test_wrong_type_and_bad_values():
    assert error_of("cache:\n  memory_bytes: lots\n").startswith(
        "verge.yaml:2:17: cache.memory_bytes: invalid byte size 'lots'"
    )
    assert error_of("cache:\n  eviction: lfu\n") == (
        "verge.yaml:2:13: cache.eviction: Input should be 's3fifo' or 'lru' (got 'lfu')"
    )
    assert error_of("limits:\n  header_timeout: 0\n") == (
        "verge.yaml:2:19: limits.header_timeout: Input should be greater than 0"
    )
    assert error_of("limits:\n  body_timeout: soon\n").startswith(
        "verge.yaml:2:17: limits.body_timeout: invalid duration 'soon'"
    )
    assert "valid boolean" in error_of("compression: {enabled: maybe}\n")
    assert error_of("services: {}\n").startswith(
        "verge.yaml:1:11: services: Input should be a valid list"
    )
    assert (
        error_of("cache: 5\n") == "verge.yaml:1:8: cache: expected a mapping of settings, got int"
    )


def test_bad_origin_url_line():
    message = error_of("""\
        services:
          - name: site
            hosts: [example.com]
            origins:
              - url: http://ok.test
              - url: ftp://bad.test
        """)
    assert message.startswith(
        "verge.yaml:6:14: services[0].origins[1].url: origin URL 'ftp://bad.test'"
    )


def test_missing_required_field_points_at_its_mapping():
    message = error_of("services:\n  - name: site\n    hosts: [example.com]\n")
    assert message == "verge.yaml:2:5: services[0].origins: required but missing"


def test_cross_service_conflicts_point_at_the_culprit():
    base = "services:\n  - {name: a, hosts: [a.test], default: true, origins: [http://o]}\n"
    assert error_of(base + "  - {name: b, hosts: [b.test, A.test], origins: [http://o]}\n") == (
        "verge.yaml:3:31: services[1].hosts[1]: host 'a.test' is already listed for 'a'"
    )
    assert error_of(base + "  - {name: a, hosts: [b.test], origins: [http://o]}\n") == (
        "verge.yaml:3:12: services[1].name: another service is already named 'a'"
    )
    assert error_of(
        base + "  - {name: b, hosts: [b.test], default: true, origins: [http://o]}\n"
    ) == (
        "verge.yaml:3:41: services[1].default: only one service can be the default; 'a' already is"
    )
    assert "already listed for this service" in error_of(
        "services:\n  - {name: a, hosts: [a.test, a.test], origins: [http://o]}\n"
    )


def test_bad_service_name_and_empty_lists():
    assert "must be a slug" in error_of(
        "services:\n  - {name: My_Site, hosts: [a.test], origins: [http://o]}\n"
    )
    assert "services[0].hosts: List should have at least 1 item" in error_of(
        "services:\n  - {name: a, hosts: [], origins: [http://o]}\n"
    )
    assert "services[0].origins: List should have at least 1 item" in error_of(
        "services:\n  - {name: a, hosts: [a.test], origins: []}\n"
    )


def test_duplicate_rule_path_is_unreachable():
    message = error_of(one_service("      - path: /a/\n      - path: /a/\n"))
    assert message == (
        "verge.yaml:7:15: services[0].rules[1].path: never matches: rules[0] has the same path '/a/'"
    )


def test_header_rule_errors():
    message = error_of(one_service(extra="    headers:\n      request_add: {'Bad Name': x}\n"))
    assert (
        message
        == "verge.yaml:6:21: services[0].headers.request_add.Bad Name: invalid header name 'Bad Name'"
    )
    message = error_of(one_service(extra='    headers:\n      response_add: {X-A: "a\\r\\nb"}\n'))
    assert "services[0].headers.response_add.X-A: " in message and "line break" in message
    assert "valid string" in error_of(
        one_service(extra="    headers:\n      request_add: {X-A: yes}\n")
    )


def test_health_check_errors():
    assert "invalid status '6xx'" in error_of(
        one_service(extra="    health_check: {expect_status: [200, 6xx]}\n")
    )
    assert "services[0].health_check.timeout: timeout is longer than interval" in error_of(
        one_service(extra="    health_check: {interval: 1s, timeout: 2s}\n")
    )
    assert HealthCheck(expect_status=["2XX", 404]).expect_status == ["2xx", 404]


def test_yaml_syntax_error_gives_line():
    message = error_of("cache:\n  memory_bytes: 1MiB\n   disk_bytes: 1GiB\n")
    assert message.startswith("verge.yaml:3:")
    assert "invalid YAML" in message
    message = error_of("services:\n  - name: [unclosed\n")
    assert message.startswith("verge.yaml:3:") and "invalid YAML" in message


def test_duplicate_yaml_keys_are_reported():
    assert error_of("cache:\n  eviction: lru\n  eviction: s3fifo\n") == (
        "verge.yaml:3:3: duplicate key 'eviction'"
    )


def test_top_level_must_be_a_mapping():
    assert (
        error_of("- a\n- b\n")
        == "verge.yaml:1:1: the top level must be a mapping of settings, not list"
    )


def test_several_errors_are_all_reported_in_line_order():
    message = error_of("cache:\n  eviction: lfu\nlimits:\n  header_timeout: -1\n  bogus: 1\n")
    lines = message.splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        "verge.yaml:2:13",
        "verge.yaml:4:19",
        "verge.yaml:5:3",
    ]


def test_anchors_and_merge_keys_keep_positions():
    message = error_of("""\
        services:
          - &base
            name: a
            hosts: [a.test]
            origins: [http://o]
          - <<: *base
            name: b
            hosts: [b.test]
            rules: [{path: /x/, ttl: nope}]
        """)
    assert message.startswith("verge.yaml:9:30: services[1].rules[0].ttl: invalid duration 'nope'")
    config = parse("""\
        services:
          - &base
            name: a
            hosts: [a.test]
            origins: [http://o]
          - <<: *base
            name: b
            hosts: [b.test]
        """)
    assert config.services[1].origins[0].url == "http://o"


def test_config_issues_are_structured():
    with pytest.raises(ConfigError) as info:
        parse("cache:\n  eviction: lfu\n")
    (issue,) = info.value.issues
    assert (issue.source, issue.line, issue.column, issue.path) == (
        "verge.yaml",
        2,
        13,
        "cache.eviction",
    )


def test_bundle_errors_have_paths_but_no_lines():
    with pytest.raises(ConfigError) as info:
        config_from_data({"cache": {"eviction": "lfu"}})
    assert (
        str(info.value) == "<bundle>: cache.eviction: Input should be 's3fifo' or 'lru' (got 'lfu')"
    )


# --- files ------------------------------------------------------------------------------------


def test_load_config_reads_a_file_and_names_it_in_errors(tmp_path):
    good = tmp_path / "verge.yaml"
    good.write_text("cache:\n  memory_bytes: 2MiB\n")
    assert load_config(good).cache.memory_bytes == 2 * MiB
    assert load_config(str(good)).cache.memory_bytes == 2 * MiB
    bad = tmp_path / "bad.yaml"
    bad.write_text("\n\ncache:\n  memory_bytez: 2MiB\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:4:3: cache.memory_bytez: unknown key"):
        load_config(bad)


def test_load_config_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_json_text_is_accepted_with_lines():
    text = '{\n  "cache": {\n    "eviction": "lfu"\n  }\n}\n'
    with pytest.raises(ConfigError, match=r"^bundle.json:3:17: cache.eviction: "):
        parse_config(text, "bundle.json")


def test_example_config_loads():
    config = load_config(EXAMPLE)
    assert [service.name for service in config.services] == ["www", "api", "fallback"]
    assert config.access_log == "-"
    www = config.services[0]
    assert www.match_rule("/static/app.js").ttl == 86400.0
    assert www.match_rule("/account/settings").bypass is True
    assert config.service_for_host("v2.api.example.net").name == "api"
    assert config.service_for_host("unknown.test").name == "fallback"


# --- bounds: what one config may ask of an edge (the table in verge/config/bounds.py) -----


def _service_data(**changes) -> dict:
    return {"name": "site", "hosts": ["example.com"], "origins": ["http://o"], **changes}


def _bundle_error(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_data(data)
    return info.value


@pytest.mark.parametrize(
    ("service", "path"),
    [
        ({"origins": [{"url": "http://o", "weight": MAX_ORIGIN_WEIGHT + 1}]}, "origins[0].weight"),
        ({"origins": ["http://o"] * (MAX_ORIGINS + 1)}, "origins"),
        ({"hosts": [f"h{i}.test" for i in range(MAX_HOSTS_PER_SERVICE + 1)]}, "hosts"),
        ({"rules": [{"path": f"/r{i}/"} for i in range(MAX_RULES + 1)]}, "rules"),
        ({"hosts": ["a" * (MAX_HOST + 1)]}, "hosts[0]"),
        ({"rules": [{"path": "/" + "a" * MAX_URL_PATH}]}, "rules[0].path"),
        ({"rules": [{"path": "/", "ttl": MAX_TTL * 2}]}, "rules[0].ttl"),
        (
            {"rules": [{"path": "/", "headers": {"response_add": {"x": "v" * 9000}}}]},
            "rules[0].headers.response_add.x",
        ),
        (
            {"headers": {"request_add": {f"x-{i}": "v" for i in range(MAX_HEADER_EDITS + 1)}}},
            "headers.request_add",
        ),
        ({"health_check": {"interval": 0.01, "timeout": 0.01}}, "health_check.interval"),
        ({"health_check": {"fails": 10**6}}, "health_check.fails"),
    ],
)
def test_a_service_beyond_its_bounds_is_refused_naming_the_setting(service, path):
    error = _bundle_error({"services": [_service_data(**service)]})
    assert [issue.path for issue in error.issues] == [f"services[0].{path}"]


def test_a_huge_weight_in_yaml_names_the_line_and_the_bound():
    message = error_of(
        one_service().replace(
            "origins: [http://127.0.0.1:8080]",
            "origins: [{url: http://o, weight: 18446744073709551616}]",
        )
    )
    assert message.startswith("verge.yaml:4:") and "services[0].origins[0].weight" in message
    assert f"less than or equal to {MAX_ORIGIN_WEIGHT}" in message


def test_absurd_sizes_and_durations_are_config_errors_not_crashes():
    assert "cache.memory_bytes" in error_of(f"cache:\n  memory_bytes: '{'9' * 400}'\n")
    assert "cache.disk_bytes" in error_of("cache:\n  disk_bytes: 2048TiB\n")
    assert "limits.max_header_bytes" in error_of("limits:\n  max_header_bytes: 2MiB\n")
    assert "limits.body_timeout" in error_of("limits:\n  body_timeout: 2d\n")
    assert "cache.heuristic_max" in error_of(f"cache:\n  heuristic_max: '{'9' * 400}'\n")


def test_a_function_may_not_ask_for_more_memory_than_the_runtime_has():
    function = {"name": "f", "service": "site", "routes": ["/"], "module": "f.wasm"}
    error = _bundle_error({"functions": [{**function, "memory_mb": MAX_FUNCTION_MEMORY_MB + 1}]})
    assert [issue.path for issue in error.issues] == ["functions[0].memory_mb"]
    ok = config_from_data({"functions": [{**function, "memory_mb": MAX_FUNCTION_MEMORY_MB}]})
    assert ok.functions[0].memory_mb == MAX_FUNCTION_MEMORY_MB


def test_glob_rules_match_in_time_linear_in_the_path():
    """A glob with many stars once meant a backtracking regex: /*a*a*a*b against a long path
    of "a"s took seconds per star. Each star now commits to its earliest match."""
    service = parse(one_service("      - path: /*a*a*a*a*b\n")).services[0]
    started = time.perf_counter()
    assert service.match_rule("/" + "a" * 8000) is None
    assert service.match_rule("/" + "a" * 8000 + "b") is not None
    assert time.perf_counter() - started < 0.5
    glob = parse(one_service("      - path: /x/*/y/*.js\n")).services[0]
    assert glob.match_rule("/x/1/y/2/y/3.js") is not None
    assert glob.match_rule("/x/1/y/2.css") is None
    assert glob.match_rule("/x/y/a.js") is None
