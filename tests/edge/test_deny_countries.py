"""Deny lists by country: the edge's GeoIP database (``verge edge --geoip PATH`` or the config's
``geoip:``) opened once per worker, a service's ``deny.countries`` refusing with 403.

A generated MaxMind database maps loopback addresses to countries (127.0.0.2 is in France),
and clients connect from those addresses (Linux routes all of 127.0.0.0/8 to lo). Hostile
input: an address of no country, a record without one, IPv4-mapped IPv6 and plain IPv6 through
X-Forwarded-For, garbage in it. Without a database a file config that denies countries is
refused at start, and one that arrives later (a reload, a control-plane bundle) is left
unapplied with a warning that the admin API's /stats names."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.conftest import VERGE, EdgeProcess
from tests.edge.test_protection_events import request, take
from tests.origin import make_origin
from verge.config import Config
from verge.edge.worker import Worker
from verge.protect.deny import DenyList, open_country_lookup

pytestmark = pytest.mark.timeout(90)

FRANCE = "127.0.0.2"
NO_COUNTRY = "127.0.0.3"  # a record without a country (as for anonymous proxies)
GERMANY = "127.0.0.4"  # only its registered country is known
NOWHERE = "127.0.0.9"  # not in the database at all

CONFIG = """
services:
  - name: site
    hosts: ["*"]
    origins: ["{origin}"]
    protection:
      deny: {{countries: [fr, DE]}}
      trusted_proxies: [127.0.0.5/32]
"""


def write_geo_db(path):
    """A GeoLite2-Country-shaped database of a few loopback addresses."""
    mmdb_writer = pytest.importorskip("mmdb_writer")
    from netaddr import IPSet

    writer = mmdb_writer.MMDBWriter(ip_version=4, database_type="GeoLite2-Country")
    writer.insert_network(IPSet([f"{FRANCE}/32"]), {"country": {"iso_code": "FR"}})
    writer.insert_network(IPSet([f"{NO_COUNTRY}/32"]), {"continent": {"code": "EU"}})
    writer.insert_network(IPSet([f"{GERMANY}/32"]), {"registered_country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["127.0.0.1/32", "127.0.0.5/32"]), {"country": {"iso_code": "US"}})
    writer.to_db_file(str(path))
    return path


@pytest.fixture(scope="module")
def module_geo_db(tmp_path_factory):
    return write_geo_db(tmp_path_factory.mktemp("geo") / "geo.mmdb")


@pytest.fixture
def geo_db(tmp_path):
    return write_geo_db(tmp_path / "geo.mmdb")


@pytest.fixture(scope="module")
def guarded(module_geo_db, tmp_path_factory):
    """One origin and one edge with --geoip for the module (each test its own paths)."""
    origin = make_origin()
    origin.route("/*", headers=[("Cache-Control", "max-age=60")], body=b"hi\n")
    edge = EdgeProcess(
        tmp_path_factory.mktemp("edge"),
        config=CONFIG.format(origin=origin.url),
        extra_args=("--geoip", str(module_geo_db)),
    ).start()
    yield edge, origin
    edge.stop()
    origin.stop()


def client_from(edge, address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (a loopback address)."""
    return httpx.Client(
        base_url=edge.url, timeout=10, transport=httpx.HTTPTransport(local_address=address)
    )


def denied_total(edge) -> float:
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    return float(metrics.split('verge_deny_list_requests_total{service="site"} ')[1].split()[0])


def test_a_country_is_denied_and_others_are_served(guarded):
    edge, origin = guarded
    before = denied_total(edge)
    with client_from(edge, FRANCE) as c:
        denied = c.get("/page")
        assert denied.status_code == 403
        assert denied.text == "forbidden (country:FR)\n"
        assert denied.headers["cache-control"] == "no-store"
    with client_from(edge, "127.0.0.1") as c:
        assert c.get("/page").status_code == 200
    with client_from(edge, FRANCE) as c:
        assert c.get("/page").status_code == 403  # a cache hit is refused too
    with client_from(edge, GERMANY) as c:
        assert c.get("/page").status_code == 403  # the registered country counts
    for address in (NO_COUNTRY, NOWHERE):  # no country known: served
        with client_from(edge, address) as c:
            assert c.get("/page").status_code == 200, address
    assert origin.hits("/page") == 1
    assert denied_total(edge) == before + 3
    with edge.admin() as admin:
        [worker] = admin.get("/stats").json()["workers"]
    assert worker["protection"]["site"]["unapplied"] == []


FORWARDED = [
    ("::ffff:127.0.0.2", 403),  # IPv4-mapped: the IPv4 client it carries
    ("::FFFF:7f00:2", 403),
    ("198.51.100.7, 127.0.0.2", 403),  # the rightmost untrusted hop is the client
    ("2001:db8::1", 200),  # IPv6 in an IPv4-only database: no country, served
    ("127.0.0.9", 200),
    ("not-an-address", 200),
    ("127.0.0.2%eth0", 200),
    ("127.0.0.2" + "0" * 5000, 200),
    ("", 200),
]


