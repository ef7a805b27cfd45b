"""The cookie challenge: a client over a rate must show it keeps cookies before it is served.

::

    protection:
      challenge: {match: {path: /}, when: "rate > 50/s", kind: cookie}

Why: a flood of plain requests from a few addresses is what most flood tools send, and a
browser (or ``curl -b jar -c jar``) keeps cookies while most flood tools do not. nginx's
testcookie module and Cloudflare's managed challenge use the same test. A request that
``match`` selects counts against the client's rate (a GCRA at ``when``, verge.protect.gcra,
run by verge.protect.ratelimit's ``RateLimiter`` as one ``log`` rule keyed by the client
address: the same matching, key, trusted proxies and node-wide placement as a rate limit).
Under the rate nothing happens. Over it, a request that carries a valid challenge cookie is
served; one that does not gets a challenge instead of the content:

- ``kind: cookie``: ``307`` to the same URL with ``Set-Cookie: __verge_challenge=TOKEN;
  Path=/; HttpOnly; SameSite=Lax; Max-Age=TTL`` (and ``Secure`` over HTTPS); a client that
  keeps cookies comes back with it and passes. 307 rather than 302: the method and body
  are kept.
- ``kind: javascript``: a tiny HTML page (status 503, so no crawler indexes it) whose script
  sets the cookie and reloads: a client must run JavaScript too.

A client that keeps coming back without a valid cookie is refused: more than
``refuse_after`` challenges within ``window`` seconds and it gets ``429`` (with
``Retry-After``: the rest of its window, and its connection closed) until the window ends.
429 rather than 403: the refusal is temporary and caused by the client's rate, a client that
slows down below ``when`` is served again without any cookie, and 403 would tell an API
client without a cookie jar that it is forbidden for good. These counts are per worker (a
client steered to one worker, verge.protect.steer, meets exactly ``refuse_after``).

The token: ``EXPIRY.MAC``, EXPIRY the Unix second it expires (decimal, at most 12 digits),
MAC the unpadded base64url of HMAC-SHA256(node secret, service, client key, expiry) — 43
characters. The client key is the rate limits' (verge.protect.keys: through trusted proxies,
IPv6 by its prefix), so a token is good for one client, one service and ``ttl`` seconds; any
other token is invalid, checked in constant time after cheap bounds (length, ASCII, one
dot). The node secret is 32 random bytes in the node's cache directory
(``CACHE_DIR/control/challenge.key``, mode 0600), made once by whichever worker needs it
first (temp file + link: the workers never see half a file) and read by the others, so a
token from one worker passes on every worker of the node. It is never logged. Another node
has another secret: a client sent to another node is challenged there once more.

The cookie is the edge's, not the origin's: the protect phase takes it out of the request
(``without_cookie``) before the cache and the origin see it, so an origin answering with
``Vary: Cookie`` does not get one cache variant per challenged client.
"""

from __future__ import annotations

import base64
import hmac
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal, NamedTuple

from verge.protect.gcra import DEFAULT_MAX_KEYS, EVICT_FRACTION
from verge.protect.keys import ClientAddresses, RequestLike, cookie_value
from verge.protect.ratelimit import ALLOW, RateLimiter, RuleSpec, format_rate, parse_rate
from verge.protect.shared import SharedTable

log = logging.getLogger("verge.protect")

COOKIE = "__verge_challenge"
RULE = "challenge"
"""The challenge's name among a service's rate-limit rules (its counters in the per-rule
stats and on /metrics); no rate-limit rule of a service with a challenge may take it."""
SECRET_FILE = os.path.join("control", "challenge.key")
"""Where the node secret lives, under the node's cache directory."""
SECRET_BYTES = 32
MAC_CHARS = 43  # base64url of 32 bytes, unpadded
MAX_EXPIRY_DIGITS = 12
MAX_TOKEN = MAX_EXPIRY_DIGITS + 1 + MAC_CHARS
"""The longest token: anything longer is refused before any hashing."""
CLOCK_SLACK = 60.0
"""Seconds a token's expiry may lie beyond now + ttl (the wall clock stepped back)."""
_COOKIE_EQ = COOKIE + "="
_TOKEN_CHARS = re.compile(r"[1-9][0-9]{0,11}\.[A-Za-z0-9_-]{43}")  # one text per token
_OURS = re.compile(r"(?:^|[;,])\s*" + re.escape(COOKIE) + r"=[^;,]*")
_WHEN_RE = re.compile(r"\s*(?:rate\s*>\s*)?(.*)", re.DOTALL)


