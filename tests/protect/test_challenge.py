"""The cookie challenge's parts: tokens (valid, expired, another client or service, tampered,
hostile), the ``when`` syntax and the settings' bounds, the cookie taken out of a request,
the node secret file, the strikes, and the decision over a sequence of requests (the clocks
passed in, no sleeps)."""

from __future__ import annotations

import logging
import os
import stat
import threading
from typing import Any

import pytest
from pydantic import ValidationError

from verge.http.message import Request
from verge.protect import challenge as ch
from verge.protect.challenge import (
    COOKIE,
    MAX_TOKEN,
    Challenge,
    ChallengeTokens,
    Strikes,
    challenge_answer,
    format_when,
    load_or_create_secret,
    node_secret,
    parse_when,
    refusal_answer,
    without_cookie,
)
from verge.protect.keys import ClientAddresses
from verge.protect.settings import Protection

SECRET = b"s" * 32
NOW = 1_700_000_000.0
CLIENT = "192.0.2.7"


@pytest.fixture
def tokens() -> ChallengeTokens:
    return ChallengeTokens(SECRET, "site", 3600)


# ---- tokens ---------------------------------------------------------------------------------------


def test_a_token_is_valid_for_its_client_and_service_until_it_expires(tokens) -> None:
    token = tokens.issue(CLIENT, NOW)
    expiry, mac = token.split(".")
    assert int(expiry) == int(NOW) + 3600 and len(mac) == 43 and len(token) <= MAX_TOKEN
    assert tokens.valid(token, CLIENT, NOW)
    assert tokens.valid(token, CLIENT, NOW + 3599)
    assert not tokens.valid(token, CLIENT, NOW + 3600)  # expired
    assert not tokens.valid(token, CLIENT, NOW + 86_400)


def test_a_token_is_bound_to_the_client_the_service_and_the_secret(tokens) -> None:
    token = tokens.issue(CLIENT, NOW)
    assert not tokens.valid(token, "192.0.2.8", NOW)
    assert not tokens.valid(token, "2001:db8::/64", NOW)
    assert not ChallengeTokens(SECRET, "other", 3600).valid(token, CLIENT, NOW)
    assert not ChallengeTokens(SECRET, "sit", 3600).valid(token, CLIENT, NOW)
    assert not ChallengeTokens(b"t" * 32, "site", 3600).valid(token, CLIENT, NOW)
    # the same bytes split differently between service and client are another message
    assert not ChallengeTokens(SECRET, "site\0192.0.2", 3600).valid(token, ".7", NOW)


def test_a_tampered_token_is_invalid(tokens) -> None:
    token = tokens.issue(CLIENT, NOW)
    expiry, mac = token.split(".")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    assert not tokens.valid(f"{expiry}.{flipped}", CLIENT, NOW)
    assert not tokens.valid(f"{int(expiry) + 60}.{mac}", CLIENT, NOW)  # a longer life
    assert not tokens.valid(f"{int(expiry) - 60}.{mac}", CLIENT, NOW)
    assert not tokens.valid(f"0{expiry}.{mac}", CLIENT, NOW)  # the same number, another text
    assert not tokens.valid(f"{expiry}.{mac}=", CLIENT, NOW)
    assert not tokens.valid(mac, CLIENT, NOW)


def test_a_far_future_expiry_is_refused_even_with_its_mac() -> None:
    """A token of a longer ttl (a reload shortened it) or a wall clock far behind."""
    long_lived = ChallengeTokens(SECRET, "site", 86_400).issue(CLIENT, NOW)
    assert not ChallengeTokens(SECRET, "site", 3600).valid(long_lived, CLIENT, NOW)
    assert ChallengeTokens(SECRET, "site", 3600).valid(long_lived, CLIENT, NOW + 82_800)


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "1.",
        ".abc",
        "x" * 10_000,
        "9" * 10_000 + "." + "A" * 43,
        "1" * 13 + "." + "A" * 43,
        "1700003600." + "A" * 42,
        "1700003600." + "A" * 44,
        "1700003600.AAAA.AAAA" + "A" * 35,  # dotted
        "17000.03600." + "A" * 43,
        "1700003600." + "é" * 43,
        "1700003600." + "A" * 42 + "\u0661",
        "\u0661\u0662." + "A" * 43,  # non-ASCII digits
        "-1700003600." + "A" * 43,
        "+1700003600." + "A" * 43,
        " 1700003600." + "A" * 43,
        "1700003600." + "A" * 42 + "=",
        "1700003600." + "A" * 42 + "\x00",
    ],
)
def test_malformed_tokens_are_invalid(tokens, token: str) -> None:
    assert not tokens.valid(token, CLIENT, NOW)