def test_addresses_through_a_trusted_proxy(guarded):
    edge, _ = guarded
    with client_from(edge, "127.0.0.5") as proxy:
        for number, (forwarded, status) in enumerate(FORWARDED):
            answer = proxy.get(f"/p/{number}", headers={"X-Forwarded-For": forwarded})
            assert answer.status_code == status, (forwarded, answer.text)


def test_the_database_can_come_from_the_config_file(edge_factory, origin, geo_db):
    origin.route("/*", body=b"hi\n")
    config = f"geoip: {geo_db}\n" + CONFIG.format(origin=origin.url)
    edge = edge_factory(config=config)
    with client_from(edge, FRANCE) as c:
        assert c.get("/x").status_code == 403
    with client_from(edge, "127.0.0.1") as c:
        assert c.get("/x").status_code == 200


def start_edge(tmp_path, config: str, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "verge.yaml"
    path.write_text(config)
    return subprocess.run(
        [
            *VERGE,
            "edge",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--config",
            str(path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_file_config_that_denies_countries_needs_a_database(tmp_path, geo_db):
    config = CONFIG.format(origin="http://127.0.0.1:9")
    out = start_edge(tmp_path, config)
    assert out.returncode == 2
    assert "service 'site': deny.countries needs a GeoIP database" in out.stderr
    assert "--geoip PATH" in out.stderr
    missing = start_edge(tmp_path, config, "--geoip", str(tmp_path / "missing.mmdb"))
    assert missing.returncode == 2 and "geoip: cannot open" in missing.stderr
    not_a_database = tmp_path / "bad.mmdb"
    not_a_database.write_bytes(b"\x00" * 4096)
    bad = start_edge(tmp_path, f"geoip: {not_a_database}\n{config}")
    assert bad.returncode == 2 and "geoip: cannot open" in bad.stderr


def test_countries_without_a_database_are_unapplied_and_said_so(edge_factory, origin, tmp_path):
    """A reload (as a control-plane bundle) brings countries to an edge without a database:
    the running edge keeps serving, warns, and /stats names what it does not apply."""
    origin.route("/*", body=b"hi\n")
    plain = CONFIG.format(origin=origin.url).replace(
        "deny: {countries: [fr, DE]}", "deny: {cidrs: [192.0.2.0/24]}"
    )
    edge = edge_factory(config=plain)
    (tmp_path / "verge.yaml").write_text(CONFIG.format(origin=origin.url))
    with edge.admin() as admin:
        assert admin.post("/config/reload").json()["ok"] is True
        [worker] = admin.get("/stats").json()["workers"]
    assert worker["protection"]["site"]["unapplied"] == ["deny.countries"]
    with client_from(edge, FRANCE) as c:
        assert c.get("/x").status_code == 200  # not applied: nothing is denied by country
    assert any("deny.countries FR,DE needs a GeoIP database" in line for line in edge.output)


def make_worker(tmp_path, geoip=None) -> Worker:
    """A worker in this process (no sockets), as the supervisor starts one."""
    config = Config.model_validate(
        {
            "services": [
                {
                    "name": "site",
                    "hosts": ["*"],
                    "origins": ["http://127.0.0.1:9"],
                    "protection": {"deny": {"countries": ["FR"]}},
                }
            ]
        }
    )
    options = {
        "workers": 1,
        "cache_dir": str(tmp_path),
        "node": "n1",
        "geoip": str(geoip) if geoip else None,
    }
    return Worker({"index": 0, "options": options, "config": config.model_dump(mode="json")})


def test_the_worker_opens_the_database_and_records_country_refusals(tmp_path, geo_db):
    worker = make_worker(tmp_path, geo_db)
    refused = worker.app.handle_fast(request("/a", client=FRANCE))
    assert refused.status == 403
    assert worker.app.handle_fast(request("/a", client=NOWHERE)) is None  # a miss: async path
    [event] = take(worker)
    assert (event["kind"], event["status"], event["detail"], event["client"]) == (
        "deny",
        403,
        "country:FR",
        FRANCE,
    )
    assert worker.command({"op": "stats"})["stats"]["protection"]["site"]["denied"] == 1


def test_a_worker_without_its_database_serves_and_says_so(tmp_path, caplog):
    """The database vanished after the CLI checked it: the worker starts anyway."""
    worker = make_worker(tmp_path, tmp_path / "gone.mmdb")
    assert "geoip: cannot open" in caplog.text
    assert worker.app.handle_fast(request("/a", client=FRANCE)) is None  # not refused
    stats = worker.command({"op": "stats"})["stats"]["protection"]["site"]
    assert stats["unapplied"] == ["deny.countries"]


def test_the_lookup_on_hostile_addresses(geo_db):
    deny = DenyList(countries=["FR"], country_of=open_country_lookup(str(geo_db)))
    assert deny.check("::ffff:127.0.0.2", None) == "country:FR"
    assert deny.check("127.0.0.2", None) == "country:FR"
    for address in (
        "2001:db8::1",
        "::1",
        "127.0.0.9",
        "",
        "127.0.0.256",
        "x" * 5000,
        "127.0.0.2\x00",
        "::ffff:127.0.0.2%lo",
    ):
        assert deny.check(address, None) in (None, "country:FR"), address
    assert deny.check("2001:db8::1", None) is None
    assert deny.check("127.0.0.256", None) is None
