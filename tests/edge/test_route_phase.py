"""The route phase as a table, without sockets: a request in, a Route (with its CacheKey) or
an early answer out — the one key that lookup, fill, store and invalidation then share."""

from __future__ import annotations

import pytest

from verge.config import Config
from verge.edge.app import Route
from verge.edge.worker import Worker
from verge.http.message import Request
from verge.http.response import Response

SERVICES = [
    {"name": "shop", "hosts": ["shop.test"], "origins": ["http://127.0.0.1:9"],
     "rules": [
         {"path": "/api/", "key_headers": ["X-Tenant"], "ttl": "5s"},
         {"path": "/search", "sort_query": True},
         {"path": "/static/", "ignore_query": True},
         {"path": "/private/", "bypass": True},
         {"path": "/old/", "redirect": {"to": "https://www.shop.test$path$query", "status": 308}},
     ]},
    {"name": "secure", "hosts": ["secure.test"], "origins": ["http://127.0.0.1:9"],
     "https_redirect": True},
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    config = Config.model_validate({"services": SERVICES})
    worker = Worker({"index": 0,
                     "options": {"workers": 1, "node": "n1",
                                 "cache_dir": str(tmp_path_factory.mktemp("cache"))},
                     "config": config.model_dump(mode="json")})
    return worker.app


def request(method: str, target: str, host: str = "shop.test", headers=(),
            body=None) -> Request:
    fields = [("Host", host), *headers]
    return Request(method, target, headers=fields, client="127.0.0.1", body=body,
                   hmap={name.lower(): value for name, value in fields})


@pytest.mark.parametrize(("method", "target", "headers", "key"), [
    ("GET", "/a/./b?x=1", (), "shop.test/a/b?x=1"),
    ("HEAD", "/a/b?x=1", (), "shop.test/a/b?x=1"),  # GET and HEAD share entries
    ("GET", "/%7Euser", (), "shop.test/~user"),
    ("GET", "/search?b=2&a=1", (), "shop.test/search?a=1&b=2"),
    ("GET", "/static/app.js?v=123", (), "shop.test/static/app.js"),
    ("GET", "/api/items", [("X-Tenant", "a")], "shop.test/api/items\nx-tenant:a"),
    ("GET", "/api/items", [("X-Tenant", "b")], "shop.test/api/items\nx-tenant:b"),
    ("GET", "/api/items", (), "shop.test/api/items\nx-tenant"),  # absent: not empty
])
def test_cacheable_requests_get_their_rules_key(app, method, target, headers, key):
    route = app.route(request(method, target, headers=headers))
    assert type(route) is Route
    assert route.key.text == key
    assert route.key.url == key.split("\n")[0]


@pytest.mark.parametrize(("method", "target", "body"), [
    ("POST", "/a", None),
    ("DELETE", "/a", None),
    ("GET", "/private/x", None),  # a bypass rule
    ("GET", "/a", object()),  # a GET with a body goes to the origin whole, never cached
])
def test_uncacheable_requests_have_no_key(app, method, target, body):
    route = app.route(request(method, target, body=body))
    assert type(route) is Route and route.key is None


@pytest.mark.parametrize(("host", "target", "status", "location"), [
    ("unknown.test", "/", 404, None),
    ("shop.test", "/old/x?q=1", 308, "https://www.shop.test/old/x?q=1"),
    ("secure.test", "/p?q", 308, "https://secure.test/p?q"),
    ("shop.test", "/a%2Fb", 400, None),  # encoded separators are refused by default
    ("shop.test", "/a%5Cb", 400, None),  # (the protocol layer upper-cases escapes)
])
def test_early_answers(app, host, target, status, location):
    answer = app.route(request("GET", target, host=host))
    assert type(answer) is Response and answer.status == status
    if location is not None:
        assert dict(answer.headers)["Location"].endswith(location)


def test_the_rule_travels_with_the_key_and_scopes_invalidation(app):
    api = app.route(request("GET", "/api/items", headers=[("X-Tenant", "a")]))
    assert api.key.rule is api.rule and api.rule.key_headers == ["x-tenant"]
    assert api.key.scope() == ("prefix", "shop.test/api/items\n")
    plain = app.route(request("GET", "/a"))
    assert plain.key.rule is None and plain.key.scope() == ("url", "shop.test/a")
