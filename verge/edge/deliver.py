"""The deliver phase: one protocol-neutral Response for a request, from a stored entry or
an in-flight fill alike (:func:`deliver` over a :class:`Source`).

Everything here is synchronous and allocation-lean because a memory hit is served from
``handle_fast`` without a task: an entry's fields after the service's header plan are
computed once per config generation and cached on the entry; per request only ``Age`` and
``Cache-Status`` are added (framing is the protocol's). Conditional requests (304), single
ranges (206/416) and HEAD are decided here, by :func:`choose_answer`, for both sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from verge.cache.policy import not_modified_for
from verge.cache.store import CacheEntry
from verge.http.message import Headers, get_header, strip_hop_by_hop
from verge.http.ranges import Unsatisfiable, content_range, if_range_ok, parse_range
from verge.http.response import Response
from verge.http.server import CLOCK, NO_BODY_STATUSES

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


def encoded_etag(etag: str, encoding: str) -> str:
    """The ETag of a compressed variant: the identity's with the encoding appended, so the
    two never validate each other (RFC 9110 §8.8.3: a strong ETag names one representation)."""
    if etag.endswith('"'):
        return f'{etag[:-1]}-{encoding}"'
    return etag


def entry_head(entry: CacheEntry, plan: HeaderPlan, generation: int) -> Headers:
    """The entry's stored fields after the plan, cached on the entry per generation and plan
    (the per-request fields, Age and Cache-Status, are added by :func:`deliver`)."""
    rendered = entry.rendered
    if rendered is not None and rendered[0] == generation and rendered[2] is plan:
        return rendered[1]
    headers = apply_plan(entry.headers, plan)
    entry.rendered = (generation, headers, plan)
    return headers


def after_upstream(upstream_headers: Headers, ours: str) -> str:
    """Our Cache-Status member after those of the tiers nearer the origin (RFC 9211 §2)."""
    upstream = get_header(upstream_headers, "cache-status")
    return f"{upstream}, {ours}" if upstream else ours


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


@dataclass(slots=True)
class Source:
    """What deliver needs of a stored entry or an in-flight fill: the response as stored
    (fields after the plan), its validators and size, and how to read a byte range of its
    body (``body(start, end)``: bytes, a FileBody or an async source; end exclusive, None:
    to the end, which for a fill means until it is complete and stored)."""

    status: int
    reason: str
    headers: Headers
    etag: str | None
    last_modified: str | None
    stored_at: float | None
    size: int | None
    body: Callable[[int, int | None], object]


def deliver(source: Source, hmap, method: str, extra: Headers) -> Response:
    """The one deliver phase (RFC 9110 §13, §14, §15.4.5): 200, 206, 304 or 416 for this
    request from an entry or a fill, with ``extra`` (Age, Cache-Status) appended. HEAD gets
    the GET's fields and length without a body."""
    answer = FULL
    if source.status == 200 and ("if-none-match" in hmap or "if-modified-since" in hmap
                                 or "range" in hmap):
        answer = choose_answer(hmap, source.status, source.etag, source.last_modified,
                               source.stored_at, source.size)
    if answer.status == 304:
        return Response(304, [*source.headers, *extra])
    if answer.status == 416:
        return Response(416, [("Date", CLOCK.date), ("Content-Range", f"bytes */{source.size}"),
                              *extra], length=0)
    head_only = method == "HEAD" or source.status in NO_BODY_STATUSES
    if answer.status == 206:
        start, end = answer.start, answer.last + 1
        headers = [*source.headers, ("Content-Range",
                                     content_range(answer.start, answer.last, source.size)),
                   *extra]
        return Response(206, headers, None if head_only else source.body(start, end),
                        end - start)
    body = None if head_only else source.body(0, None)  # a fill's: until it is complete
    return Response(source.status, [*source.headers, *extra], body, source.size,
                    reason=source.reason)
