"""The player page of a stream, its assets, and its chat endpoint, on the stream server.

    /APP/NAME                  the player page (hls.js, latency readout, chat)
    /APP/NAME/chat             the stream's chat (WebSocket, verge.stream.chat)
    /APP/_player/FILE          the page's script, style and vendored hls.js

Everything sits under /APP/ so that whatever routes a stream application to this server
(the edges' rule for /live/, say) routes the page, its assets and the chat too, and the page
uses relative URLs only: it works directly, through an edge, and under HTTPS alike.
``_player`` can never be a stream name (names start with a letter or digit). hls.js is
vendored at build time (scripts/vendor-web.sh, from npm) into ``vendor/``; without it the
page falls back to the browser's own HLS or says what to run.
"""

from __future__ import annotations

import re
from pathlib import Path

WEB_DIR = Path(__file__).parent
PAGE_RE = re.compile(r"/(?P<app>[^/]+)/(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,127})")
CHAT_RE = re.compile(r"/(?P<app>[^/]+)/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})/chat")
ASSET_RE = re.compile(r"/(?P<app>[^/]+)/_player/(?P<file>[\w./-]+)")
ASSETS = {
    "player.js": "text/javascript; charset=utf-8",
    "player.css": "text/css; charset=utf-8",
    "vendor/hls.min.js": "text/javascript; charset=utf-8",
}
PAGE_CACHE = ("Cache-Control", "public, max-age=60")
# hls.js runs its transmuxer in a blob: worker and feeds the video from a blob: MediaSource
CSP = (
    "Content-Security-Policy",
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; worker-src 'self' blob:; connect-src 'self' ws: wss:; "
    "frame-ancestors 'self'; base-uri 'none'",
)
NOSNIFF = ("X-Content-Type-Options", "nosniff")

_loaded: dict[str, bytes] = {}


def load(name: str) -> bytes | None:
    """A file of this directory, kept in memory once read (None while it does not exist)."""
    data = _loaded.get(name)
    if data is None:
        try:
            data = (WEB_DIR / name).read_bytes()
        except OSError:
            return None
        _loaded[name] = data
    return data


async def serve_web(request, writer, path: str, *, apps, chat) -> bool:
    """Answer the player page, an asset, or a chat connection; False if ``path`` is none
    of them (or its application is not configured)."""
    for pattern, handler in ((CHAT_RE, _chat), (ASSET_RE, _asset), (PAGE_RE, _page)):
        match = pattern.fullmatch(path)
        if match is not None and match["app"] in apps:
            await handler(request, writer, match, chat)
            return True
    return False


async def _chat(request, writer, match, chat) -> None:
    await chat.serve(request, writer, f"{match['app']}/{match['name']}")


async def _page(request, writer, match, chat) -> None:
    await _send(writer, 200, load("player.html") or b"", "text/html; charset=utf-8", CSP)


async def _asset(request, writer, match, chat) -> None:
    name = match["file"]
    content_type = ASSETS.get(name)
    data = load(name) if content_type else None
    if data is None:
        body = b"no such file (hls.js is vendored by scripts/vendor-web.sh)\n"
        writer.start(
            404,
            [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")],
            content_length=len(body),
        )
        await writer.write(body)
        return
    await _send(writer, 200, data, content_type)


async def _send(writer, status: int, body: bytes, content_type: str, *extra) -> None:
    headers = [("Content-Type", content_type), PAGE_CACHE, NOSNIFF, *extra]
    writer.start(status, headers, content_length=len(body))
    await writer.write(body)
