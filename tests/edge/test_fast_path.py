"""The synchronous hit path: a full hit's bytes are reused only while they are still true."""

from __future__ import annotations

import time

import pytest

from verge.cache import policy
from verge.cache.store import CacheEntry
from verge.config import Config
from verge.edge.worker import Worker
from verge.http.message import Request


@pytest.fixture
def app(tmp_path):
    config = Config.model_validate(
        {"services": [{"name": "s", "hosts": ["*"], "origins": ["http://127.0.0.1:9"]}]})
    worker = Worker({"index": 0, "options": {"workers": 1, "cache_dir": str(tmp_path),
                                             "node": "n1"},
                     "config": config.model_dump(mode="json")})
    return worker.app


@pytest.fixture
def clock(monkeypatch):
    now = [1_000_000.2]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


def get() -> Request:
    return Request("GET", "/a", headers=[("Host", "shop.test")], client="127.0.0.1",
                   hmap={"host": "shop.test"})


def test_a_full_hit_is_built_once_per_age_second(app, clock):
    key = app.cached_route(get())[0].key.text
    entry = CacheEntry(key=key, variant="", status=200, reason="OK",
                       headers=[("Content-Type", "application/octet-stream")],
                       freshness=policy.Freshness(response_time=1_000_000.0,
                                                  corrected_initial_age=0, lifetime=60),
                       body_size=5, body=b"hello")
    app.cache.put(entry, ())
    first = app.handle_fast(get())
    assert ("Age", "0") in first.headers and first.body == b"hello" and first.length == 5
    clock[0] = 1_000_000.9
    assert app.handle_fast(get()) is first  # the same second of Age: the same Response
    clock[0] = 1_000_001.05
    later = app.handle_fast(get())
    assert ("Age", "1") in later.headers
    app.apply_config(app.config)  # a new generation renders anew
    assert app.handle_fast(get()) is not later
    app.cache.purge_memory("url", key, soft=True)
    assert entry.hot is None
    assert app.handle_fast(get()) is None  # stale now: the async path revalidates
    clock[0] = 1_000_100.0
    app.cache.put(entry, ())
    assert app.handle_fast(get()) is None  # past its lifetime: not from the memo either
