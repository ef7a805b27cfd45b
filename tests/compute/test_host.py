"""Host-function policy without wasm: grants, allow-list, sub-request budget."""

from __future__ import annotations

import pytest

from verge.compute import host
from verge.compute.host import (
    Capabilities,
    DictKV,
    FetchRequest,
    FetchResponse,
    HostServices,
    HostState,
    Violation,
)


def state(caps: Capabilities, *, kv=None, fetch=None, max_subrequests: int = 2) -> HostState:
    return HostState(caps, HostServices(kv=kv, fetch=fetch), max_subrequests, 1.0)


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("https://api.example.com/x", True),
        ("http://API.EXAMPLE.COM/x", True),
        ("http://api.example.com:8443/x", True),  # plain host entry: any port
        ("http://img.cdn.example/a.png", True),
        ("http://cdn.example/a.png", False),  # the wildcard needs a subdomain
        ("http://api.example.com.evil.net/", False),
        ("http://admin.internal:9000/", True),
        ("http://admin.internal:9001/", False),
        ("ftp://api.example.com/", False),
        ("file:///etc/passwd", False),
        ("http://[::1/", False),
        ("//api.example.com/x", False),
    ],
)
def test_fetch_allow_list(url, allowed):
    caps = Capabilities.of(fetch_hosts=["api.example.com", "*.cdn.example", "admin.internal:9000"])
    assert caps.may_fetch(url) is allowed


def test_kv_grants():
    kv = DictKV({("ns", b"k"): b"v"})
    none = state(Capabilities(), kv=kv)
    assert none.kv_get(b"k") == host.E_DENIED and none.kv_put(b"k", b"x") == host.E_DENIED
    reader = state(Capabilities.of(kv_namespace="ns"), kv=kv)
    assert reader.kv_get(b"k") == b"v" and reader.kv_get(b"missing") == host.E_NOT_FOUND
    assert reader.kv_put(b"k", b"x") == host.E_DENIED and kv.data[("ns", b"k")] == b"v"
    writer = state(Capabilities.of(kv_namespace="ns", kv_write=True), kv=kv)
    assert writer.kv_put(b"k", b"x") == 0 and kv.data[("ns", b"k")] == b"x"
    assert writer.kv_put(b"", b"x") == host.E_INVALID
    assert writer.kv_put(b"k", b"x" * (host.MAX_VALUE_BYTES + 1)) == host.E_TOO_LARGE
    assert state(Capabilities.of(kv_namespace="ns")).kv_get(b"k") == host.E_UNAVAILABLE
    assert none.denied == ["kv_get", "kv_put"]


def test_a_loop_of_denied_calls_records_a_bounded_sample():
    none = state(Capabilities())
    for _ in range(host.MAX_DENIED_RECORDED * 10):
        assert none.kv_get(b"k") == host.E_DENIED
    assert len(none.denied) == host.MAX_DENIED_RECORDED


def test_failing_kv_backend_is_an_error_code():
    class Broken:
        def get(self, namespace, key):
            raise OSError("disk")

        def put(self, namespace, key, value):
            raise OSError("disk")

    st = state(Capabilities.of(kv_namespace="ns", kv_write=True), kv=Broken())
    assert st.kv_get(b"k") == host.E_UNAVAILABLE and st.kv_put(b"k", b"v") == host.E_UNAVAILABLE


def test_kv_delete_and_the_keys_a_function_may_write():
    kv = DictKV({("ns", b"k"): b"v"})
    reader = state(Capabilities.of(kv_namespace="ns"), kv=kv)
    assert reader.kv_delete(b"k") == host.E_DENIED and reader.denied == ["kv_delete"]
    writer = state(Capabilities.of(kv_namespace="ns", kv_write=True), kv=kv)
    assert writer.kv_delete(b"k") == 0 and ("ns", b"k") not in kv.data
    assert writer.kv_delete(b"absent") == 0  # not an error: the replica may lag behind
    for key in (b"", b"k" * (host.MAX_KEY_BYTES + 1), b"\xff\xfe", b"a\0b"):
        assert writer.kv_put(key, b"v") == host.E_INVALID  # keys are text (the API names them)
        assert writer.kv_delete(key) == host.E_INVALID
    assert writer.kv_put("ключ".encode(), b"v") == 0 and writer.kv_writes == 3
    assert reader.kv_get(b"\xff\xfe") == host.E_NOT_FOUND  # reads take any bytes

    class Full:
        def get(self, namespace, key):
            return None

        def put(self, namespace, key, value=None):
            raise host.KVFull("the outbox is full")

        delete = put

    full = state(Capabilities.of(kv_namespace="ns", kv_write=True), kv=Full())
    assert full.kv_put(b"k", b"v") == host.E_FULL and full.kv_delete(b"k") == host.E_FULL
    no_delete = state(Capabilities.of(kv_namespace="ns", kv_write=True), kv=object())
    assert no_delete.kv_delete(b"k") == host.E_UNAVAILABLE  # a store without deletions


def test_fetch_budget_is_a_violation():
    calls: list[FetchRequest] = []

    def fetch(req: FetchRequest) -> FetchResponse:
        calls.append(req)
        return FetchResponse(200, [("A", "1")], b"ok")

    returns = []
    st = state(Capabilities.of(fetch_hosts=["h.example"]), fetch=fetch)
    st.on_host_return = lambda: returns.append(1)
    raw = b"GET http://h.example/x\nX-Trace: 1\n\n"
    assert st.fetch(raw) == b"Status: 200 OK\nA: 1\n\nok"
    assert st.fetch(b"GET http://other.example/\n\n") == host.E_DENIED
    assert st.fetch(b"not a request") == host.E_INVALID
    assert st.fetch(raw) == b"Status: 200 OK\nA: 1\n\nok"
    with pytest.raises(Violation) as err:
        st.fetch(raw)
    assert err.value.outcome == "subrequest_limit" and st.violation is err.value
    assert len(calls) == 2 and st.subrequests == 2 and len(returns) == 2
    assert calls[0].headers == [("X-Trace", "1")] and calls[0].timeout == 1.0
    assert st.host_seconds > 0
