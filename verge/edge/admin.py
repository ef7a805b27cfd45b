"""The edge node's admin API (served by the supervisor on ``--admin``).

    GET  /healthz           liveness: 200 when every worker answers (no token)
    GET  /metrics           Prometheus text (no token: counters only, no secrets)
    POST /purge             {"urls": [...], "prefixes": [...], "tags": [...], "soft": false}
    POST /config/reload     re-read the config file (SIGHUP does the same)
    GET  /stats             per-worker counters as JSON

Changing calls need ``Authorization: Bearer TOKEN`` (compared in constant time).
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING

from verge.cache import keys
from verge.http.response import Response
from verge.http.server import HttpApp, text_response
from verge.observe.metrics import merge, render

if TYPE_CHECKING:
    from verge.edge.node import Node

JSON = "application/json"


def _json(status: int, data: dict) -> Response:
    return text_response(status, json.dumps(data) + "\n", content_type=JSON)


class AdminApp(HttpApp):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.token = node.options.admin_token.encode()

    async def handle(self, request, writer) -> None:
        await writer.send(await self.dispatch(request))

    async def dispatch(self, request) -> Response:
        path, method = request.path, request.method
        if path == "/healthz" and method in ("GET", "HEAD"):
            alive = sum(1 for w in self.node.workers if w.alive())
            ok = alive == len(self.node.workers)
            return _json(200 if ok else 503, {"status": "ok" if ok else "degraded",
                                              "workers": alive})
        if path == "/metrics" and method == "GET":
            return await self.metrics()
        if not self._authorized(request):
            return _json(401, {"error": "missing or wrong admin token"})
        if path == "/purge" and method == "POST":
            return await self.purge(request)
        if path == "/config/reload" and method == "POST":
            result = await self.node.reload()
            return _json(200 if result["ok"] else 400, result)
        if path == "/stats" and method == "GET":
            return _json(200, {"workers": await self.node.stats()})
        return _json(404, {"error": f"no such admin endpoint: {method} {path}"})

    def _authorized(self, request) -> bool:
        value = request.header("authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.token)

    async def metrics(self) -> Response:
        stats = await self.node.stats()
        snap = merge(stats)
        gauges = {
            "cache_memory_bytes": sum(s.get("memory_bytes", 0) for s in stats),
            "cache_memory_objects": sum(s.get("memory_objects", 0) for s in stats),
            "cache_disk_bytes": self.node.disk.used_bytes,
            "workers": len(stats),
            "open_files_limit": min((s.get("open_files_limit", 0) for s in stats), default=0),
            "connections_refused_by_cap": sum(s.get("connections_refused", 0) for s in stats),
        }
        if any("flood" in s for s in stats):  # the node's flood guard is on
            for name in ("dropped", "refused", "boxes", "boxed"):
                gauges[f"flood_{name}"] = sum(s.get("flood", {}).get(name, 0) for s in stats)
        body = render(snap, gauges)
        return text_response(200, body, content_type="text/plain; version=0.0.4; charset=utf-8")

    async def purge(self, request) -> Response:
        try:
            data = json.loads(await request.body.read_all(1 << 20)) if request.body else {}
            if not isinstance(data, dict):
                raise ValueError("body must be a JSON object")
            targets = self.targets(data)
        except (ValueError, TypeError) as exc:
            return _json(400, {"error": f"bad purge request: {exc}"})
        if not targets:
            return _json(400, {"error": "nothing to purge: give urls, prefixes or tags"})
        result = await self.node.purge(targets, bool(data.get("soft", False)))
        result["soft"] = bool(data.get("soft", False))
        return _json(200 if result["ok"] else 500, result)

    def targets(self, data: dict) -> list[tuple[str, str]]:
        """Purge targets as (kind, value) with URLs turned into cache keys by the config."""
        out: list[tuple[str, str]] = []
        for url in _strings(data, "urls"):
            for key in self.url_keys(url):
                out.append(("url", key))
                out.append(("prefix", key + "\n"))  # variants keyed by rule headers
        out.extend(("prefix", keys.prefix_key(self.node.config, prefix))
                   for prefix in _strings(data, "prefixes"))
        out.extend(("tag", tag) for tag in _strings(data, "tags"))
        return out

    def url_keys(self, url: str) -> list[str]:
        """The cache keys a URL may be stored under (verge.cache.keys.url_keys)."""
        return keys.url_keys(self.node.config, url)


def _strings(data: dict, name: str) -> list[str]:
    value = data.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of non-empty strings")
    return value
