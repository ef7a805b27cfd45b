"""Edge functions and edge KV end to end: `verge fn` / `verge kv` against a real control plane,
one real edge: deploy, new version, rollback, KV replication, logs, and offline autonomy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.cli import run_verge
from tests.compute.conftest import build_examples
from tests.control.test_fleet import ADMIN, Fleet, get, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    return build_examples(tmp_path_factory.mktemp("fn-fleet"))


def verge(fleet: Fleet, *args: str) -> str:
    """Run a `verge` control command; its stdout (the test fails on a non-zero exit)."""
    out = run_verge([*args, "--control", fleet.control_url, "--token", ADMIN])
    assert out.returncode == 0, out.stderr
    return out.stdout


def saved_module(cache_dir: Path, function: str) -> str | None:
    """The module of ``function`` in the edge's last good bundle (what a restart runs)."""
    try:
        bundle = json.loads((cache_dir / "control" / "bundle.json").read_text())
    except (OSError, ValueError):
        return None
    return next((f["module"] for f in bundle["config"].get("functions", [])
                 if f["name"] == function), None)


def answer(url: str, path: str) -> str:
    response = get(url, path)
    return response.text if response.status_code == 200 else f"{response.status_code}"


def test_deploy_rollback_kv_and_offline_autonomy(fleet, modules, origin):
    service = {"name": "shop", "hosts": ["shop.test"], "origins": [{"url": origin.url}]}
    assert fleet.api.post("/api/v1/services", json=service).status_code == 201
    fleet.start_edge("e1", fleet.join_token())
    url = fleet.edge_urls["e1"]

    # v1 answers through the edge
    hello = ["fn", "deploy", "hello", "--service", "shop", "--route", "/api/hello*"]
    out = verge(fleet, *hello[:2], "hello", str(modules["hello"]), *hello[3:], "--cpu-ms", "50")
    assert "version 1 deployed" in out
    wait_until(lambda: answer(url, "/api/hello/x") == "hello from wasm\n", what="v1 deployed")

    # v2 (another module) replaces it on the edge; rollback brings v1 back
    verge(fleet, "fn", "deploy", "hello", str(modules["kv"]), *hello[3:], "--kv", "site")
    wait_until(lambda: answer(url, "/api/hello/x").startswith("get=-2"), what="v2 deployed")
    assert "version 1 is active" in verge(fleet, "fn", "rollback", "hello")
    wait_until(lambda: answer(url, "/api/hello/x") == "hello from wasm\n", what="rolled back")
    listed = json.loads(verge(fleet, "fn", "list", "--json"))
    assert [(f["name"], f["version"]) for f in listed] == [("hello", 1)]

    # KV written through the control plane is read by a function on the edge
    verge(
        fleet,
        "fn",
        "deploy",
        "reader",
        str(modules["kv"]),
        "--service",
        "shop",
        "--route",
        "/kv",
        "--kv",
        "site",
    )
    wait_until(lambda: answer(url, "/kv").startswith("get=-2"), what="reader deployed")
    assert "seq 1" in verge(fleet, "kv", "put", "site", "greeting", "hello kv")
    wait_until(lambda: answer(url, "/kv").startswith("get=8:hello kv"), what="KV replicated")
    assert verge(fleet, "kv", "get", "site", "greeting") == "hello kv"
    assert json.loads(verge(fleet, "kv", "list", "site", "--json"))[0]["key"] == "greeting"

    # a failing function's stderr reaches `verge fn logs`
    verge(
        fleet,
        "fn",
        "deploy",
        "failing",
        str(modules["echo"]),
        "--service",
        "shop",
        "--route",
        "/fail",
    )
    wait_until(lambda: answer(url, "/fail") == "500", what="failing function deployed")
    wait_until(
        lambda: "something went wrong" in verge(fleet, "fn", "logs", "failing"),
        timeout=30,
        what="function logs shipped",
    )

    # a version the edge cannot load: the running one stays, the error is in the logs
    broken = fleet.tmp / "broken.wasm"
    broken.write_bytes(b"\0asm\x01\0\0\0not really a module")
    assert "version 3 deployed" in verge(fleet, "fn", "deploy", "hello", str(broken), *hello[3:])
    wait_until(
        lambda: "load_error" in verge(fleet, "fn", "logs", "hello"),
        timeout=30,
        what="load error reported",
    )
    assert answer(url, "/api/hello/x") == "hello from wasm\n"
    verge(fleet, "fn", "rollback", "hello", "--version", "1")
    good = "sha256:" + hashlib.sha256(modules["hello"].read_bytes()).hexdigest()
    wait_until(lambda: saved_module(fleet.tmp / "e1", "hello") == good,
               what="the rollback saved on the edge")  # before the control plane goes

    # the control plane goes away: functions keep answering, with their KV
    fleet.control.kill()
    assert answer(url, "/api/hello/x") == "hello from wasm\n"
    assert answer(url, "/kv").startswith("get=8:hello kv")
    # restarted without the control plane: saved bundle, cached modules, local KV
    fleet.edges["e1"].kill()
    fleet.start_edge("e1", None)
    assert answer(url, "/api/hello/x") == "hello from wasm\n"
    assert answer(url, "/kv").startswith("get=8:hello kv")
