"""Host functions a function may import (module ``verge``): KV and fetch, by capability.

Why a separate module: the sandbox's only ways out are here, and each one checks the
function's declared :class:`Capabilities` first. The actual I/O is done by callables the
edge injects (:class:`HostServices`): a KV store and a synchronous ``fetch``. The runtime
itself stays free of I/O, and tests can hand in a dict and a lambda.

The ABI is coarse on purpose (one call per operation, each a Python<->wasm round trip of
tens of microseconds); all parameters are i32, pointers into the guest's linear memory::

    kv_get(key_ptr, key_len, out_ptr, out_cap) -> len | error
        Copies min(len, out_cap) bytes of the value; returns its full length, so a
        result > out_cap means "retry with a bigger buffer".
    kv_put(key_ptr, key_len, val_ptr, val_len) -> 0 | error
    kv_delete(key_ptr, key_len) -> 0 | error
        Deleting an absent key is not an error (the edge's replica may lag behind).
    fetch(req_ptr, req_len, out_ptr, out_cap) -> len | error
        Request: ``METHOD URL`` line, ``Name: value`` lines, blank line, body.
        Response: ``Status: 200 OK``, header lines, blank line, body (CGI form, see
        :func:`verge.compute.wagi.encode_response`); truncated to out_cap like kv_get.

Errors are negative (``E_*`` below, mirrored in ``examples/functions/verge.h``). Keys are
text: a key a function writes must be 1..512 bytes of UTF-8 without NUL (the control plane
stores it and the API names it), else ``E_INVALID``; reads take any bytes. A KV store that
cannot take a write now (the edge's outbox to the control plane is full) raises
:class:`KVFull`, which the function sees as ``E_FULL``.
Going over the sub-request budget is a violation, not an error code: the invocation
is stopped and reported as ``subrequest_limit``. Out-of-bounds pointers trap.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from verge.compute import wagi
from verge.http.message import Headers

if TYPE_CHECKING:
    import wasmtime

E_DENIED = -1  # capability not granted, or host not on the allow-list
E_NOT_FOUND = -2  # KV key absent
E_INVALID = -3  # malformed request / key
E_UPSTREAM = -4  # fetch failed (connect error, timeout, ...)
E_TOO_LARGE = -5  # value or request over the host's size limits
E_UNAVAILABLE = -6  # the edge provides no such service on this node
E_FULL = -7  # the edge cannot queue another KV write now (its outbox is full)

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 1024 * 1024
MAX_FETCH_REQUEST_BYTES = 1024 * 1024
MAX_DENIED_RECORDED = 100  # denied calls named per invocation (the log record has a bound)


class Violation(Exception):
    """A function broke one of its limits inside a host call; the invocation stops."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class KVFull(Exception):
    """Raised by a :class:`KVStore` that cannot take a write now (the function: ``E_FULL``)."""


class KVStore(Protocol):
    """The edge KV as functions see it: one namespace per function, bytes to bytes."""

    def get(self, namespace: str, key: bytes) -> bytes | None: ...

    def put(self, namespace: str, key: bytes, value: bytes) -> None: ...

    def delete(self, namespace: str, key: bytes) -> None: ...


class DictKV:
    """An in-process KV store (tests, single-node setups)."""

    def __init__(self, data: dict[tuple[str, bytes], bytes] | None = None) -> None:
        self.data = data if data is not None else {}

    def get(self, namespace: str, key: bytes) -> bytes | None:
        return self.data.get((namespace, key))

    def put(self, namespace: str, key: bytes, value: bytes) -> None:
        self.data[(namespace, key)] = value

    def delete(self, namespace: str, key: bytes) -> None:
        self.data.pop((namespace, key), None)


def writable_key(key: bytes) -> bool:
    """Whether a function may write ``key``: 1..MAX_KEY_BYTES bytes of UTF-8, no NUL."""
    if not key or len(key) > MAX_KEY_BYTES or b"\0" in key:
        return False
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(slots=True)
class FetchRequest:
    method: str
    url: str
    headers: Headers
    body: bytes
    timeout: float  # seconds the fetcher may take


