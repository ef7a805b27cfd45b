"""The sample origin that ``make demo`` / ``verge up`` puts behind the edges.

Someone who has just started Verge needs content behind the edges that shows caching at
work with nothing but curl: endpoints with different Cache-Control policies, validators
(ETag / Last-Modified, answered with 304), ``Vary``, surrogate keys for tag purges, slow
and very large responses, and a request echo. Every response carries ``X-Origin-Hits: n``,
a per-path counter of requests that reached this origin, so a cache hit at the edge is
visible as a number that did not move.

It is an application of the project's own HTTP/1.1 server (:mod:`verge.http.server`), not
a server of its own and not uvicorn: that server already does keep-alive, pipelining,
``Expect: 100-continue``, streamed bodies both ways and the input limits, so the sample
is only its routes; and the edges then fetch from the same HTTP code they serve with. An
ASGI stack (uvicorn, FastAPI) would add an adaptor layer and its own logging for nothing
the sample needs. 304 decisions use the cache policy's validator comparison
(:func:`verge.cache.policy.not_modified_for`), the same one the edge answers clients with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import html
import json
import logging
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, unquote, urlencode

from verge.cache.policy import not_modified_for
from verge.http.message import Headers, Request
from verge.http.response import Response
from verge.http.server import CLOCK, HttpApp, ServerLimits, serve
from verge.http_semantics import REASONS

log = logging.getLogger("verge.demo.origin")

SERVER_NAME = "verge-demo-origin"
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may sit idle (or stall mid-request)
BIG_DEFAULT = 10 * 1024 * 1024
BIG_MAX = 1024 * 1024 * 1024
ECHO_MAX = BIG_MAX  # the largest request body /echo takes (413 beyond)
SLOW_DEFAULT_MS = 1000
SLOW_MAX_MS = 60_000
STATIC_CACHE_CONTROL = "public, max-age=86400"
STATIC_LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"  # fixed: the assets never change
ECHO_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
LIMITS = ServerLimits(
    max_body_bytes=ECHO_MAX,
    header_timeout=IDLE_TIMEOUT,
    keepalive_timeout=IDLE_TIMEOUT,
    body_timeout=IDLE_TIMEOUT,
)


# --------------------------------------------------------------------------- responses


def text(status: int, body: str, headers: Headers | None = None) -> Response:
    extra = headers or []
    return Response(status, [("Content-Type", "text/plain; charset=utf-8"), *extra], body.encode())


def json_response(status: int, data: object, cache_control: str) -> Response:
    body = json.dumps(data, indent=2).encode() + b"\n"
    return Response(
        status, [("Content-Type", "application/json"), ("Cache-Control", cache_control)], body
    )


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def conditional(request: Request, headers: Headers) -> Response | None:
    """A body-less 304 carrying ``headers`` (minus Content-Type) when the request's
    validators match the ETag / Last-Modified among ``headers``; else None."""
    fields = {n.lower(): v for n, v in headers}
    if not not_modified_for(request.hmap, fields.get("etag"), fields.get("last-modified")):
        return None
    return Response(304, [(n, v) for n, v in headers if n.lower() != "content-type"])


def reason(status: int) -> str:
    return REASONS.get(status, "Unknown")


# --------------------------------------------------------------------------- content


APP_JS = b"""// Verge demo: this file comes from the origin once, then from the edge cache.
document.addEventListener("DOMContentLoaded", () => {
  const stamp = document.getElementById("loaded");
  if (stamp) stamp.textContent = new Date().toISOString();
});
"""

STYLE_CSS = b"""/* Verge demo stylesheet (Cache-Control: public, max-age=86400) */
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; color: #1d2733; }
h1 { color: #0b6e4f; }
code { background: #eef2f5; padding: 0 .25rem; border-radius: 3px; }
td { padding: .2rem .8rem .2rem 0; vertical-align: top; }
"""

LOGO_SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40" viewBox="0 0 120 40">
  <rect width="120" height="40" rx="6" fill="#0b6e4f"/>
  <text x="60" y="27" font-family="sans-serif" font-size="20" fill="#fff" text-anchor="middle">verge</text>
</svg>
"""

STATIC_FILES: dict[str, tuple[bytes, str]] = {
    "/static/app.js": (APP_JS, "application/javascript"),
    "/static/style.css": (STYLE_CSS, "text/css"),
    "/static/logo.svg": (LOGO_SVG, "image/svg+xml"),
}

ENDPOINTS: list[tuple[str, str]] = [
    ("/", "this page"),
    ("/static/app.js", "static asset: public, max-age=86400, ETag, Last-Modified"),
    ("/static/style.css", "static asset: public, max-age=86400, ETag, Last-Modified"),
    ("/static/logo.svg", "static asset: public, max-age=86400, ETag, Last-Modified"),
    ("/static/big.bin?size=1048576", "deterministic bytes, streamed (default 10 MiB, max 1 GiB)"),
    ("/api/time", "JSON with the origin's clock, max-age=5"),
    ("/api/items?page=2&sort=name", "JSON echoing the normalised query, max-age=30"),
    ("/dynamic/hello", "no-store; greets the 'name' cookie (curl -b name=Ada)"),
    ("/etag/42", "ETag only: revalidated every time, 304 on If-None-Match"),
    ("/vary", "Vary: Accept-Language (try -H 'Accept-Language: fr')"),
    ("/tagged/news", "Surrogate-Key: tag-news all, max-age=3600 (purge by tag)"),
    ("/slow?ms=2000", "answers after N ms, max-age=60 (see request collapsing)"),
    ("/status/503", "answers with any status code 200-599"),
    ("/echo", "POST/PUT/PATCH/DELETE: echoes method, headers and body (streamed)"),
]

GREETINGS = {
    "en": "Hello",
    "fr": "Bonjour",
    "de": "Hallo",
    "es": "Hola",
    "it": "Ciao",
    "zh": "你好",
    "ja": "こんにちは",
}

ITEM_WORDS = ["anchor", "beacon", "cobalt", "delta", "ember", "fjord", "garnet", "harbor"]
CATALOGUE = [
    {"id": i, "name": f"{ITEM_WORDS[i % len(ITEM_WORDS)]}-{i}", "price": (i * 37) % 100 + 0.99}
    for i in range(1, 51)
]
ITEM_SORT_KEYS = ("id", "name", "price")
ITEMS_PER_PAGE = 10


def home_page() -> bytes:
    rows = "\n".join(
        f'<tr><td><a href="{html.escape(path)}"><code>{html.escape(path)}</code></a></td>'
        f"<td>{html.escape(about)}</td></tr>"
        for path, about in ENDPOINTS
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Verge demo origin</title>
<link rel="stylesheet" href="/static/style.css"><script src="/static/app.js"></script></head>
<body><img src="/static/logo.svg" alt="verge">
<h1>Verge demo origin</h1>
<p>Every response carries <code>X-Origin-Hits</code>: how many requests for that path
reached this origin. Ask the edge twice (<code>curl -si http://EDGE/static/app.js</code>)
and watch the counter stay put while <code>Cache-Status</code> says hit.</p>
<table>
{rows}
</table>
<p>Page loaded at <span id="loaded">?</span>.</p>
</body></html>
"""
    return page.encode()


@functools.cache
def big_block() -> bytes:
    """256 KiB of SHA-256 output; byte ``i`` of every big.bin is ``big_block()[i % 256Ki]``."""
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(8192))


def big_bytes(size: int) -> bytes:
    """The exact body of ``/static/big.bin?size=size`` (for tests and checks)."""
    block = big_block()
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


async def big_chunks(size: int) -> AsyncIterator[bytes]:
    block = memoryview(big_block())
    remaining = size
    while remaining > 0:
        piece = block[: min(remaining, len(block))]
        remaining -= len(piece)
        yield piece


def pick_language(accept_language: str) -> str:
    """The supported language the client likes best (q-values honoured), else 'en'."""
    ranked: list[tuple[float, int, str]] = []
    for position, item in enumerate(accept_language.split(",")):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            with contextlib.suppress(ValueError):
                quality = float(params.strip()[2:])
        primary = tag.strip().split("-")[0].lower()
        if primary in GREETINGS and quality > 0:
            ranked.append((-quality, position, primary))
    return min(ranked)[2] if ranked else "en"


# --------------------------------------------------------------------------- endpoints


@dataclass(slots=True)
class Call:
    """What an endpoint sees: the request, its decoded path and query, the path past a
    prefix."""

    request: Request
    path: str
    params: dict[str, str]
    tail: str = ""


Endpoint = Callable[[Call], Awaitable[Response]]


async def get_home(call: Call) -> Response:
    headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Cache-Control", "public, max-age=60"),
    ]
    return Response(200, headers, home_page())


async def get_static(call: Call) -> Response:
    body, content_type = STATIC_FILES[call.path]
    headers = [
        ("Content-Type", content_type),
        ("Cache-Control", STATIC_CACHE_CONTROL),
        ("ETag", '"' + hashlib.sha256(body).hexdigest()[:20] + '"'),
        ("Last-Modified", STATIC_LAST_MODIFIED),
    ]
    return conditional(call.request, headers) or Response(200, headers, body)


async def get_big(call: Call) -> Response:
    raw = call.params.get("size", str(BIG_DEFAULT))
    if not raw.isdigit() or int(raw) > BIG_MAX:
        return text(400, f"size must be an integer from 0 to {BIG_MAX}\n")
    size = int(raw)
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Cache-Control", STATIC_CACHE_CONTROL),
        ("ETag", f'"big-{size}"'),
        ("Last-Modified", STATIC_LAST_MODIFIED),
    ]
    return conditional(call.request, headers) or Response(200, headers, big_chunks(size), size)


async def get_time(call: Call) -> Response:
    data = {"origin": SERVER_NAME, "time": now_iso(), "epoch": round(time.time(), 3)}
    return json_response(200, data, "public, max-age=5")


async def get_items(call: Call) -> Response:
    raw_page = call.params.get("page", "1")
    sort = call.params.get("sort", "id")
    if not raw_page.isdigit() or int(raw_page) < 1:
        return json_response(400, {"error": "page must be a positive integer"}, "no-store")
    if sort not in ITEM_SORT_KEYS:
        return json_response(400, {"error": f"sort must be one of {ITEM_SORT_KEYS}"}, "no-store")
    page = int(raw_page)
    ordered = sorted(CATALOGUE, key=lambda item: item[sort])
    start = (page - 1) * ITEMS_PER_PAGE
    data = {
        "page": page,
        "sort": sort,
        "query": urlencode([("page", page), ("sort", sort)]),
        "ignored": sorted(k for k in call.params if k not in ("page", "sort")),
        "items": ordered[start : start + ITEMS_PER_PAGE],
    }
    return json_response(200, data, "public, max-age=30")


def cookie_name(cookie_header: str | None) -> str:
    if not cookie_header:
        return "world"
    cookies: SimpleCookie = SimpleCookie()
    with contextlib.suppress(CookieError):
        cookies.load(cookie_header)
    morsel = cookies.get("name")
    value = morsel.value if morsel is not None else ""
    return value if value.isprintable() and 0 < len(value) <= 64 else "world"


async def get_hello(call: Call) -> Response:
    name = cookie_name(call.request.header("cookie"))
    body = f"Hello, {name}! The origin's clock says {now_iso()}.\n"
    return text(200, body, [("Cache-Control", "no-store")])


async def get_etag(call: Call) -> Response:
    if not NAME_RE.fullmatch(call.tail):
        return text(400, "resource id must match [A-Za-z0-9._-]{1,64}\n")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("ETag", f'"{call.tail}-v1"')]
    body = f"resource {call.tail}, version 1 (revalidated on every request)\n".encode()
    return conditional(call.request, headers) or Response(200, headers, body)


async def get_vary(call: Call) -> Response:
    language = pick_language(call.request.header("accept-language") or "")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Language", language),
        ("Vary", "Accept-Language"),
        ("Cache-Control", "public, max-age=60"),
    ]
    return Response(200, headers, f"{GREETINGS[language]}!\n".encode())


async def get_tagged(call: Call) -> Response:
    if not NAME_RE.fullmatch(call.tail):
        return text(400, "tag name must match [A-Za-z0-9._-]{1,64}\n")
    headers = [
        ("Cache-Control", "public, max-age=3600"),
        ("Surrogate-Key", f"tag-{call.tail} all"),
    ]
    return text(200, f"tagged object {call.tail}, generated {now_iso()}\n", headers)


async def get_slow(call: Call) -> Response:
    raw = call.params.get("ms", str(SLOW_DEFAULT_MS))
    if not raw.isdigit() or int(raw) > SLOW_MAX_MS:
        return text(400, f"ms must be an integer from 0 to {SLOW_MAX_MS}\n")
    await asyncio.sleep(int(raw) / 1000)
    return text(
        200,
        f"slept {int(raw)} ms, answered at {now_iso()}\n",
        [("Cache-Control", "public, max-age=60")],
    )


async def get_status(call: Call) -> Response:
    if not call.tail.isdigit() or not 200 <= int(call.tail) <= 599:
        return text(400, "status must be an integer from 200 to 599\n")
    code = int(call.tail)
    headers = [("Location", "/")] if code in (301, 302, 303, 307, 308) else []
    return text(code, f"{code} {reason(code)}\n", headers)


EXACT: dict[str, Endpoint] = {
    "/": get_home,
    "/static/big.bin": get_big,
    "/api/time": get_time,
    "/api/items": get_items,
    "/dynamic/hello": get_hello,
    "/vary": get_vary,
    "/slow": get_slow,
    **dict.fromkeys(STATIC_FILES, get_static),
}
PREFIXED: list[tuple[str, Endpoint]] = [
    ("/etag/", get_etag),
    ("/tagged/", get_tagged),
    ("/status/", get_status),
]


# --------------------------------------------------------------------------- the origin


class DemoOrigin(HttpApp):
    """Routes requests to endpoints and counts, per path, the requests that arrived."""

    log = log  # the server reports this app's errors under the demo's logger

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()

    async def handle(self, request: Request, writer) -> None:
        started = time.perf_counter()
        response = await self.answer(request)
        await writer.send(response)
        log_request(request, response, started)

    async def answer(self, request: Request) -> Response:
        path = unquote(request.path)
        self.hits[path] += 1
        response = await self.dispatch(request, path)
        response.headers += [
            ("X-Origin-Hits", str(self.hits[path])),
            ("Date", CLOCK.date),
            ("Server", SERVER_NAME),
        ]
        return response

    async def dispatch(self, request: Request, path: str) -> Response:
        if path == "/echo":
            return await echo(request)
        if request.method not in ("GET", "HEAD"):
            return text(405, "method not allowed\n", [("Allow", "GET, HEAD")])
        call = Call(request, path, dict(parse_qsl(request.query, keep_blank_values=True)))
        endpoint = EXACT.get(path)
        if endpoint is None:
            endpoint, call.tail = self.prefixed(path)
        if endpoint is None:
            return text(404, f"not found: {path}\n")
        return await endpoint(call)

    @staticmethod
    def prefixed(path: str) -> tuple[Endpoint | None, str]:
        for prefix, endpoint in PREFIXED:
            if path.startswith(prefix) and len(path) > len(prefix):
                return endpoint, path[len(prefix) :]
        return None, ""


async def echo(request: Request) -> Response:
    """Method and headers in ``X-Echo-*`` fields; the body streamed back unchanged."""
    if request.method in ("GET", "HEAD"):
        data = {"method": request.method, "target": request.target, "headers": request.headers}
        return json_response(200, data, "no-store")
    if request.method not in ECHO_METHODS:
        return text(
            405,
            "method not allowed\n",
            [("Allow", "GET, HEAD, " + ", ".join(sorted(ECHO_METHODS)))],
        )
    headers = [
        ("Content-Type", request.header("content-type") or "application/octet-stream"),
        ("Cache-Control", "no-store"),
        ("X-Echo-Method", request.method),
        ("X-Echo-Headers", json.dumps(request.headers)),
    ]
    if request.body is None:
        return Response(200, headers, b"")
    # The first read sends "100 Continue" to a client that asked for it: before our head.
    first = await request.body.read()
    return Response(200, headers, replay(first, request.body), request.body.length)


async def replay(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


def log_request(request: Request, response: Response, started: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    line = {
        "ts": now_iso(),
        "method": request.method,
        "target": request.target,
        "status": response.status,
        "hits": dict(response.headers).get("X-Origin-Hits"),
        "ms": round((time.perf_counter() - started) * 1000, 2),
    }
    log.info(json.dumps(line))


# --------------------------------------------------------------------------- entry points


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (a name is resolved; port 0 picks one). No
    SO_REUSEPORT: a second origin on a taken port fails instead of sharing it."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family)
    sock.setblocking(False)
    return sock


async def serve_origin(host: str, port: int) -> asyncio.AbstractServer:
    """Start the demo origin on ``host:port`` (port 0 picks one) and return the server."""
    return await serve(DemoOrigin(), listen_socket(host, port), LIMITS)


async def serve_forever(host: str, port: int) -> None:
    server = await serve_origin(host, port)
    bound = server.sockets[0].getsockname()
    log.info(
        json.dumps({"ts": now_iso(), "event": "listening", "url": f"http://{bound[0]}:{bound[1]}"})
    )
    async with server:
        await server.serve_forever()


def run_origin(host: str = "127.0.0.1", port: int = 8081) -> None:
    """Run the demo origin until interrupted (blocking, on uvloop), logging JSON lines."""
    import uvloop

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_forever(host, port))
