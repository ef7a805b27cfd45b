"""The operator CLI against a real control plane: `verge tenant|token|service|origin|node|purge`.

One `verge control` process (SQLite, port 0) serves the whole module; each test uses its own
names. Every command runs through the CLI's entry point (`verge.cli.app`) with the control URL
and token in the environment, as an operator runs it: success prints a table (or JSON with
--json), failure prints one line on stderr and exits non-zero. Edge nodes are played by `ControlClient` with a join token and then the node
credential, which also exercises the client's edge-side calls; the real edge agent is covered
by test_fleet.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.cli import run_verge
from verge.control.client import ControlClient, ControlError, NodeClient, Versioned

pytestmark = pytest.mark.timeout(120)

VERGE = [sys.executable, "-m", "verge.cli"]
ADMIN = "vrg_admin_cli-test-token"
READY = re.compile(r"verge control ready: (http://\S+)")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@dataclass
class ControlPlane:
    url: str
    workdir: Path

    def run(self, *args: str, token: str | None = ADMIN) -> Result:
        """`verge ARGS` with the control URL and token in the environment, as an operator's
        shell has them (tests.cli: the CLI's entry point in this process)."""
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("VERGE_")}
        env["VERGE_CONTROL"] = self.url
        env["VERGE_TOKEN"] = token
        done = run_verge(args, env, cwd=self.workdir)
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str, token: str | None = ADMIN) -> Result:
        result = self.run(*args, token=token)
        assert result.code == 0, f"verge {' '.join(args)}: {result.err}"
        assert "Traceback" not in result.err
        return result

    def fails(self, *args: str, token: str | None = ADMIN) -> str:
        """The one-line error of a command that must fail."""
        result = self.run(*args, token=token)
        assert result.code != 0, f"verge {' '.join(args)} succeeded:\n{result.out}"
        assert "Traceback" not in result.err, result.err
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.err
        return lines[0]

    def client(self, token: str = ADMIN) -> ControlClient:
        return ControlClient(self.url, token)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def control(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real `verge control` process, on SQLite and on PostgreSQL (the same CLI tests)."""
    workdir = tmp_path_factory.mktemp("control")
    db = f"sqlite:///{workdir / 'control.db'}"
    if request.param == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        if not hasattr(cluster, "new_database"):
            pytest.skip(f"PostgreSQL unavailable: {cluster}")
        db = cluster.new_database(request.getfixturevalue("pg_template"))
    proc = subprocess.Popen(
        [
            *VERGE,
            "control",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db,
            "--admin-token",
            ADMIN,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "VERGE_SECRET": "test-secret"},  # required with PostgreSQL
    )
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not found and (match := READY.search(line)):
                found.append(match.group(1).rstrip("/"))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(60) or not found:
            pytest.fail("verge control did not start:\n" + "".join(lines))
        yield ControlPlane(found[0], workdir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class FakeEdge:
    """A stand-in edge speaking the node API through the agent's own client (NodeClient), on
    an event loop of its own: use it from one thread at a time."""

    def __init__(self, url: str, credential: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = NodeClient(url, credential)

    def call(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.call(self.client.aclose())
        self.loop.close()

    def __enter__(self) -> FakeEdge:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def join_node(control: ControlPlane, name: str) -> FakeEdge:
    """A fake edge: joins with a fresh join token and talks with its node credential."""
    join_token = control.client().create_token("join", name=f"join-{name}")["token"]
    joiner = FakeEdge(control.url, join_token)
    try:
        joined = joiner.call(joiner.client.join(
            join_token, name, f"http://127.0.0.1:1/{name}", f"http://127.0.0.1:2/{name}",
            "eu-test"))
    finally:
        joiner.close()
    node = FakeEdge(control.url, joined["credential"])
    node.call(node.client.heartbeat({"health": {"ok": True}, "load": {"rps": 0},
                                     "config_version": 0, "purge_seq": 0}))
    return node


# ---------------------------------------------------------------------------------------------
# Help and operator mistakes that need no server
# ---------------------------------------------------------------------------------------------

COMMANDS = [
    ("tenant", "add"),
    ("tenant", "list"),
    ("tenant", "show"),
    ("token", "create"),
    ("token", "list"),
    ("token", "revoke"),
    ("service", "add"),
    ("service", "list"),
    ("service", "show"),
    ("service", "rm"),
    ("service", "edit"),
    ("origin", "add"),
    ("origin", "rm"),
    ("origin", "list"),
    ("node", "list"),
    ("node", "revoke"),
]


@pytest.mark.parametrize("group", ["tenant", "token", "service", "origin", "node"])
def test_every_group_lists_its_commands(group: str) -> None:
    result = CliRunner().invoke(_app(), [group, "--help"])
    assert result.exit_code == 0
    for command in (c for g, c in COMMANDS if g == group):
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_documents_control_token_and_json(command: tuple[str, str]) -> None:
    result = CliRunner().invoke(_app(), [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for flag in ("--control", "--token", "--json", "VERGE_CONTROL", "VERGE_TOKEN"):
        assert flag in result.output


def test_control_and_purge_help_tell_their_flags() -> None:
    control = CliRunner().invoke(_app(), ["control", "--help"], env={"COLUMNS": "200"})
    for text in (
        "--listen",
        "127.0.0.1:7000",
        "--db",
        "sqlite:///verge.db",
        "--admin-token",
        "VERGE_ADMIN_TOKEN",
    ):
        assert text in control.output
    purge = CliRunner().invoke(_app(), ["purge", "--help"], env={"COLUMNS": "200"})
    for text in ("--admin", "--control", "--service", "--timeout", "30", "--tag", "--prefix"):
        assert text in purge.output


def _app():
    from verge.cli import app

    return app


def test_missing_token_and_unreachable_control(tmp_path: Path) -> None:
    nowhere = ControlPlane("http://127.0.0.1:9", tmp_path)
    assert "token is required" in nowhere.fails("tenant", "list", token=None)
    assert "cannot reach http://127.0.0.1:9" in nowhere.fails("node", "list")
    assert "cannot reach" in nowhere.fails("purge", "--tag", "x")


def test_purge_refuses_admin_and_control_together(tmp_path: Path) -> None:
    nowhere = ControlPlane("http://127.0.0.1:9", tmp_path)
    error = nowhere.fails(
        "purge", "--admin", "http://127.0.0.1:9", "--control", "http://127.0.0.1:9", "--tag", "x"
    )
    assert "not both" in error
    assert "--service needs --control" in nowhere.fails(
        "purge", "--admin", "http://127.0.0.1:9", "--service", "s", "--tag", "x"
    )


def test_service_add_needs_hosts_and_origins_and_readable_files(tmp_path: Path) -> None:
    nowhere = ControlPlane("http://127.0.0.1:9", tmp_path)
    assert "--host and --origin" in nowhere.fails("service", "add", "x")
    assert "--origin" in nowhere.fails("service", "add", "x", "--host", "x.test")
    bad = write(tmp_path, "bad.yaml", "name: x\nhosts: [a, b\n")
    assert f"{bad}:3:1: invalid YAML" in nowhere.fails(
        "service", "add", "x", "--from-file", str(bad)
    )
    other = write(tmp_path, "other.yaml", "name: other\nhosts: [o.test]\n")
    assert "describes service 'other'" in nowhere.fails(
        "service", "edit", "x", "--from-file", str(other)
    )
    assert "cannot read" in nowhere.fails(
        "service",
        "add",
        "x",
        "--host",
        "h",
        "--origin",
        "http://o",
        "--rule-file",
        str(tmp_path / "none"),
    )


# ---------------------------------------------------------------------------------------------
# Tenants and tokens
# ---------------------------------------------------------------------------------------------


def test_tenant_add_and_list(control: ControlPlane) -> None:
    assert "tenant acme created" in control.ok("tenant", "add", "acme").out
    created = control.ok("tenant", "add", "globex", "--json").json()
    assert created["name"] == "globex" and created["id"]
    table = control.ok("tenant", "list").out
    assert "acme" in table and "globex" in table and "NAME" in table
    names = {t["name"] for t in control.ok("tenant", "list", "--json").json()}
    assert {"acme", "globex"} <= names
    assert "409" not in control.fails("tenant", "add", "acme")  # the server's words, no codes


def test_zone_commands_and_hostnames_document_their_flags() -> None:
    for command in (["tenant", "zone", "add"], ["tenant", "zone", "rm"],
                    ["tenant", "zone", "list"], ["hostnames"]):
        result = CliRunner().invoke(_app(), [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for flag in ("--control", "--token", "--json"):
            assert flag in result.output
    assert "--zone" in CliRunner().invoke(_app(), ["tenant", "add", "--help"]).output
    assert "--conflicts" in CliRunner().invoke(_app(), ["hostnames", "--help"]).output


def test_tenant_zones_limit_what_its_tokens_claim(control: ControlPlane) -> None:
    origin = ["--origin", "http://127.0.0.1:1"]
    created = control.ok(
        "tenant", "add", "zeta", "--zone", "zeta.test", "--zone", "Zeta2.Test.", "--json"
    ).json()
    assert created["zones"] == ["zeta.test", "zeta2.test"]
    assert "zeta.test, zeta2.test" in control.ok("tenant", "show", "zeta").out
    assert "zeta2.test" in control.ok("tenant", "list").out
    secret = control.ok("token", "create", "--role", "tenant_admin", "--tenant", "zeta").out.strip()
    hosts = ["--host", "www.zeta.test", "--host", "*.img.zeta.test"]
    control.ok("service", "add", "zeta-web", *hosts, *origin, token=secret)
    error = control.fails("service", "add", "zeta-all", "--host", "*.test", *origin, token=secret)
    assert "may not" in error and "outside your tenant's zones" in error
    assert "may not" in control.fails("tenant", "zone", "add", "zeta", "x.test", token=secret)

    control.ok("tenant", "add", "eta")
    nested = control.fails("tenant", "zone", "add", "eta", "x.zeta.test")
    assert "zone 'x.zeta.test' overlaps zone 'zeta.test' of tenant 'zeta'" in nested
    assert "eta.test" in control.ok("tenant", "zone", "add", "eta", "eta.test", "eta2.test").out
    zones = control.ok("tenant", "zone", "list", "--json").json()
    assert {"zone": "eta2.test", "tenant": "eta"} in zones
    assert "ZONE" in control.ok("tenant", "zone", "list", "eta").out


def test_hostnames_show_conflicts_an_admin_resolves(control: ControlPlane) -> None:
    origin = ["--origin", "http://127.0.0.1:1"]
    control.ok("tenant", "add", "theta", "--zone", "theta.test")
    control.ok("tenant", "add", "iota", "--zone", "iota.test")
    secret = control.ok("token", "create", "--role", "tenant_admin", "--tenant", "iota").out.strip()
    control.ok("service", "add", "iota-web", "--host", "iota.test", *origin, token=secret)
    # an admin may put any free host anywhere: here into theta's zone, for iota
    control.ok("service", "add", "iota-odd", "--host", "odd.theta.test", "--tenant", "iota",
               *origin)

    def conflicts() -> list[dict]:
        found = control.ok("hostnames", "--conflicts", "--json").json()["conflicts"]
        return [c for c in found if "theta" in c["host"] or "iota" in c["host"]]

    assert [(c["host"], c["kind"], c["zone"]) for c in conflicts()] == [
        ("odd.theta.test", "in_foreign_zone", "theta.test")
    ]
    table = control.ok("hostnames").out
    assert "odd.theta.test" in table and "in_foreign_zone" in table and "iota.test" in table
    # a tenant's token sees its own hosts and nothing of the other tenant's zone
    own = control.ok("hostnames", "--json", token=secret).json()
    assert {item["tenant"] for item in own["items"]} == {"iota"}
    assert own["conflicts"] == [] and "theta" not in json.dumps(own["zones"])

    control.ok("service", "rm", "iota-odd")
    assert conflicts() == []
    left = control.ok("tenant", "zone", "rm", "iota", "iota.test")
    assert "tenant iota: no zones yet" in left.out
    assert "warning: iota.test (service iota-web) is outside every zone" in left.err
    assert [c["kind"] for c in conflicts()] == ["outside_zones"]
    assert "no zone" in control.fails("tenant", "zone", "rm", "iota", "iota.test")


def test_token_create_prints_the_secret_once_and_revoke_locks_it_out(
    control: ControlPlane,
) -> None:
    control.ok("tenant", "add", "initech")
    created = control.ok(
        "token", "create", "--role", "read_only", "--tenant", "initech", "--name", "viewer"
    )
    secret = created.out.strip()
    assert secret.startswith("vrg_") and "\n" not in secret
    assert "shown only once" in created.err
    assert control.ok("service", "list", token=secret).code == 0

    listed = control.ok("token", "list", "--json").json()
    viewer = next(t for t in listed if t.get("name") == "viewer")
    assert viewer["role"] == "read_only" and viewer["tenant"] == "initech"
    assert secret not in control.ok("token", "list").out
    assert "viewer" in control.ok("token", "list").out

    # a read-only token may not write
    assert "may not" in control.fails("tenant", "add", "nope", token=secret)
    assert f"token {viewer['id']} revoked" in control.ok("token", "revoke", str(viewer["id"])).out
    assert "refused the token" in control.fails("service", "list", token=secret)


def test_token_create_rejects_unknown_role(control: ControlPlane) -> None:
    result = control.run("token", "create", "--role", "root")
    assert result.code == 2 and "root" in result.err


# ---------------------------------------------------------------------------------------------
# Services and origins
# ---------------------------------------------------------------------------------------------

RULES = """\
- path: /static/
  kind: static
  ttl: 1h
- path: /api/
  bypass: true
"""


def test_service_lifecycle(control: ControlPlane, tmp_path: Path) -> None:
    rules = write(tmp_path, "rules.yaml", RULES)
    added = control.ok(
        "service",
        "add",
        "shop",
        "--host",
        "shop.test",
        "--host",
        "www.shop.test",
        "--origin",
        "http://127.0.0.1:9001",
        "--rule-file",
        str(rules),
    )
    assert "service shop created" in added.out

    listed = control.ok("service", "list").out
    assert "shop" in listed and "shop.test" in listed and "http://127.0.0.1:9001" in listed
    [shop] = [s for s in control.ok("service", "list", "--json").json() if s["name"] == "shop"]
    assert shop["hosts"] == ["shop.test", "www.shop.test"]

    shown = control.ok("service", "show", "shop").out
    assert shown.startswith("# service shop, version ")
    assert "/static/" in shown and "bypass: true" in shown
    data = control.ok("service", "show", "shop", "--json").json()
    assert [r["path"] for r in data["rules"]] == ["/static/", "/api/"]

    # show -> edit the YAML -> edit --from-file: a round trip
    edited = write(tmp_path, "shop.yaml", shown.replace("www.shop.test", "m.shop.test"))
    result = control.ok("service", "edit", "shop", "--from-file", str(edited))
    assert "service shop updated (version" in result.out
    hosts = control.ok("service", "show", "shop", "--json").json()["hosts"]
    assert hosts == ["shop.test", "m.shop.test"]

    assert "service shop deleted" in control.ok("service", "rm", "shop").out
    assert "shop" in control.fails("service", "show", "shop")


def test_service_from_file_with_flag_overrides(control: ControlPlane, tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        "blog.yaml",
        (
            "name: blog\nhosts: [blog.test]\norigins: [{url: 'http://127.0.0.1:9002', weight: 2}]\n"
            "headers: {response_add: {X-Blog: '1'}}\n"
        ),
    )
    created = control.ok(
        "service", "add", "blog", "--from-file", str(spec), "--host", "news.test", "--json"
    ).json()
    assert created["hosts"] == ["news.test"]
    assert created["headers"]["response_add"] == {"x-blog": "1"}  # names are normalised


def test_service_errors_carry_the_servers_reason(control: ControlPlane) -> None:
    control.ok("service", "add", "one", "--host", "clash.test", "--origin", "http://127.0.0.1:1")
    clash = control.fails(
        "service", "add", "two", "--host", "clash.test", "--origin", "http://127.0.0.1:1"
    )
    assert "clash.test" in clash
    bad_origin = control.fails(
        "service", "add", "three", "--host", "three.test", "--origin", "ftp://nowhere"
    )
    assert "origins[0]" in bad_origin
    bad_name = control.fails(
        "service", "add", "Bad_Name", "--host", "b.test", "--origin", "http://127.0.0.1:1"
    )
    assert "slug" in bad_name
    assert "nosuch" in control.fails("origin", "list", "nosuch")


def test_service_edit_reports_a_concurrent_change(
    control: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another operator saves between our GET and PUT: the server says 412, we say why."""
    control.ok("service", "add", "race", "--host", "race.test", "--origin", "http://127.0.0.1:1")
    real_get = ControlClient.get_service

    def get_then_someone_else_saves(self: ControlClient, name: str) -> Versioned:
        seen = real_get(self, name)
        with control.client() as other:
            other.update_service(name, {**seen.data, "default": False}, seen.etag)
        return seen

    monkeypatch.setattr(ControlClient, "get_service", get_then_someone_else_saves)
    edited = write(
        tmp_path, "race.yaml", "hosts: [race.test, r2.test]\norigins: ['http://127.0.0.1:1']\n"
    )
    result = CliRunner().invoke(
        _app(),
        [
            "service",
            "edit",
            "race",
            "--from-file",
            str(edited),
            "--control",
            control.url,
            "--token",
            ADMIN,
        ],
    )
    assert result.exit_code == 1
    assert "changed by someone else" in result.output
    assert "verge service show race" in result.output


def test_origin_add_list_rm(control: ControlPlane) -> None:
    control.ok(
        "service", "add", "media", "--host", "media.test", "--origin", "http://127.0.0.1:9101"
    )
    assert (
        "added to service media"
        in control.ok("origin", "add", "media", "http://127.0.0.1:9102", "--weight", "3").out
    )
    origins = control.ok("origin", "list", "media", "--json").json()
    assert [(o["url"], o["weight"]) for o in origins] == [
        ("http://127.0.0.1:9101", 1),
        ("http://127.0.0.1:9102", 3),
    ]
    assert "http://127.0.0.1:9102" in control.ok("origin", "list", "media").out
    control.ok("origin", "rm", "media", "http://127.0.0.1:9101")
    assert [o["url"] for o in control.ok("origin", "list", "media", "--json").json()] == [
        "http://127.0.0.1:9102"
    ]
    assert control.run("origin", "add", "media", "http://x", "--weight", "0").code == 2


def test_tenant_admin_sees_and_edits_only_its_own_services(
    control: ControlPlane, tmp_path: Path
) -> None:
    control.ok("tenant", "add", "hooli", "--zone", "hooli.test")
    created = control.ok("token", "create", "--role", "tenant_admin", "--tenant", "hooli")
    secret = created.out.strip()
    origin = ["--origin", "http://127.0.0.1:1"]
    control.ok("service", "add", "hooli-web", "--host", "hooli.test", *origin, token=secret)
    control.ok("service", "add", "not-hooli", "--host", "other.hooli-test", *origin)
    names = {s["name"] for s in control.ok("service", "list", "--json", token=secret).json()}
    assert names == {"hooli-web"}
    assert "not-hooli" in control.fails("service", "show", "not-hooli", token=secret)

    shown = control.ok("service", "show", "hooli-web", token=secret).out
    assert "tenant: hooli" in shown
    edited = write(
        tmp_path, "hooli.yaml", shown.replace("- hooli.test", "- hooli.test\n- m.hooli.test")
    )
    control.ok("service", "edit", "hooli-web", "--from-file", str(edited), token=secret)
    hosts = control.ok("service", "show", "hooli-web", "--json").json()["hosts"]
    assert hosts == ["hooli.test", "m.hooli.test"]
    promote = write(tmp_path, "promote.yaml", shown.replace("default: false", "default: true"))
    error = control.fails("service", "edit", "hooli-web", "--from-file", str(promote), token=secret)
    assert "may not" in error and "admin" in error


# ---------------------------------------------------------------------------------------------
# Nodes and global purge
# ---------------------------------------------------------------------------------------------


def test_node_list_shows_heartbeat_and_versions(control: ControlPlane) -> None:
    with join_node(control, "edge-list-1"):
        table = control.ok("node", "list").out
        row = next(line for line in table.splitlines() if "edge-list-1" in line)
        assert "up" in row and "eu-test" in row and re.search(r"\d+s ago", row)
        nodes = control.ok("node", "list", "--json").json()
        node = next(n for n in nodes if n["name"] == "edge-list-1")
        assert node["config_version"] == 0 and node["purge_seq"] == 0
    assert "node edge-list-1 revoked" in control.ok("node", "revoke", "edge-list-1").out


def _ack_every_purge(node: FakeEdge, stop: threading.Event) -> None:
    """What an edge agent does: long-poll for purges, apply them; the next poll (``after``
    the last one applied) acknowledges them."""
    seq = 0
    while not stop.is_set():
        for purge in node.call(node.client.purges(after=seq, wait=1)):
            seq = max(seq, int(purge["seq"]))


def test_purge_through_control_waits_for_every_edge(control: ControlPlane) -> None:
    control.ok("service", "add", "cdn", "--host", "cdn.test", "--origin", "http://127.0.0.1:1")
    stop = threading.Event()
    names = ["edge-ack-1", "edge-ack-2"]
    nodes = [join_node(control, name) for name in names]
    workers = [threading.Thread(target=_ack_every_purge, args=(n, stop)) for n in nodes]
    for worker in workers:
        worker.start()
    try:
        status = control.ok("purge", "--service", "cdn", "--tag", "items", "--json").json()
        assert status["complete"] is True and status["pending"] == []
        assert set(names) <= set(status["acked"])
        human = control.ok("purge", "http://cdn.test/a.css", "--soft").out
        assert re.search(r"soft purge \(mark stale\) #\d+ acknowledged by all \d+ edges", human)
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
        with control.client() as admin:
            for name, node in zip(names, nodes, strict=True):
                admin.revoke_node(name)
                node.close()


def test_purge_names_the_edges_that_did_not_acknowledge(control: ControlPlane) -> None:
    control.ok("service", "add", "slow", "--host", "slow.test", "--origin", "http://127.0.0.1:1")
    with join_node(control, "edge-silent"):
        result = control.run(
            "purge", "--service", "slow", "--prefix", "http://slow.test/img/", "--timeout", "1"
        )
        assert result.code == 1
        assert "did not acknowledge within 1s: " in result.err
        assert "edge-silent" in result.err.strip().splitlines()[-1]
    control.client().revoke_node("edge-silent")


def test_purge_rejects_urls_outside_the_service_or_tenant(control: ControlPlane) -> None:
    control.ok(
        "service", "add", "scoped", "--host", "scoped.test", "--origin", "http://127.0.0.1:1"
    )
    error = control.fails("purge", "--service", "scoped", "http://elsewhere.test/x")
    assert "elsewhere.test" in error and "scoped" in error
    control.ok("tenant", "add", "umbrella")
    tenant_token = control.ok("token", "create", "--role", "tenant_admin", "--tenant", "umbrella")
    error = control.fails("purge", "http://scoped.test/x", token=tenant_token.out.strip())
    assert "scoped.test" in error
    assert "service" in control.fails("purge", "--tag", "t", token=tenant_token.out.strip())


def test_purge_with_no_edges_up_is_queued(control: ControlPlane) -> None:
    control.ok("service", "add", "quiet", "--host", "quiet.test", "--origin", "http://127.0.0.1:1")
    result = control.ok("purge", "http://quiet.test/x")
    assert re.search(r"purge #\d+ queued; no edge is up now", result.out)
    assert result.err == ""  # no progress bar for nobody


# ---------------------------------------------------------------------------------------------
# ControlClient details the CLI relies on
# ---------------------------------------------------------------------------------------------


def test_client_errors_carry_status_message_and_field(control: ControlPlane) -> None:
    with control.client() as client:
        with pytest.raises(ControlError) as missing:
            client.get_service("does-not-exist")
        assert missing.value.status == 404 and missing.value.message
        with pytest.raises(ControlError) as invalid:
            client.create_service({"name": "v", "hosts": ["v.test"], "origins": [{"url": "x"}]})
        assert invalid.value.status in (400, 422)
        assert invalid.value.field and "origins" in invalid.value.field
        created = client.create_service(
            {"name": "etag", "hosts": ["etag.test"], "origins": [{"url": "http://127.0.0.1:1"}]}
        )
        assert created.version is not None
        fetched = client.get_service("etag")
        assert fetched.etag == created.etag
        spec = {
            "name": "etag",
            "hosts": ["etag.test", "e2.test"],
            "origins": [{"url": "http://127.0.0.1:1"}],
        }
        updated = client.update_service("etag", spec, fetched.etag)
        assert updated.etag != fetched.etag
        with pytest.raises(ControlError) as stale:
            client.update_service("etag", spec, fetched.etag)
        assert stale.value.status == 412
    with ControlClient(control.url, "vrg_bogus_token") as bogus, pytest.raises(ControlError) as bad:
        bogus.list_services()
    assert bad.value.status == 401
    assert ControlClient(control.url, None).healthz() == {"status": "ok"}
