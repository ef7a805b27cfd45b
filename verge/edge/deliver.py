"""The deliver phase: turning a stored entry into response bytes for one request.

Everything here is synchronous and allocation-lean because a memory hit is served from
``handle_fast`` without a task: the entry's status line and headers are rendered once per
config generation and cached on the entry; per request only ``Age``, ``Cache-Status``,
framing and the body are added. Conditional requests (304), single ranges (206/416) and
HEAD are answered here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from verge.cache.policy import age_value, not_modified_for
from verge.cache.store import CacheEntry
from verge.http.message import Headers, get_header, strip_hop_by_hop
from verge.http.ranges import Unsatisfiable, content_range, if_range_ok, parse_range
from verge.http.server import CLOCK, REASONS

# Fields never stored with a cached response: connection-specific or recomputed per delivery.
NOT_STORED = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization", "content-length", "age",
    "surrogate-control", "cache-status",  # an upstream tier's verdict belongs to that response
})


@dataclass(slots=True)
class HeaderPlan:
    """Response header edits of a service + rule, resolved once per config generation."""

    remove: frozenset[str] = frozenset()
    add: tuple[tuple[str, str], ...] = ()
    vary_accept_encoding: bool = False  # the edge may compress this response's type


def storable_headers(headers: Headers, strip_cookies: bool) -> Headers:
    """End-to-end fields worth storing: minus hop-by-hop, those named in Connection, framing."""
    drop = NOT_STORED | {"set-cookie"} if strip_cookies else NOT_STORED
    return [(n, v) for n, v in strip_hop_by_hop(headers) if n.lower() not in drop]


def apply_plan(headers: Headers, plan: HeaderPlan) -> Headers:
    out = [(n, v) for n, v in headers if n.lower() not in plan.remove] if plan.remove else list(headers)
    out.extend(plan.add)
    if plan.vary_accept_encoding:
        out = add_vary(out, "Accept-Encoding")
    return out


def add_vary(headers: Headers, field: str) -> Headers:
    current = get_header(headers, "vary")
    if current is None:
        return [*headers, ("Vary", field)]
    names = {v.strip().lower() for v in current.split(",")}
    if field.lower() in names or "*" in names:
        return headers
    return [(n, v) for n, v in headers if n.lower() != "vary"] + [("Vary", f"{current}, {field}")]


def render_head(status: int, reason: str, headers: Headers) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, 'Unknown')}\r\n"]
    lines.extend(f"{n}: {v}\r\n" for n, v in headers)
    return "".join(lines).encode("latin-1")


def entry_head(entry: CacheEntry, plan: HeaderPlan, generation: int, node: str) -> tuple:
    """(generation, head, hit_tail, plan), cached on the entry per generation and plan.

    ``head`` is the status line and stored headers after the plan; ``hit_tail`` is what a
    plain full hit adds after ``Age``: Cache-Status, Content-Length and the blank line.
    """
    rendered = entry.rendered
    if rendered is not None and rendered[0] == generation and rendered[3] is plan:
        return rendered
    head = render_head(entry.status, entry.reason, apply_plan(entry.headers, plan))
    length = b"" if entry.status in (204, 304) else b"Content-Length: %d\r\n" % entry.body_size
    tail = cache_status_value(entry.headers, f"{node}; hit") + length + b"\r\n"
    entry.rendered = rendered = (generation, head, tail, plan)
    return rendered


def connection_field(version: str, connection: str | None) -> bytes:
    """The Connection line a fast response needs (the server closes when told so)."""
    if connection is None:
        return b""
    conn = connection.lower()
    if "close" in conn:
        return b"Connection: close\r\n"
    if version == "1.0" and "keep-alive" in conn:
        return b"Connection: keep-alive\r\n"
    return b""


def after_upstream(upstream_headers: Headers, ours: str) -> str:
    """Our Cache-Status member after those of the tiers nearer the origin (RFC 9211 §2)."""
    upstream = get_header(upstream_headers, "cache-status")
    return f"{upstream}, {ours}" if upstream else ours


def cache_status_value(entry_headers: Headers, ours: str) -> bytes:
    """RFC 9211: our member goes last, after those of caches nearer the origin."""
    upstream = get_header(entry_headers, "cache-status")
    value = f"{upstream}, {ours}" if upstream else ours
    return b"Cache-Status: " + value.encode("latin-1") + b"\r\n"


@dataclass(slots=True)
class Delivery:
    """What to send for an entry: the head bytes and which body bytes (None = no body)."""

    status: int
    head: bytes
    start: int = 0
    end: int = 0  # exclusive
    has_body: bool = True


@dataclass(slots=True, frozen=True)
class Answer:
    """Which response a request gets from a 200 (stored or being filled): the whole body
    (``status`` 200), a range of it (206, ``start``..``last`` inclusive), 304 or 416."""

    status: int
    start: int = 0
    last: int = 0


FULL = Answer(200)


def choose_answer(hmap, status: int, etag: str | None, last_modified: str | None,
                  stored_date: float | None, size: int | None) -> Answer:
    """The one decision (RFC 9110 §13, §14) for stored entries and in-flight fills alike:
    If-None-Match / If-Modified-Since -> 304; Range honoured when If-Range allows and the
    size is known -> 206 or 416; else the whole response."""
    if status != 200:
        return FULL
    if ("if-none-match" in hmap or "if-modified-since" in hmap) and \
            not_modified_for(hmap, etag, last_modified, stored_date=stored_date):
        return Answer(304)
    range_header = hmap.get("range")
    if range_header is None or size is None or \
            not if_range_ok(hmap.get("if-range"), etag, last_modified):
        return FULL
    try:
        span = parse_range(range_header, size)
    except Unsatisfiable:
        return Answer(416)
    return FULL if span is None else Answer(206, span[0], span[1])


def plan_delivery(entry: CacheEntry, hmap, method: str, version: str, now: float,
                  plan: HeaderPlan, generation: int, node: str, cache_status: str) -> Delivery:
    """Choose 200 / 206 / 304 / 416 for this request and build the head."""
    freshness = entry.freshness
    base = entry_head(entry, plan, generation, node)[1]
    extra = b"".join((
        b"Age: %d\r\n" % age_value(freshness, now),
        cache_status_value(entry.headers, cache_status),
        connection_field(version, hmap.get("connection")),
    ))
    size = entry.body_size
    answer = FULL
    if entry.status == 200 and ("if-none-match" in hmap or "if-modified-since" in hmap
                                or "range" in hmap):
        answer = choose_answer(hmap, entry.status, freshness.etag, freshness.last_modified,
                               freshness.response_time, size)
    if answer.status == 304:
        head = b"HTTP/1.1 304 Not Modified\r\n" + base[base.index(b"\r\n") + 2:] + extra + b"\r\n"
        return Delivery(304, head, has_body=False)
    if answer.status == 416:
        head = (b"HTTP/1.1 416 Range Not Satisfiable\r\n" + CLOCK.date_header
                + b"Content-Range: bytes */%d\r\nContent-Length: 0\r\n" % size + extra + b"\r\n")
        return Delivery(416, head, has_body=False)
    if answer.status == 206:
        start, last = answer.start, answer.last
        partial = (b"HTTP/1.1 206 Partial Content\r\n" + base[base.index(b"\r\n") + 2:]
                   + b"Content-Range: " + content_range(start, last, size).encode()
                   + b"\r\nContent-Length: %d\r\n" % (last - start + 1) + extra + b"\r\n")
        return Delivery(206, partial, start, last + 1, method != "HEAD")
    length = b"" if entry.status == 204 else b"Content-Length: %d\r\n" % size
    head = base + length + extra + b"\r\n"
    has_body = method != "HEAD" and entry.status not in (204, 304)
    return Delivery(entry.status, head, 0, size, has_body)
