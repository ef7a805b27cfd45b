"""A thin, synchronous client for the control-plane REST API (see .notes/CONTROL_API.md).

The operator CLI and the edge agent talk to the control plane through this one class so that
the wire details live in one place: the `/api/v1` prefix, the bearer token, pagination, ETags
and how errors come back. Every method is one API call; a non-2xx answer (or no answer at all)
raises `ControlError` carrying the server's own error text and the field it names, so callers
can print it as is. It is synchronous on purpose: the CLI is, and the agent runs its long polls
in threads (`asyncio.to_thread`) so one slow call never stalls the event loop.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

API_PREFIX = "/api/v1"
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

    # -- edge side (join token, then the node credential) ------------------------------------

    def join(self, name: str, url: str, admin_url: str, region: str | None = None) -> Json:
        """POST /nodes/join (join token) -> {"node", "credential"}."""
        return self._json(
            "POST",
            "/nodes/join",
            body=_drop_none({"name": name, "url": url, "admin_url": admin_url, "region": region}),
        )

    def heartbeat(
        self,
        config_version: int,
        purge_seq: int,
        health: Json | None = None,
        load: Json | None = None,
    ) -> Json:
        return self._json(
            "POST",
            "/nodes/self/heartbeat",
            body={
                "health": health or {},
                "load": load or {},
                "config_version": config_version,
                "purge_seq": purge_seq,
            },
        )

    def node_config(self, after: int = 0, wait: float = 25) -> Json | None:
        """Long poll: {"version", "config"} once the bundle is newer than `after`, else None."""
        response = self._send(
            "GET",
            "/nodes/self/config",
            params={"after": after, "wait": wait},
            timeout=wait + self.timeout,
        )
        return None if response.status_code == 204 else response.json()

    def node_purges(self, after: int = 0, wait: float = 25) -> list[Json]:
        """Long poll: purges with seq > `after` ([] when none arrived within `wait`)."""
        response = self._send(
            "GET",
            "/nodes/self/purges",
            params={"after": after, "wait": wait},
            timeout=wait + self.timeout,
        )
        if response.status_code == 204 or not response.content:
            return []
        return list(response.json().get("purges", []))

    def ack_purges(self, seq: int) -> None:
        """Acknowledge every purge up to and including `seq`."""
        self._send("POST", "/nodes/self/purges/ack", body={"seq": seq})

    def node_module(self, sha256: str) -> bytes:
        """A function module by sha256 (node credential)."""
        return self._send(
            "GET", f"/nodes/self/modules/{_segment(sha256)}", timeout=max(self.timeout, 60)
        ).content

    def node_kv(self, after: int = 0, wait: float = 25) -> list[Json]:
        """Long poll: KV changes with seq > `after` ([] when none arrived within `wait`)."""
        body = self._json(
            "GET",
            "/nodes/self/kv",
            params={"after": after, "wait": wait},
            timeout=wait + self.timeout,
        )
        return list(body.get("changes", []))

    def send_kv_writes(self, outbox: str, writes: list[Json]) -> Json:
        """Function KV writes from this node's outbox (node credential): ``{"kv_seq",
        "applied", "refused", "duplicates", "results": [...]}`` (see the API)."""
        return self._json("POST", "/nodes/self/kv", body={"outbox": outbox, "writes": writes})

    def send_function_logs(self, records: list[Json]) -> None:
        self._send("POST", "/nodes/self/function-logs", body={"records": records})

    def send_protection_events(self, events: list[Json]) -> Json:
        """Upload refused requests (node credential) -> {"accepted", "skipped"}."""
        return self._json("POST", "/nodes/self/protection-events", body={"events": events})

    def send_stats(self, samples: list[Json], idempotency_key: str) -> None:
        """Upload samples; a retry with the same key is ignored by the server."""
        self._send(
            "POST",
            "/nodes/self/stats",
            body={"samples": samples},
            headers={"Idempotency-Key": idempotency_key},
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