@dataclass(slots=True)
class FetchResponse:
    status: int
    headers: Headers
    body: bytes


Fetcher = Callable[[FetchRequest], FetchResponse]


@dataclass(slots=True)
class HostServices:
    """What the edge lends to functions on this node (both optional)."""

    kv: KVStore | None = None
    fetch: Fetcher | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a function was granted at deploy time; anything else is denied.

    ``fetch_hosts`` entries are ``host``, ``host:port`` or ``*.suffix``; ``env`` holds the
    function's variables and secrets.
    """

    env: tuple[tuple[str, str], ...] = ()
    fetch_hosts: frozenset[str] = frozenset()
    kv_namespace: str | None = None
    kv_write: bool = False

    @classmethod
    def of(
        cls,
        *,
        env: dict[str, str] | None = None,
        fetch_hosts: Iterable[str] = (),
        kv_namespace: str | None = None,
        kv_write: bool = False,
    ) -> Capabilities:
        return cls(
            tuple((env or {}).items()),
            frozenset(h.lower() for h in fetch_hosts),
            kv_namespace,
            kv_write,
        )

    def may_fetch(self, url: str) -> bool:
        """True when ``url`` is http(s) to a host on the allow-list."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not host:
            return False
        if host in self.fetch_hosts or f"{host}:{port}" in self.fetch_hosts:
            return True
        return any(p.startswith("*.") and host.endswith(p[1:]) for p in self.fetch_hosts)


