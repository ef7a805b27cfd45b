"""The router with a static fleet: DNS answers by client subnet, health failover, HTTP 302s."""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import httpx
import pytest

from verge.config.router import RouterConfig
from verge.routing.router import Router, RouterOptions

pytestmark = pytest.mark.timeout(30)


class FakeEdge:
    """An edge's admin /healthz that a test can switch off and on (a real TCP server)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> FakeEdge:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        await writer.drain()
        writer.close()


@pytest.fixture
async def fleet():
    edges = {"east": await FakeEdge("127.0.0.2").start(), "west": await FakeEdge("127.0.0.3").start()}
    config = RouterConfig.model_validate({
        "zone": "verge.test", "ttl": 5,
        "regions": [{"name": "east", "cidrs": ["10.1.0.0/16"], "neighbours": ["west"]},
                    {"name": "west", "cidrs": ["10.2.0.0/16"], "neighbours": ["east"]}],
        "hostnames": ["demo.verge.test"],
        "edges": [{"name": "edge-e", "region": "east", "url": "http://127.0.0.2:8080",
                   "admin_url": f"http://127.0.0.2:{edges['east'].port}"},
                  {"name": "edge-w", "region": "west", "url": "http://127.0.0.3:8080",
                   "admin_url": f"http://127.0.0.3:{edges['west'].port}"}],
        "health": {"interval": "100ms", "timeout": "500ms", "fails": 2, "passes": 2},
    })
    router = Router(config, RouterOptions("127.0.0.1", 0, "127.0.0.1", 0))
    await router.start()
    yield router, edges
    await router.close()
    for edge in edges.values():
        if edge.server.is_serving():
            await edge.stop()


async def ask(router: Router, name: str, subnet: str | None = None, rdtype: str = "A"):
    options = [dns.edns.ECSOption.from_text(subnet)] if subnet else []
    query = dns.message.make_query(name, rdtype, use_edns=0, options=options)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=router.dns.port, timeout=2)


def addresses(response) -> list[str]:
    return [item.address for rrset in response.answer for item in rrset]


async def wait_for_answer(router: Router, subnet: str, expected: str) -> None:
    """Health rounds are events in this process: re-ask after each until the answer moves."""
    for _ in range(50):
        if addresses(await ask(router, "demo.verge.test", subnet)) == [expected]:
            return
        await router.monitor.wait_round()
    raise AssertionError(f"{subnet} never got {expected}")


async def test_each_region_gets_its_edge_and_fails_over_and_back(fleet):
    router, edges = fleet
    await router.monitor.wait_round()
    east = await ask(router, "demo.verge.test", "10.1.0.0/24")
    west = await ask(router, "demo.verge.test", "10.2.0.0/24")
    assert addresses(east) == ["127.0.0.2"] and addresses(west) == ["127.0.0.3"]
    assert east.answer[0].ttl == 5
    ecs = next(o for o in east.options if isinstance(o, dns.edns.ECSOption))
    assert ecs.scopelen == 16  # the region's CIDR: resolvers may share the answer across it
    await edges["east"].stop()
    await wait_for_answer(router, "10.1.0.0/24", "127.0.0.3")  # next-nearest healthy edge
    assert router.monitor.states["edge-e"].up is False
    await edges["east"].start()  # back on the same port
    await wait_for_answer(router, "10.1.0.0/24", "127.0.0.2")


async def test_http_router_redirects_to_the_edge_keeping_path_and_query(fleet):
    router, _ = fleet
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}") as client:
        r = await client.get("/video/a.m3u8?x=1&y=2", headers={"Host": "demo.verge.test"})
        assert r.status_code == 302
        assert r.headers["location"] in (
            "http://edge-e.demo.verge.test:8080/video/a.m3u8?x=1&y=2",
            "http://edge-w.demo.verge.test:8080/video/a.m3u8?x=1&y=2")
        assert r.headers["cache-control"] == "no-store"
        # the name the redirect uses resolves, through the same router, to that edge
        edge_name = r.headers["location"].split("//")[1].split(":")[0]
        resolved = addresses(await ask(router, edge_name))
        assert resolved == [{"edge-e": "127.0.0.2", "edge-w": "127.0.0.3"}[edge_name.split(".")[0]]]
        unknown = await client.get("/", headers={"Host": "other.example"})
        assert unknown.status_code == 404
        post = await client.post("/", headers={"Host": "demo.verge.test"})
        assert post.status_code == 405


async def test_client_address_routes_without_ecs(fleet):
    router, _ = fleet
    table = router.table
    assert table.choose(ipaddress.ip_address("10.2.9.9"))[0].name == "edge-w"
    # the resolver's own address (127.0.0.1) matches no region: the default (first) region
    assert addresses(await ask(router, "demo.verge.test")) == ["127.0.0.2"]
    nx = await ask(router, "missing.verge.test")
    assert nx.rcode() == dns.rcode.NXDOMAIN


async def test_http_router_answers_garbage_with_400_and_keeps_serving(fleet):
    router, _ = fleet
    reader, writer = await asyncio.open_connection("127.0.0.1", router.http_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: demo.verge.test\r\nno colon here\r\n\r\n")
    reply = await reader.read()
    writer.close()
    assert reply.startswith(b"HTTP/1.1 400")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}") as client:
        assert (await client.get("/", headers={"Host": "demo.verge.test"})).status_code == 302


async def test_http_router_date_header_keeps_time(fleet):
    """The router's HTTP server shares the process sweeper (verge.http.server.ensure_sweeper):
    its Date header ticks instead of freezing at start-up."""
    router, _ = fleet
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.http_port}") as client:
        first = (await client.get("/", headers={"Host": "demo.verge.test"})).headers["date"]
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            later = (await client.get("/", headers={"Host": "demo.verge.test"})).headers["date"]
            if later != first:
                break
        assert later != first
