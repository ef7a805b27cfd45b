"""A thin, synchronous client for the control-plane REST API (see .notes/CONTROL_API.md).

The operator CLI and the router talk to the control plane through `ControlClient`, the edge
agent through `NodeClient`, so that the wire details live in one place: the `/api/v1` prefix,
the node API's paths, the bearer token, pagination, ETags, timeouts, failover between
replicas and how errors come back. Every method is one API call; a non-2xx answer raises
`ControlError` carrying the server's own error text and the field it names, so callers can
print it as is. `ControlClient` is synchronous, as the CLI is; `NodeClient` is asynchronous,
because the agent keeps several long polls open at once and moves them all to another
replica the moment one call finds its replica down.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

log = logging.getLogger("verge.agent")  # NodeClient's failovers are the edge agent's

API_PREFIX = "/api/v1"
# The node API (edge side), under API_PREFIX: one spelling for NodeClient and ControlClient.
NODE_JOIN = "/nodes/join"
NODE_CONFIG = "/nodes/self/config"
NODE_PURGES = "/nodes/self/purges"
NODE_KV = "/nodes/self/kv"
NODE_MODULES = "/nodes/self/modules"
NODE_HEARTBEAT = "/nodes/self/heartbeat"
NODE_STATS = "/nodes/self/stats"
NODE_FUNCTION_LOGS = "/nodes/self/function-logs"
NODE_PROTECTION_EVENTS = "/nodes/self/protection-events"
NO_RESPONSE = 0
"""`ControlError.status` when no HTTP answer arrived (refused, timed out, bad URL)."""

Json = dict[str, Any]


def control_urls(values: str | Iterable[str]) -> list[str]:
    """The control-plane base URLs in ``values``: each a URL or a comma-separated list (a
    repeated ``--control`` flag, ``VERGE_CONTROL=http://a:7000,http://b:7000``).

    Replicas of one control plane (one store) are interchangeable: callers try them in order
    and stay with the first that answers. Duplicates are dropped; a trailing ``/`` too.
    Raises ValueError naming the first value that is not an ``http(s)://HOST[:PORT][/PATH]``.
    """
    urls: list[str] = []
    for value in [values] if isinstance(values, str) else values:
        for part in (piece.strip() for piece in value.split(",")):
            if part and (url := _control_url(part)) not in urls:
                urls.append(url)
    if not urls:
        raise ValueError("no control plane URL given")
    return urls


def _control_url(text: str) -> str:
    problem = f"{text!r} is not a control plane URL (http[s]://HOST[:PORT])"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises on a bad port)
        httpx.URL(text)
    except (ValueError, httpx.InvalidURL):
        raise ValueError(problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(problem)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r}: a control plane URL takes no query, fragment or user")
    return text.rstrip("/")


class ControlError(Exception):
    """A failed API call: HTTP status (0: no response), the server's message, the field it names."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def __repr__(self) -> str:
        return f"ControlError({self.status!r}, {self.message!r}, {self.field!r})"


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list endpoint."""

    items: list[Json]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True, slots=True)
class Versioned:
    """A resource with the ETag to send back as If-Match when changing it."""

    data: Json
    etag: str

    @property
    def version(self) -> int | None:
        """The version number inside the ETag (`"7"` -> 7), None if it is not a number."""
        text = self.etag.removeprefix("W/").strip('"')
        return int(text) if text.isdigit() else None


def _error_from_response(response: httpx.Response) -> ControlError:
    """The server's `{"error", "field"}` body; FastAPI's `{"detail"}`; else the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            return ControlError(response.status_code, body["error"], body.get("field"))
        detail = body.get("detail")
        if isinstance(detail, str):
            return ControlError(response.status_code, detail)
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            first = detail[0]
            field = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
            return ControlError(response.status_code, str(first.get("msg", detail)), field or None)
    text = response.text.strip()
    reason = response.reason_phrase or "error"
    message = f"HTTP {response.status_code} {reason}" + (f": {text[:200]}" if text else "")
    return ControlError(response.status_code, message)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


class ControlClient:
    """`ControlClient(url, token)`: one method per control-plane API call.

    `url` is the control plane's base URL (http://127.0.0.1:7000), or several replicas' (a
    list, or comma-separated): a call goes to the one that answered last and moves on to the
    next when it cannot be reached, or, for reads, when it answers 5xx or not at all (a
    write that may have reached a replica is not sent twice). `token` is the bearer token
    (an operator token, a join token, or a node credential). `timeout` applies to each call;
    long polls wait that much longer than the `wait` they ask the server for.
    """

    def __init__(self, url: str | Iterable[str], token: str | None, timeout: float = 10) -> None:
        self.urls = control_urls(url)
        self.url = self.urls[0]
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        api: bool = True,
        content: bytes | None = None,
    ) -> httpx.Response:
        """One request; any status >= 300 or transport failure becomes a ControlError.

        ``body`` is sent as JSON, ``content`` as raw bytes (KV values). Tried on each
        replica in turn, starting with the one that answered last (see the class)."""
        url = (API_PREFIX + path) if api else path
        retry_any = method in ("GET", "HEAD")
        replicas = [self.url, *(u for u in self.urls if u != self.url)]
        failure: ControlError | None = None
        for base in replicas:
            try:
                response = self._http.request(
                    method,
                    base + url,
                    json=body,
                    content=content,
                    params=_drop_none(params or {}),
                    headers=headers,
                    timeout=timeout if timeout is not None else self.timeout,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure = ControlError(NO_RESPONSE, f"cannot reach {base}: {exc}")
                continue  # nothing was sent: any call may go elsewhere
            except httpx.TimeoutException:
                failure = ControlError(NO_RESPONSE, f"{base}: no answer within the timeout")
            except httpx.HTTPError as exc:
                failure = ControlError(NO_RESPONSE, f"cannot reach {base}: {exc}")
            else:
                if response.status_code < 500 or not retry_any:
                    self.url = base
                    if response.status_code >= 300:
                        raise _error_from_response(response)
                    return response
                failure = _error_from_response(response)
            if not retry_any:
                break
        assert failure is not None
        raise failure

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return {}
        try:
            return response.json()
        except ValueError:
            raise ControlError(
                response.status_code, f"{method} {path}: the answer is not JSON"
            ) from None

    def _page(self, path: str, limit: int, offset: int, **params: Any) -> Page:
        body = self._json("GET", path, params={"limit": limit, "offset": offset, **params})
        items = body.get("items", [])
        return Page(
            items,
            body.get("total", len(items)),
            body.get("limit", limit),
            body.get("offset", offset),
        )

    def _versioned(self, method: str, path: str, **kwargs: Any) -> Versioned:
        response = self._send(method, path, **kwargs)
        return Versioned(response.json(), response.headers.get("etag", ""))

    # -- health ------------------------------------------------------------------------------

    def healthz(self) -> Json:
        """GET /healthz (no token needed)."""
        return self._json("GET", "/healthz", api=False)

    # -- tenants -----------------------------------------------------------------------------

    def create_tenant(self, name: str, zones: list[str] | None = None) -> Json:
        """POST /tenants -> {"id", "name", "zones"}; the tenant's services may claim hosts
        only inside `zones`."""
        return self._json("POST", "/tenants", body={"name": name, "zones": list(zones or [])})

    def list_tenants(self, limit: int = 50, offset: int = 0) -> Page:
        return self._page("/tenants", limit, offset)

    def get_tenant(self, name: str) -> Json:
        """GET /tenants/{name} -> {"id", "name", "zones", "created_at"}."""
        return self._json("GET", f"/tenants/{_segment(name)}")

    def add_zones(self, tenant: str, zones: list[str]) -> Json:
        """POST /tenants/{name}/zones -> the tenant, plus "conflicts" (other tenants' hosts
        already inside the new zones)."""
        return self._json("POST", f"/tenants/{_segment(tenant)}/zones", body={"zones": zones})

    def remove_zone(self, tenant: str, zone: str) -> Json:
        """DELETE /tenants/{name}/zones/{zone} -> the tenant, plus "conflicts" (its hosts now
        outside its zones)."""
        return self._json("DELETE", f"/tenants/{_segment(tenant)}/zones/{_segment(zone)}")

    # -- hostnames ---------------------------------------------------------------------------

    def hostnames(self, limit: int = 50, offset: int = 0, conflicts_only: bool = False) -> Json:
        """GET /hostnames -> {"items": [{"host", "tenant", "service", "zone", "covered_by",
        "conflicts"}], "total", "limit", "offset", "conflicts": [...], "zones": [...]}."""
        params = {"limit": limit, "offset": offset, "conflicts": "true" if conflicts_only else None}
        return self._json("GET", "/hostnames", params=params)

    # -- tokens ------------------------------------------------------------------------------

    def create_token(self, role: str, tenant: str | None = None, name: str | None = None) -> Json:
        """POST /tokens -> {"id", "token", "role", "tenant"}; the secret is only shown here."""
        return self._json(
            "POST", "/tokens", body=_drop_none({"role": role, "tenant": tenant, "name": name})
        )

    def list_tokens(self, limit: int = 50, offset: int = 0) -> Page:
        return self._page("/tokens", limit, offset)

    def revoke_token(self, token_id: str) -> None:
        """DELETE /tokens/{id}: the token is refused (401) from now on."""
        self._send("DELETE", f"/tokens/{_segment(token_id)}")

    # -- services ----------------------------------------------------------------------------

    def create_service(self, spec: Json) -> Versioned:
        """POST /services with a verge.config.Service body (+ "tenant" for admins)."""
        return self._versioned("POST", "/services", body=spec)

    def list_services(self, limit: int = 50, offset: int = 0) -> Page:
        return self._page("/services", limit, offset)

    def get_service(self, name: str) -> Versioned:
        return self._versioned("GET", f"/services/{_segment(name)}")

    def update_service(self, name: str, spec: Json, etag: str) -> Versioned:
        """PUT /services/{name} with If-Match: a 412 ControlError means someone changed it."""
        return self._versioned(
            "PUT", f"/services/{_segment(name)}", body=spec, headers={"If-Match": etag}
        )

    def delete_service(self, name: str) -> None:
        self._send("DELETE", f"/services/{_segment(name)}")

    def add_origin(self, service: str, url: str, weight: int = 1) -> Json:
        return self._json(
            "POST", f"/services/{_segment(service)}/origins", body={"url": url, "weight": weight}
        )

    def remove_origin(self, service: str, url: str) -> Json:
        return self._json("DELETE", f"/services/{_segment(service)}/origins", params={"url": url})

    # -- TLS certificates ----------------------------------------------------------------------

    def add_certificate(
        self, name: str, cert_pem: str, key_pem: str, tenant: str | None = None
    ) -> Json:
        """POST /certificates -> {"name", "hosts", "not_after", "fingerprint_sha256", ...}."""
        body = _drop_none(
            {"name": name, "cert_pem": cert_pem, "key_pem": key_pem, "tenant": tenant}
        )
        return self._json("POST", "/certificates", body=body)

    def list_certificates(self, limit: int = 50, offset: int = 0) -> Page:
        return self._page("/certificates", limit, offset)

    def get_certificate(self, name: str) -> Json:
        return self._json("GET", f"/certificates/{_segment(name)}")

    def rotate_certificate(self, name: str, cert_pem: str, key_pem: str) -> Json:
        """PUT /certificates/{name}: a new chain and key under the same name."""
        return self._json(
            "PUT",
            f"/certificates/{_segment(name)}",
            body={"cert_pem": cert_pem, "key_pem": key_pem},
        )

    def delete_certificate(self, name: str) -> None:
        self._send("DELETE", f"/certificates/{_segment(name)}")

    # -- purge -------------------------------------------------------------------------------

    def purge(
        self,
        urls: list[str] | None = None,
        prefixes: list[str] | None = None,
        tags: list[str] | None = None,
        soft: bool = False,
        service: str | None = None,
    ) -> Json:
        """POST /purge -> {"seq", "nodes": [names expected to acknowledge]}."""
        body = {"urls": urls or [], "prefixes": prefixes or [], "tags": tags or [], "soft": soft}
        if service is not None:
            body["service"] = service
        return self._json("POST", "/purge", body=body)

    def purge_status(self, seq: int, wait: float = 0) -> Json:
        """GET /purge/{seq} -> {"seq", "acked": [names], "pending": [names], "down", "done",
        "timed_out", "created_at"}; with `wait`, the server answers as soon as the purge is
        done (nobody pending, or timed out) or after `wait` seconds."""
        params = {"wait": wait} if wait > 0 else None
        return self._json(
            "GET", f"/purge/{int(seq)}", params=params, timeout=wait + self.timeout
        )

    # -- edge functions ----------------------------------------------------------------------

    def deploy_function(
        self,
        name: str,
        module: bytes,
        service: str,
        routes: list[str],
        *,
        env: dict[str, str] | None = None,
        fetch_hosts: list[str] | None = None,
        kv_namespace: str | None = None,
        kv_write: bool = False,
        cpu_ms: float | None = None,
        memory_mb: int | None = None,
        max_subrequests: int | None = None,
        phase: str = "request",
    ) -> Json:
        """POST /functions: a new active version -> {"name", "version", "module_sha256", ...}."""
        body = _drop_none(
            {
                "name": name,
                "service": service,
                "routes": routes,
                "module_base64": base64.b64encode(module).decode("ascii"),
                "env": env or {},
                "fetch_hosts": fetch_hosts or [],
                "kv_namespace": kv_namespace,
                "kv_write": kv_write,
                "cpu_ms": cpu_ms,
                "memory_mb": memory_mb,
                "max_subrequests": max_subrequests,
                "phase": phase,
            }
        )
        return self._json("POST", "/functions", body=body, timeout=max(self.timeout, 60))

    def list_functions(self, limit: int = 50, offset: int = 0) -> Page:
        return self._page("/functions", limit, offset)

    def get_function(self, name: str) -> Json:
        """GET /functions/{name}: the active version plus "versions" (newest first)."""
        return self._json("GET", f"/functions/{_segment(name)}")

    def rollback_function(self, name: str, version: int | None = None) -> Json:
        """Make `version` (default: the one before the active one) active again."""
        body = {} if version is None else {"version": version}
        return self._json("POST", f"/functions/{_segment(name)}/rollback", body=body)

    def delete_function(self, name: str) -> None:
        self._send("DELETE", f"/functions/{_segment(name)}")

    def function_logs(self, name: str, limit: int = 100) -> list[Json]:
        """What edges reported (failures, stderr, load errors), oldest first."""
        body = self._json("GET", f"/functions/{_segment(name)}/logs", params={"limit": limit})
        return list(body.get("items", []))

    # -- edge protection ---------------------------------------------------------------------

    def protection_events(self, service: str, limit: int = 100) -> list[Json]:
        """The newest `limit` requests edges refused for `service`, oldest first: each
        {"at", "node", "client", "method", "host", "target", "status", "kind", "detail"}."""
        body = self._json(
            "GET", f"/services/{_segment(service)}/protection/events", params={"limit": limit}
        )
        return list(body.get("items", []))

    def protection_stats(self, service: str, since: float | None = None,
                         until: float | None = None, step: int = 10) -> Json:
        """What the edges' protect phase counted for `service` per rule: {"service",
        "since", "step", "rules": [{"kind", "rule", "allowed", "limited", "blocked"}],
        "series": [...]} (see the API)."""
        params: dict[str, Any] = {"step": step}
        if since is not None:
            params["since"] = since
        if until is not None:
            params["until"] = until
        return self._json("GET", f"/services/{_segment(service)}/protection/stats",
                          params=params)

    # -- edge KV -----------------------------------------------------------------------------

    def kv_put(self, namespace: str, key: str, value: bytes, tenant: str | None = None) -> Json:
        """PUT /kv/{ns}/{key} with the raw value -> {"namespace", "key", "seq", "size"}."""
        return self._json(
            "PUT",
            f"/kv/{_segment(namespace)}/{_segment(key)}",
            content=value,
            params={"tenant": tenant},
            headers={"Content-Type": "application/octet-stream"},
        )

    def kv_get(self, namespace: str, key: str) -> bytes:
        return self._send("GET", f"/kv/{_segment(namespace)}/{_segment(key)}").content

    def kv_delete(self, namespace: str, key: str) -> Json:
        return self._json("DELETE", f"/kv/{_segment(namespace)}/{_segment(key)}")

    def kv_keys(self, namespace: str, prefix: str = "", limit: int = 50, offset: int = 0) -> Page:
        return self._page(f"/kv/{_segment(namespace)}", limit, offset, prefix=prefix or None)

    def kv_namespaces(self, limit: int = 50, offset: int = 0) -> Page:
        return self._page("/kv", limit, offset)

    # -- nodes, audit, stats -----------------------------------------------------------------

    def list_nodes(self, limit: int = 50, offset: int = 0) -> Page:
        return self._page("/nodes", limit, offset)

    def revoke_node(self, name: str) -> None:
        self._send("DELETE", f"/nodes/{_segment(name)}")

    def list_audit(self, limit: int = 50, offset: int = 0) -> Page:
        return self._page("/audit", limit, offset)

    def stats(
        self,
        service: str | None = None,
        node: str | None = None,
        since: float | str | None = None,
        step: int = 10,
    ) -> Json:
        """GET /stats -> {"series": [{"t", "requests", "hits", "bytes", ...}]}."""
        return self._json(
            "GET", "/stats", params={"service": service, "node": node, "since": since, "step": step}
        )


def iter_all(fetch: Callable[[int, int], Page], page_size: int = 200) -> Iterator[Json]:
    """Every item of a list endpoint, page by page: `iter_all(client.list_services)`."""
    offset = 0
    while True:
        page = fetch(page_size, offset)
        yield from page.items
        offset += len(page.items)
        if not page.items or offset >= page.total:
            return


def _segment(value: str) -> str:
    """A path segment with '/', '?', '#' and '%' escaped, so a name never changes the route."""
    return quote(str(value), safe="")


# -- the node API, asynchronous: what the edge agent speaks ----------------------------------

NODE_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
"""A node call that is not a long poll: a replica silent for longer is treated as down."""
LONG_POLL_GRACE = 5.0
"""Seconds a long poll waits beyond the ``wait`` it asks the server for."""


class CredentialRefused(ControlError):
    """401/403 from the node API: the join token or the node credential is not valid (any more)."""


class _ReplicaMoved(Exception):
    """Another call moved to the next replica while this long poll waited on the old one."""


class NodeClient:
    """`NodeClient(urls, token)`: one async method per node API call, for the edge agent.

    Failover: every call goes to the replica that answered last; one that cannot be reached,
    does not answer in time or answers 5xx makes the client move to the next one at once
    (and stay there), for every call: node calls are safe to repeat (sequence numbers,
    idempotency keys, outbox ids), so unlike ControlClient's writes they move too. A long
    poll waiting on the old replica is re-issued on the new one at once. Each replica is
    tried at most once per call.

    Errors: 401/403 raise CredentialRefused; another status >= 400 a ControlError with the
    server's message; no answer from the last replica tried, its httpx.TransportError.
    ``token`` is the node credential (set it after :meth:`join`); ``http`` may be replaced
    (tests hand it an ASGI transport).
    """

    def __init__(self, urls: str | Iterable[str], token: str | None = None) -> None:
        self.urls = control_urls(urls)
        self.url = self.urls[0]
        self.token = token
        self.http = httpx.AsyncClient(timeout=NODE_TIMEOUT)
        self._moved = asyncio.Event()  # set (and replaced) when url changes

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- calls -----------------------------------------------------------------------------------

    async def join(
        self, join_token: str, name: str, url: str, admin_url: str, region: str | None
    ) -> Json:
        """POST /nodes/join with a join token -> {"node", "credential"}."""
        body = {"name": name, "url": url, "admin_url": admin_url, "region": region}
        return (await self._call("POST", NODE_JOIN, json=body, token=join_token)).json()

    async def config(self, after: int, wait: float, digest: str | None = None) -> Json | None:
        """Long poll: {"version", "config", "digest"} once the bundle is newer than ``after``
        (or, given this node's ``digest``, differs from it: another replica's), else None."""
        params: dict[str, Any] = {"after": after, "wait": wait}
        if digest is not None:
            params["digest"] = digest
        response = await self._call("GET", NODE_CONFIG, wait=wait, params=params)
        return None if response.status_code == 204 else response.json()

    async def purges(
        self, after: int, wait: float, timeout: httpx.Timeout | None = None
    ) -> list[Json]:
        """Purges with seq > ``after`` (a long poll when ``wait``); the call acknowledges
        every purge up to ``after``."""
        kw = {"timeout": timeout} if timeout is not None else {}
        response = await self._call(
            "GET", NODE_PURGES, wait=wait, params={"after": after, "wait": wait}, **kw
        )
        return list(response.json().get("purges", []))

    async def kv_changes(self, after: int, wait: float) -> list[Json]:
        """Long poll: edge KV changes with seq > ``after`` ([] when none came within ``wait``)."""
        response = await self._call(
            "GET", NODE_KV, wait=wait, params={"after": after, "wait": wait}
        )
        return list(response.json().get("changes", []))

    async def module(self, digest: str) -> bytes:
        """The function module named ``sha256:<digest>``, checked against its digest."""
        content = (await self._call("GET", f"{NODE_MODULES}/{_segment(digest)}")).content
        if hashlib.sha256(content).hexdigest() != digest:
            raise ValueError(f"module {digest} arrived corrupted; fetching it again")
        return content

    async def heartbeat(self, body: Json) -> None:
        """{"health", "load", "config_version", "purge_seq", "url", "admin_url", "region"}."""
        await self._call("POST", NODE_HEARTBEAT, json=body)

    async def send_stats(self, body: str, idempotency_key: str) -> None:
        """A spooled upload (JSON text); a retry with the same key is ignored by the server."""
        headers = {"Idempotency-Key": idempotency_key, "Content-Type": "application/json"}
        await self._call("POST", NODE_STATS, content=body, headers=headers)

    async def send_function_logs(self, records: list[Json]) -> None:
        await self._call("POST", NODE_FUNCTION_LOGS, json={"records": records})

    async def send_protection_events(self, events: list[Json]) -> Json:
        """Refused requests -> {"accepted", "skipped"}."""
        response = await self._call("POST", NODE_PROTECTION_EVENTS, json={"events": events})
        return response.json()

    async def send_kv_writes(self, outbox: str, writes: list[Json]) -> Json:
        """Function KV writes of this node's outbox -> {"kv_seq", "results": [...], ...}."""
        response = await self._call("POST", NODE_KV, json={"outbox": outbox, "writes": writes})
        return response.json()

    # -- transport -------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, *, token: str | None = None, wait: float = 0.0, **kw: Any
    ) -> httpx.Response:
        """One call on the current replica, failing over as the class says."""
        headers = {"Authorization": f"Bearer {token or self.token}", **kw.pop("headers", {})}
        kw.setdefault(
            "timeout", httpx.Timeout(wait + LONG_POLL_GRACE, connect=2.0) if wait else NODE_TIMEOUT
        )
        tried: set[str] = set()
        while True:
            base = self.url
            tried.add(base)
            try:
                response = await self._request(base, method, API_PREFIX + path, headers, wait, kw)
            except _ReplicaMoved:
                continue
            except httpx.TransportError as exc:
                if not self._fail_over(base, repr(exc), tried):
                    raise
                continue
            status = response.status_code
            if status >= 500 and self._fail_over(base, f"HTTP {status}", tried):
                continue
            if status in (401, 403):
                raise CredentialRefused(status, f"{path}: {status} {response.text.strip()}")
            if status >= 400:
                raise _error_from_response(response)
            return response

    async def _request(
        self, base: str, method: str, path: str, headers: dict, wait: float, kw: dict
    ) -> httpx.Response:
        """The request on ``base``; a long poll gives way (``_ReplicaMoved``) when another
        call has moved to another replica meanwhile, to be re-issued there at once."""
        send = self.http.request(method, base + path, headers=headers, **kw)
        if not wait or len(self.urls) == 1:
            return await send
        request = asyncio.ensure_future(send)
        moved = asyncio.ensure_future(self._moved.wait())
        try:
            await asyncio.wait((request, moved), return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
        if request.done():
            return request.result()
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await request
        raise _ReplicaMoved

    def _fail_over(self, base: str, reason: str, tried: set[str]) -> bool:
        """``base`` failed: move to the replica after it (unless another call already
        moved). True when the call should be tried again: on a replica it has not tried."""
        if len(self.urls) == 1:
            return False
        if base == self.url:
            following = self.urls[(self.urls.index(base) + 1) % len(self.urls)]
            log.warning(
                "control plane %s failed (%s); switching to %s", base, reason[:200], following
            )
            self.url = following
            self._moved.set()
            self._moved = asyncio.Event()
        return self.url not in tried