# ----- the ``when`` syntax ----------------------------------------------------------------------


def parse_when(text: str) -> tuple[int, int]:
    """(count, period in seconds) of a threshold: "rate > 50/s", or the rate alone "50/s"."""
    if not isinstance(text, str):
        raise ValueError(f'invalid threshold {text!r}: use "rate > COUNT/UNIT", e.g. rate > 50/s')
    match = _WHEN_RE.fullmatch(text)
    try:
        return parse_rate(match[1] if match is not None else text)
    except ValueError:
        raise ValueError(
            f'invalid threshold {text!r}: use "rate > COUNT/UNIT" (unit s, m, h or d), '
            "e.g. rate > 50/s or rate > 3000/m"
        ) from None


def format_when(count: int, period: int) -> str:
    """The canonical text of a threshold: (50, 1) -> "rate > 50/s"."""
    return f"rate > {format_rate(count, period)}"


# ----- the token ----------------------------------------------------------------------------------


def _text(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class ChallengeTokens:
    """Issue and check the tokens of one service: bound to a client key and an expiry."""

    __slots__ = ("_keyed", "_service", "ttl")

    def __init__(self, secret: bytes, service: str, ttl: float) -> None:
        if len(secret) < 16:
            raise ValueError("the challenge secret must be at least 16 bytes")
        # The HMAC keyed and fed the service once; each MAC copies it (a third of the cost
        # of keying a new one per token).
        self._keyed = hmac.new(secret, _text(f"verge-challenge/1\0{service}\0"), "sha256")
        self._service = service
        self.ttl = int(ttl)

    def __repr__(self) -> str:  # never the secret
        return f"ChallengeTokens(service={self._service!r}, ttl={self.ttl})"

    def _mac(self, client: str, expiry: int) -> str:
        """HMAC-SHA256(secret, "verge-challenge/1" NUL service NUL client NUL expiry): NUL
        occurs in no service name or client key, so no two triples make one message."""
        mac = self._keyed.copy()
        mac.update(_text(f"{client}\0{expiry}"))
        return _b64(mac.digest())

    def issue(self, client: str, now: float) -> str:
        """A token for ``client`` (its rate-limit key) valid ``ttl`` seconds from ``now``
        (Unix time)."""
        expiry = int(now) + self.ttl
        return f"{expiry}.{self._mac(client, expiry)}"

    def valid(self, token: str, client: str, now: float) -> bool:
        """Whether ``token`` was issued by this service for ``client`` and is unexpired at
        ``now``. Bounds first (length, characters, one dot), then the MAC in constant time."""
        if len(token) > MAX_TOKEN or not token.isascii() or not _TOKEN_CHARS.fullmatch(token):
            return False
        expiry_text, _, mac = token.partition(".")
        expiry = int(expiry_text)
        if not now < expiry <= now + self.ttl + CLOCK_SLACK:
            return False
        return hmac.compare_digest(mac, self._mac(client, expiry))


# ----- the node secret ----------------------------------------------------------------------------

_node_secrets: dict[str, bytes] = {}


def node_secret(path: str | os.PathLike | None) -> bytes:
    """The node's challenge secret kept at ``path`` (made there once), memoised per process;
    None: a secret of this process alone (a single process, tests). A file that cannot be
    read or made also gives a secret of this process, with an error in the log: tokens then
    pass only on the worker that issued them."""
    if path is None:
        path = ""
    secret = _node_secrets.get(str(path))
    if secret is not None:
        return secret
    if not path:
        secret = secrets.token_bytes(SECRET_BYTES)
    else:
        try:
            secret = load_or_create_secret(Path(path))
        except (OSError, ValueError) as exc:
            log.error(
                "challenge secret %s unusable (%s): this worker uses its own, so its "
                "tokens pass on it alone (delete the file to have a new one made)",
                path,
                exc,
            )
            secret = secrets.token_bytes(SECRET_BYTES)
    _node_secrets[str(path)] = secret
    return secret


def load_or_create_secret(path: Path) -> bytes:
    """The secret in ``path``, made first if there is none: 32 random bytes written to a
    private temp file and linked into place, so a reader sees the whole file or none, and
    when workers race the first link wins and every one reads the winner's."""
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
            _sync_directory(path.parent)
        except FileExistsError:
            pass  # another worker made it first: use theirs
    finally:
        os.unlink(temp)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("challenge secret %s was readable by others: now mode 0600", path)
        data = os.read(fd, SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != SECRET_BYTES:
        raise ValueError(f"{len(data)} bytes, not {SECRET_BYTES}")
    return data


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- the request side ---------------------------------------------------------------------------


def without_cookie(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The header list without the challenge cookie (a Cookie field left empty goes too);
    the other cookies are kept as they were. Pairs are separated by ";" or "," (HTTP/2's
    joined fields), as verge.protect.keys.cookie_value reads them."""
    out = []
    for name, value in headers:
        if _COOKIE_EQ in value and name.lower() == "cookie":
            value = _OURS.sub("", value).strip(" \t;,")
            if not value:
                continue
        out.append((name, value))
    return out


def carries_cookie(request: RequestLike) -> bool:
    """Whether the request may carry the challenge cookie (cheap: a substring test)."""
    cookie = request.hmap.get("cookie")
    return cookie is not None and _COOKIE_EQ in cookie


# ----- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChallengeSpec:
    """A service's challenge (the config's ``protection.challenge``, parsed)."""

    rule: RuleSpec
    """The rate the client is measured against: which requests, the rate and its burst."""
    kind: Literal["cookie", "javascript"] = "cookie"
    ttl: float = 3600.0
    refuse_after: int = 5
    window: float = 60.0


class Verdict(NamedTuple):
    """What the challenge decided: ``pass`` (serve; ``strip``: take the cookie out first),
    ``challenge`` (answer with ``token`` instead) or ``refuse`` (429 for ``retry_after``
    seconds); ``reason`` says why a client was challenged or refused."""

    action: Literal["pass", "challenge", "refuse"]
    strip: bool = False
    token: str = ""
    retry_after: float = 0.0
    reason: str = ""


PASS = Verdict("pass")
PASS_STRIP = Verdict("pass", True)


class Strikes:
    """Challenges each client left unanswered within its window: after ``limit`` of them
    the client is refused until the window (started by its first challenge) ends. A valid
    cookie wipes the slate. Bounded like the GCRA tables: least recently struck first out
    (forgetting a client only gives it a fresh window: permissive, never stricter)."""

    __slots__ = ("limit", "window", "max_keys", "_table")

    def __init__(self, limit: int, window: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._table: dict[str, list] = {}  # key -> [challenges, end of window]

    def __len__(self) -> int:
        return len(self._table)

    def strike(self, key: str, now: float) -> float:
        """Count one more challenge for ``key``: 0.0 if it may have it, else the seconds until
        its window ends (refuse)."""
        table = self._table
        entry = table.pop(key, None)  # re-inserted: the dict stays in LRU order
        if entry is None or now >= entry[1]:
            if entry is None and len(table) >= self.max_keys:
                for old in list(islice(table, max(1, self.max_keys // EVICT_FRACTION))):
                    del table[old]
            entry = [0, now + self.window]
        table[key] = entry
        if entry[0] >= self.limit:
            return entry[1] - now
        entry[0] += 1
        return 0.0

    def forgive(self, key: str) -> None:
        if self._table:
            self._table.pop(key, None)

    def sweep(self, now: float, budget: int = 10_000) -> int:
        """Drop ended windows from the least recently struck end (bounded work)."""
        table = self._table
        ended = []
        for key, (_count, end) in islice(table.items(), budget):
            if end > now:
                break
            ended.append(key)
        for key in ended:
            del table[key]
        return len(ended)


class Challenge:
    """One service's challenge: its rate, tokens and strikes, and what it counted.

    ``addresses``: the service's client addresses (trusted proxies, IPv6 prefix); ``shared``
    and ``steered`` place the rate's state as a rate limit's (verge.protect.ratelimit)."""

    def __init__(
        self,
        service: str,
        spec: ChallengeSpec,
        addresses: ClientAddresses,
        secret: bytes,
        *,
        shared: SharedTable | None = None,
        steered: bool = False,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.spec = spec
        self.addresses = addresses
        self.limiter = RateLimiter(
            [spec.rule],
            addresses=addresses,
            shared=shared,
            steered=steered,
            scope=f"{service}/challenge",
            max_keys=max_keys,
        )
        self.rate = self.limiter.counters[spec.rule.name]  # allowed: under; limited: over
        self.tokens = ChallengeTokens(secret, service, spec.ttl)
        self.strikes = Strikes(spec.refuse_after, spec.window, max_keys)
        self.challenged = 0
        self.passed = 0  # over the rate, with a valid cookie
        self.refused = 0

    def check(self, request: RequestLike, now: float, wall: float) -> Verdict:
        """Decide for one request; ``now``: the monotonic clock (the rate, the strikes),
        ``wall``: Unix time (the tokens' expiry)."""
        present = carries_cookie(request)
        if self.limiter.evaluate(request, now) is ALLOW:  # not matched, or under the rate
            return PASS_STRIP if present else PASS
        key = self.addresses.key(request)
        token = cookie_value(request.hmap.get("cookie"), COOKIE) if present else None
        if token is not None and self.tokens.valid(token, key, wall):
            self.strikes.forgive(key)
            self.passed += 1
            return PASS_STRIP
        wait = self.strikes.strike(key, now)
        if wait > 0.0:
            self.refused += 1
            return Verdict(
                "refuse",
                present,
                retry_after=wait,
                reason=f"refused after {self.spec.refuse_after} unanswered",
            )
        self.challenged += 1
        return Verdict(
            "challenge",
            present,
            self.tokens.issue(key, wall),
            reason="invalid cookie" if token is not None else "no cookie",
        )

    def sweep(self, now: float) -> None:
        self.limiter.sweep(now)
        self.strikes.sweep(now)

    def stats(self) -> dict[str, int]:
        """Its counters, in a rate-limit rule's shape (allowed: served, under the rate or
        with a valid cookie; limited: over the rate; blocked: challenged or refused) plus
        its own outcomes."""
        return {
            "allowed": self.rate.allowed + self.passed,
            "limited": self.rate.limited,
            "blocked": self.challenged + self.refused,
            "challenged": self.challenged,
            "passed": self.passed,
            "refused": self.refused,
        }


# ----- the answers --------------------------------------------------------------------------------

Reply = tuple[int, list[tuple[str, str]], bytes]


def set_cookie(token: str, ttl: float, *, secure: bool) -> str:
    return f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={int(ttl)}" + (
        "; Secure" if secure else ""
    )


def challenge_answer(spec: ChallengeSpec, token: str, target: str, *, secure: bool) -> Reply:
    """(status, fields, body) of a challenge: the 307 back to ``target`` with the cookie, or
    the page whose script sets it (the token's characters are digits, "." and base64url:
    nothing to escape in HTML or a JavaScript string)."""
    if spec.kind == "javascript":
        cookie = f"{COOKIE}={token}; Path=/; SameSite=Lax; Max-Age={int(spec.ttl)}" + (
            "; Secure" if secure else ""
        )
        page = (
            "<!doctype html><meta charset=utf-8><meta name=robots content=noindex>"
            "<title>One moment</title><noscript>Please enable JavaScript and cookies"
            f'</noscript><script>document.cookie="{cookie}";location.reload()</script>\n'
        )
        return (
            503,
            [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")],
            page.encode(),
        )
    return (
        307,
        [
            ("Location", target),
            ("Set-Cookie", set_cookie(token, spec.ttl, secure=secure)),
            ("Cache-Control", "no-store"),
            ("Content-Type", "text/plain; charset=utf-8"),
        ],
        b"cookie check: follow the redirect with the cookie\n",
    )


def refusal_answer(retry_after: float) -> Reply:
    """(429, fields, body) for a client that ignored its challenges."""
    wait = max(1, math.ceil(retry_after - 1e-9))
    return (
        429,
        [
            ("Retry-After", str(wait)),
            ("Cache-Control", "no-store"),
            ("Content-Type", "text/plain; charset=utf-8"),
        ],
        b"too many requests without the challenge cookie\n",
    )