def test_a_short_secret_is_refused_and_never_shown() -> None:
    with pytest.raises(ValueError):
        ChallengeTokens(b"short", "site", 3600)
    assert "sss" not in repr(ChallengeTokens(SECRET, "site", 3600))


# ---- when, settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "parsed"),
    [
        ("rate > 50/s", "rate > 50/s", (50, 1)),
        ("50/s", "rate > 50/s", (50, 1)),
        ("rate>3000/m", "rate > 3000/m", (3000, 60)),
        ("  rate  >  10/30s ", "rate > 10/30s", (10, 30)),
        ("rate > 20/d", "rate > 20/d", (20, 86_400)),
    ],
)
def test_when_is_a_rate(text: str, canonical: str, parsed: tuple[int, int]) -> None:
    assert parse_when(text) == parsed
    assert format_when(*parsed) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "rate < 50/s",
        "rate > lots",
        "rate > 50/s and more",
        "rate >",
        "rate > 0/s",
        "rate > 10000000/s",
        "rate > 1/2d",
        "speed > 5/s",
        "rate > > 5/s",
        50,
    ],
)
def test_bad_thresholds_are_refused(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_when(text)


ISSUE_EXAMPLE = {"match": {"path": "/"}, "when": "rate > 50/s", "kind": "cookie"}


def protection(challenge: dict[str, Any], **more: Any) -> Protection:
    return Protection.model_validate({"challenge": challenge, **more})


def test_the_issue_example_round_trips() -> None:
    block = protection(ISSUE_EXAMPLE)
    settings = block.challenge
    assert (settings.when, settings.kind, settings.ttl, settings.refuse_after, settings.window) == (
        "rate > 50/s",
        "cookie",
        3600.0,
        5,
        60.0,
    )
    spec = settings.spec()
    assert (spec.rule.name, spec.rule.count, spec.rule.period, spec.rule.burst) == (
        "challenge",
        50,
        1,
        49,
    )  # "more than 50 within a second"
    assert (spec.rule.key, spec.rule.action, spec.rule.path) == ("client_ip", "log", "/")
    dumped = block.model_dump(mode="json")
    assert Protection.model_validate(dumped) == block
    assert Protection().challenge is None


def test_a_full_challenge() -> None:
    settings = protection(
        {
            "match": {"path": "/app/", "methods": ["get", "POST"]},
            "when": "3000/m",
            "burst": 0,
            "kind": "javascript",
            "ttl": "30m",
            "refuse_after": 3,
            "window": "10m",
        }
    ).challenge
    spec = settings.spec()
    assert settings.when == "rate > 3000/m" and spec.rule.burst == 0
    assert spec.rule.methods == frozenset({"GET", "POST"}) and spec.rule.path == "/app/"
    assert (spec.kind, spec.ttl, spec.refuse_after, spec.window) == ("javascript", 1800.0, 3, 600.0)


@pytest.mark.parametrize(
    "challenge",
    [
        {},
        {"when": "rate > lots"},
        {"when": "rate > 50/s" + " " * 100},
        {"when": 50},
        ISSUE_EXAMPLE | {"kind": "captcha"},
        ISSUE_EXAMPLE | {"match": {"path": "app"}},
        ISSUE_EXAMPLE | {"match": {"path": "/" * 2000}},
        ISSUE_EXAMPLE | {"match": {"methods": ["GET"] * 17}},
        ISSUE_EXAMPLE | {"match": {"host": "x"}},
        ISSUE_EXAMPLE | {"burst": -1},
        ISSUE_EXAMPLE | {"burst": 10**30},
        ISSUE_EXAMPLE | {"burst": True},
        ISSUE_EXAMPLE | {"ttl": "30s"},
        ISSUE_EXAMPLE | {"ttl": "2d"},
        ISSUE_EXAMPLE | {"ttl": float("inf")},
        ISSUE_EXAMPLE | {"ttl": True},
        ISSUE_EXAMPLE | {"refuse_after": 0},
        ISSUE_EXAMPLE | {"refuse_after": 101},
        ISSUE_EXAMPLE | {"refuse_after": "5"},
        ISSUE_EXAMPLE | {"window": 0},
        ISSUE_EXAMPLE | {"window": "2h"},
        ISSUE_EXAMPLE | {"secret": "mine"},
    ],
)
def test_hostile_challenges_are_refused(challenge: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        protection(challenge)


def test_the_challenge_rule_name_is_reserved_when_there_is_a_challenge() -> None:
    named = {"rate_limits": [{"name": "challenge", "rate": "1/s"}]}
    assert Protection.model_validate(named).rate_limits[0].name == "challenge"
    with pytest.raises(ValidationError) as error:
        protection(ISSUE_EXAMPLE, **named)
    (detail,) = error.value.errors()
    assert detail["type"] == "config_conflict" and "challenge's" in detail["msg"]


# ---- the cookie taken out -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cookie", "left"),
    [
        (f"{COOKIE}=1.abc", None),
        (f'{COOKIE}="1.abc"', None),
        (f"a=1; {COOKIE}=1.abc", "a=1"),
        (f"{COOKIE}=1.abc; a=1", "a=1"),
        (f"a=1; {COOKIE}=1.abc; b=2", "a=1; b=2"),
        (f"a=1;{COOKIE}=1.abc;b=2", "a=1;b=2"),
        (f"a=1, {COOKIE}=1.abc", "a=1"),  # HTTP/2's fields joined
        (f"{COOKIE}=x; {COOKIE}=y; a=1", "a=1"),
        (f"x{COOKIE}=1; a=1", f"x{COOKIE}=1; a=1"),  # another cookie's name
        (f"a={COOKIE}=1", f"a={COOKIE}=1"),  # another cookie's value
        ("a=1; b=2", "a=1; b=2"),
    ],
)
def test_only_the_challenge_cookie_is_taken_out(cookie: str, left: str | None) -> None:
    headers = [("Host", "t"), ("Cookie", cookie), ("Accept", "*/*")]
    expected = [("Host", "t"), *([("Cookie", left)] if left else []), ("Accept", "*/*")]
    assert without_cookie(headers) == expected


def test_every_cookie_field_is_cleaned_and_others_are_untouched() -> None:
    headers = [("cookie", f"{COOKIE}=1"), ("X-Note", f"{COOKIE}=1"), ("cookie", "a=1")]
    assert without_cookie(headers) == [("X-Note", f"{COOKIE}=1"), ("cookie", "a=1")]


# ---- the node secret ------------------------------------------------------------------------------


def test_the_secret_is_made_once_private_and_read_back(tmp_path) -> None:
    path = tmp_path / "cache" / "control" / "challenge.key"
    secret = load_or_create_secret(path)
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == secret
    assert sorted(p.name for p in path.parent.iterdir()) == ["challenge.key"]  # no temp left


def test_racing_workers_all_get_the_first_secret(tmp_path) -> None:
    path = tmp_path / "control" / "challenge.key"
    got: list[bytes] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        got.append(load_or_create_secret(path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and len(set(got)) == 1 and got[0] == path.read_bytes()


def test_a_readable_secret_is_made_private(tmp_path, caplog) -> None:
    path = tmp_path / "challenge.key"
    path.write_bytes(b"k" * 32)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="verge.protect"):
        assert load_or_create_secret(path) == b"k" * 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "kkkk" not in caplog.text


def test_an_unusable_secret_file_falls_back_to_a_process_secret(tmp_path, caplog) -> None:
    path = tmp_path / "challenge.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with caplog.at_level(logging.ERROR, logger="verge.protect"):
        secret = node_secret(path)
    assert len(secret) == 32 and "unusable" in caplog.text
    assert node_secret(path) is secret  # memoised
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    assert node_secret(link) != secret  # a symbolic link is not followed
    assert not (tmp_path / "elsewhere.key").exists()
    assert node_secret(None) is node_secret(None)
    ch._node_secrets.clear()


# ---- strikes ------------------------------------------------------------------------------------------


def test_strikes_refuse_after_the_limit_until_the_window_ends() -> None:
    strikes = Strikes(limit=2, window=60.0)
    assert strikes.strike("a", 100.0) == 0.0
    assert strikes.strike("a", 110.0) == 0.0
    assert strikes.strike("a", 120.0) == 40.0  # refused: the window began at 100
    assert strikes.strike("b", 120.0) == 0.0  # another client
    assert strikes.strike("a", 160.0) == 0.0  # a new window
    strikes.forgive("a")
    assert strikes.strike("a", 161.0) == 0.0 and strikes.strike("a", 161.0) == 0.0
    assert strikes.strike("a", 161.0) > 0.0


def test_strikes_are_bounded_and_swept() -> None:
    strikes = Strikes(limit=1, window=10.0, max_keys=128)
    for n in range(1000):
        strikes.strike(f"k{n}", float(n) / 100)
    kept = len(strikes)
    assert 0 < kept <= 128
    assert strikes.sweep(5.0) == 0  # the newest windows have not ended
    assert strikes.sweep(1000.0) == kept and len(strikes) == 0


# ---- the decision ------------------------------------------------------------------------------------


def request(
    client: str = CLIENT,
    cookie: str | None = None,
    target: str = "/page",
    method: str = "GET",
    forwarded: str | None = None,
) -> Request:
    headers = [("Host", "t")]
    if cookie is not None:
        headers.append(("Cookie", cookie))
    if forwarded is not None:
        headers.append(("X-Forwarded-For", forwarded))
    return Request(method, target, headers=headers, client=client)


def challenge(spec: dict[str, Any] | None = None, **addresses: Any) -> Challenge:
    settings = protection(spec or {"when": "rate > 2/m", "refuse_after": 2}).challenge
    return Challenge("site", settings.spec(), ClientAddresses(**addresses), SECRET)


def token_of(verdict) -> str:
    return f"{COOKIE}={verdict.token}"


def test_under_the_rate_nothing_happens_over_it_a_challenge() -> None:
    guard = challenge()
    assert guard.check(request(), 0.0, NOW) is ch.PASS
    assert guard.check(request(), 1.0, NOW) is ch.PASS
    third = guard.check(request(), 2.0, NOW)
    assert (third.action, third.reason) == ("challenge", "no cookie")
    assert guard.tokens.valid(third.token, CLIENT, NOW)
    assert guard.check(request(cookie=token_of(third)), 3.0, NOW) is ch.PASS_STRIP
    assert guard.check(request("192.0.2.8"), 3.0, NOW) is ch.PASS  # another client
    assert guard.stats() == {
        "allowed": 4,
        "limited": 2,
        "blocked": 1,
        "challenged": 1,
        "passed": 1,
        "refused": 0,
    }


def test_a_client_without_the_cookie_is_refused_then_served_again_when_it_slows() -> None:
    guard = challenge({"when": "rate > 1/m", "refuse_after": 2, "window": "5m"})
    assert guard.check(request(), 0.0, NOW) is ch.PASS
    actions = [guard.check(request(), 1.0 + n, NOW) for n in range(4)]
    assert [v.action for v in actions] == ["challenge", "challenge", "refuse", "refuse"]
    assert actions[2].retry_after == pytest.approx(298.0)  # the window began at 1.0
    assert actions[2].reason == "refused after 2 unanswered"
    # refused clients cost no token: the count stays
    assert guard.stats()["challenged"] == 2 and guard.stats()["refused"] == 2
    # a valid cookie still passes a refused client (it kept its cookie after all)
    assert guard.check(request(cookie=token_of(actions[0])), 10.0, NOW).action == "pass"
    # its rate back under the threshold: served without any cookie
    assert guard.check(request(), 200.0, NOW) is ch.PASS


@pytest.mark.parametrize(
    "cookie",
    [
        f"{COOKIE}=1.forged",
        f"{COOKIE}=" + "A" * 10_000,
        f"{COOKIE}={int(NOW) + 60}." + "A" * 43,
        f"{COOKIE}=",
        f"a=1; {COOKIE}=é",
    ],
)
def test_a_bad_cookie_is_challenged_again(cookie: str) -> None:
    guard = challenge({"when": "rate > 1/m"})
    assert guard.check(request(cookie=cookie), 0.0, NOW) is ch.PASS_STRIP  # under: taken out
    verdict = guard.check(request(cookie=cookie), 1.0, NOW)
    assert (verdict.action, verdict.strip, verdict.reason) == ("challenge", True, "invalid cookie")


def test_another_clients_or_services_token_is_challenged() -> None:
    guard = challenge({"when": "rate > 1/m"})
    other = Challenge("other", guard.spec, guard.addresses, SECRET)
    for_other = other.tokens.issue(CLIENT, NOW)
    for_someone_else = guard.tokens.issue("192.0.2.99", NOW)
    guard.check(request(), 0.0, NOW)
    for token in (for_other, for_someone_else):
        assert guard.check(request(cookie=f"{COOKIE}={token}"), 1.0, NOW).action == "challenge"
    expired = guard.tokens.issue(CLIENT, NOW - 3600)
    assert guard.check(request(cookie=f"{COOKIE}={expired}"), 1.0, NOW).action == "challenge"


def test_the_client_is_the_rate_limits_client() -> None:
    """Behind a trusted proxy, the forwarded address; IPv6 by its /64."""
    guard = challenge({"when": "rate > 1/m"}, trusted_proxies=["10.0.0.0/8"])
    guard.check(request("10.0.0.1", forwarded="198.51.100.7"), 0.0, NOW)
    verdict = guard.check(request("10.0.0.2", forwarded="198.51.100.7"), 1.0, NOW)
    assert verdict.action == "challenge"
    assert guard.tokens.valid(verdict.token, "198.51.100.7", NOW)
    assert guard.check(request("10.0.0.1", forwarded="198.51.100.8"), 1.0, NOW) is ch.PASS
    v6 = challenge({"when": "rate > 1/m"})
    v6.check(request("2001:db8::1"), 0.0, NOW)
    token = v6.check(request("2001:db8::2"), 1.0, NOW).token  # the same /64
    assert v6.check(request("2001:db8::3", cookie=f"{COOKIE}={token}"), 2.0, NOW) is ch.PASS_STRIP


def test_only_matching_requests_count() -> None:
    guard = challenge({"match": {"path": "/app/", "methods": ["POST"]}, "when": "rate > 1/m"})
    for _ in range(5):
        assert guard.check(request(target="/app/x"), 0.0, NOW) is ch.PASS  # GET
        assert guard.check(request(target="/other", method="POST"), 0.0, NOW) is ch.PASS
    assert guard.check(request(target="/app/x", method="POST"), 0.0, NOW) is ch.PASS
    assert guard.check(request(target="/app/x", method="POST"), 0.0, NOW).action == "challenge"


# ---- the answers ---------------------------------------------------------------------------------


def test_the_cookie_answer_redirects_to_the_same_url() -> None:
    spec = protection(ISSUE_EXAMPLE).challenge.spec()
    status, fields, _body = challenge_answer(spec, "1.abc", "/a?b=1", secure=False)
    fields = dict(fields)
    assert status == 307 and fields["Location"] == "/a?b=1"
    assert fields["Set-Cookie"] == f"{COOKIE}=1.abc; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600"
    assert fields["Cache-Control"] == "no-store"
    secure = dict(challenge_answer(spec, "1.abc", "/", secure=True)[1])
    assert secure["Set-Cookie"].endswith("; Secure")


def test_the_javascript_answer_sets_the_cookie_in_a_script() -> None:
    spec = protection(ISSUE_EXAMPLE | {"kind": "javascript", "ttl": "10m"}).challenge.spec()
    status, fields, body = challenge_answer(spec, "1.abc", "/", secure=False)
    assert status == 503 and dict(fields)["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in dict(fields)
    assert (
        b'document.cookie="__verge_challenge=1.abc; Path=/; SameSite=Lax; Max-Age=600"' in body
        and b"location.reload()" in body
        and len(body) < 400
    )


def test_the_refusal_says_when_to_come_back() -> None:
    status, fields, _ = refusal_answer(12.2)
    assert status == 429 and dict(fields)["Retry-After"] == "13"
    assert dict(refusal_answer(0.0)[1])["Retry-After"] == "1"