@dataclass(slots=True)
class HostState:
    """Per-invocation state of the host side: grants, budget, counters, guest memory."""

    caps: Capabilities
    services: HostServices
    max_subrequests: int
    subrequest_timeout: float
    store: wasmtime.Store | None = None
    memory: wasmtime.Memory | None = None
    subrequests: int = 0
    kv_reads: int = 0
    kv_writes: int = 0
    host_seconds: float = 0.0  # time spent waiting in host services (not charged as CPU)
    violation: Violation | None = None
    on_host_return: Callable[[], None] | None = None
    denied: list[str] = field(default_factory=list)

    # -- policy (pure) -------------------------------------------------------------

    def kv_get(self, key: bytes) -> bytes | int:
        if self.caps.kv_namespace is None:
            return self._deny("kv_get")
        if self.services.kv is None:
            return E_UNAVAILABLE
        if not key or len(key) > MAX_KEY_BYTES:
            return E_INVALID
        self.kv_reads += 1
        try:
            value = self._timed(self.services.kv.get, self.caps.kv_namespace, key)
        except Exception:  # a failing KV backend is the function's error code
            return E_UNAVAILABLE
        return E_NOT_FOUND if value is None else value

    def kv_put(self, key: bytes, value: bytes) -> int:
        refused = self._check_write("kv_put", key)
        if refused:
            return refused
        if len(value) > MAX_VALUE_BYTES:
            return E_TOO_LARGE
        return self._write(self.services.kv.put, key, value)

    def kv_delete(self, key: bytes) -> int:
        refused = self._check_write("kv_delete", key)
        if refused:
            return refused
        delete = getattr(self.services.kv, "delete", None)
        return E_UNAVAILABLE if delete is None else self._write(delete, key)

    def _check_write(self, what: str, key: bytes) -> int:
        """0 when a write of ``key`` may go ahead, else the error code."""
        if self.caps.kv_namespace is None or not self.caps.kv_write:
            return self._deny(what)
        if self.services.kv is None:
            return E_UNAVAILABLE
        return 0 if writable_key(key) else E_INVALID

    def _write(self, operation: Callable, key: bytes, *value: bytes) -> int:
        self.kv_writes += 1
        try:
            self._timed(operation, self.caps.kv_namespace, key, *value)
        except KVFull:
            return E_FULL
        except Exception:
            return E_UNAVAILABLE
        return 0

    def fetch(self, raw: bytes) -> bytes | int:
        if len(raw) > MAX_FETCH_REQUEST_BYTES:
            return E_TOO_LARGE
        try:
            method, url, headers, body = wagi.parse_request(raw)
        except wagi.BadOutput:
            return E_INVALID
        if not self.caps.may_fetch(url):
            return self._deny(f"fetch {url[:200]}")
        if self.services.fetch is None:
            return E_UNAVAILABLE
        if self.subrequests >= self.max_subrequests:
            self.violation = Violation(
                "subrequest_limit", f"more than {self.max_subrequests} sub-requests"
            )
            raise self.violation
        self.subrequests += 1
        request = FetchRequest(method, url, headers, body, self.subrequest_timeout)
        try:
            resp = self._timed(self.services.fetch, request)
        except Exception:  # the fetcher's failure is the function's error code
            return E_UPSTREAM
        return wagi.encode_response(resp.status, resp.headers, resp.body)

    def _deny(self, what: str) -> int:
        if len(self.denied) < MAX_DENIED_RECORDED:  # a loop of denied calls logs a sample
            self.denied.append(what)
        return E_DENIED

    def _timed(self, fn: Callable, *args: object):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.host_seconds += time.perf_counter() - start
            if self.on_host_return is not None:
                self.on_host_return()

    # -- guest memory --------------------------------------------------------------

    def _base(self, ptr: int, length: int) -> int:
        """Host address of guest [ptr, ptr+length), bounds-checked (a trap if outside)."""
        assert self.store is not None and self.memory is not None
        if ptr < 0 or length < 0 or ptr + length > self.memory.data_len(self.store):
            raise IndexError("guest pointer out of bounds")
        from verge.compat.wasmtime import memory_address  # (wasmtime is loaded only when used)

        return memory_address(self.memory, self.store) + ptr

    def read(self, ptr: int, length: int) -> bytes:
        return ctypes.string_at(self._base(ptr, length), length) if length else b""

    def write(self, ptr: int, cap: int, data: bytes) -> int:
        """Copy as much of ``data`` as fits in ``cap``; the full length is returned."""
        n = min(len(data), cap)
        if n:
            ctypes.memmove(self._base(ptr, n), data, n)
        return min(len(data), 0x7FFFFFFF)


StateGetter = Callable[[], HostState]


def define_host_functions(linker: wasmtime.Linker, current: StateGetter) -> None:
    """Define the ``verge`` import module on ``linker``; ``current()`` is the live state."""
    import wasmtime

    i32 = wasmtime.ValType.i32()
    four_to_one = wasmtime.FuncType([i32, i32, i32, i32], [i32])

    def kv_get(key_ptr: int, key_len: int, out_ptr: int, out_cap: int) -> int:
        state = current()
        result = state.kv_get(state.read(key_ptr, key_len))
        return result if isinstance(result, int) else state.write(out_ptr, out_cap, result)

    def kv_put(key_ptr: int, key_len: int, val_ptr: int, val_len: int) -> int:
        state = current()
        return state.kv_put(state.read(key_ptr, key_len), state.read(val_ptr, val_len))

    def fetch(req_ptr: int, req_len: int, out_ptr: int, out_cap: int) -> int:
        state = current()
        result = state.fetch(state.read(req_ptr, req_len))
        return result if isinstance(result, int) else state.write(out_ptr, out_cap, result)

    def kv_delete(key_ptr: int, key_len: int) -> int:
        state = current()
        return state.kv_delete(state.read(key_ptr, key_len))

    linker.define_func("verge", "kv_get", four_to_one, kv_get)
    linker.define_func("verge", "kv_put", four_to_one, kv_put)
    linker.define_func("verge", "kv_delete", wasmtime.FuncType([i32, i32], [i32]), kv_delete)
    linker.define_func("verge", "fetch", four_to_one, fetch)
