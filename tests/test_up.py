"""`verge up`: the demo service's stream rules, keeping the control plane running, the banner,
and (one test, many processes) the whole platform: VOD through an edge, a killed control plane
restarted while the edge keeps serving, recordings through the edge, a calm Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import VERGE, free_port
from verge import config as vconfig
from verge import up

STREAM = "http://127.0.0.1:8090"
READY = "child ready"
# A child that says it is ready, then waits to be killed.
SLEEPER = [sys.executable, "-c", f"import time; print({READY!r}, flush=True); time.sleep(600)"]


def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll a condition in other processes with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the demo service's rules ------------------------------------------------------------------


def test_demo_rules_send_live_and_vod_to_the_stream_server() -> None:
    rules = up.demo_rules(STREAM)
    by_path = {rule["path"]: rule for rule in rules}
    for path in ("/live/", "/vod/"):
        assert by_path[path]["origins"] == [{"url": STREAM}]
    service = vconfig.Service.model_validate(
        {"name": "demo", "hosts": ["demo.verge.test"], "origins": ["http://127.0.0.1:9000"],
         "rules": rules}
    )  # fmt: skip
    assert [r.path for r in service.rules][-2:] == ["/live/", "/vod/"]


def test_stream_rules_added_to_a_service_from_an_earlier_run() -> None:
    old = [*up.DEMO_RULES, {"path": "/live/", "origins": [{"url": "http://127.0.0.1:1"}]}]
    rules = up.with_stream_rules(old, STREAM)
    assert rules == up.demo_rules(STREAM)
    assert up.with_stream_rules(rules, STREAM) == rules  # nothing to change: same list


def _fake_control(service: dict, seen: list[httpx.Request]) -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "GET":
            return httpx.Response(200, json=service, headers={"ETag": '"7"'})
        return httpx.Response(200, json=json.loads(request.content))

    return httpx.Client(base_url="http://control", transport=httpx.MockTransport(answer))


def test_existing_demo_service_gets_the_vod_rule_once() -> None:
    old = {"name": "demo", "hosts": ["demo.verge.test"], "tenant": "default", "version": 7,
           "rules": [*up.DEMO_RULES, up.stream_rule("/live/", STREAM)]}  # fmt: skip
    seen: list[httpx.Request] = []
    platform = up.Platform(up.UpOptions(state_dir=Path("unused")))
    platform._ensure_demo_service(_fake_control(old, seen), "http://o", STREAM)
    [_, put] = seen
    assert put.method == "PUT" and put.headers["if-match"] == '"7"'
    assert json.loads(put.content)["rules"] == up.demo_rules(STREAM)
    current = {**old, "rules": up.demo_rules(STREAM)}
    seen.clear()
    platform._ensure_demo_service(_fake_control(current, seen), "http://o", STREAM)
    assert [r.method for r in seen] == ["GET"]


# --- keeping the control plane running ---------------------------------------------------------


def test_backoff_doubles_to_a_cap_and_resets_after_a_steady_run() -> None:
    backoff = up.Backoff(first=1, cap=5, steady=60)
    assert [backoff.next(ran_for=2) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert backoff.next(ran_for=61) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_keeper_restarts_an_exited_child_after_the_backoff() -> None:
    said: list[str] = []
    back: list[up.Child] = []
    clock = Clock()
    first = up.launch("control plane", SLEEPER, READY)
    assert first.ready.wait(10)
    keeper = up.Keeper(first, while_down="edges keep serving", backoff=up.Backoff(first=2),
                       on_ready=back.append, say=said.append, clock=clock)  # fmt: skip
    try:
        assert keeper.check() is first and said == []
        first.proc.kill()
        first.proc.wait()
        keeper.check()
        assert said == ["control plane exited (code -9); edges keep serving; restarting it in 2 s"]
        clock.now += 1
        assert keeper.check() is first  # not yet: the back-off is 2 s
        clock.now += 1
        second = keeper.check()
        assert second is not first and second.args == first.args
        assert second.ready.wait(10)
        keeper.check()
        assert said[-1] == f"control plane is back (pid {second.proc.pid})"
        assert back == [second]
    finally:
        up.stop_children([keeper.child])


def test_supervise_keeps_edges_when_the_control_plane_exits(capsys) -> None:
    platform = up.Platform(up.UpOptions(state_dir=Path("unused")))
    control = up.launch(up.CONTROL, SLEEPER, READY)
    edge = up.launch("edge-1", SLEEPER, READY)
    origin = up.launch("origin", SLEEPER, READY)
    platform.children = [origin, control, edge]
    platform.control = up.Keeper(control, while_down="edges keep serving from their last config",
                                 backoff=up.Backoff(first=0.1))  # fmt: skip
    stop = threading.Event()
    result: list[str] = []
    supervisor = threading.Thread(target=lambda: result.append(platform.supervise(stop)))
    try:
        assert all(c.ready.wait(10) for c in (control, edge, origin))
        supervisor.start()
        control.proc.kill()
        restarted = wait_until(
            lambda: platform.control.child is not control and platform.control.child.ready_line,
            what="a new control plane",
        )
        assert restarted and edge.proc.poll() is None and origin.proc.poll() is None
        assert platform.children[1] is platform.control.child  # replaced in place
        origin.proc.kill()  # the demo cannot go on without its origin
        supervisor.join(10)
        [reason] = result
        assert reason.startswith("the origin exited (code -9)")
    finally:
        stop.set()
        if supervisor.is_alive():
            supervisor.join(10)
        platform.stop()
    out = capsys.readouterr().out
    assert "control plane exited (code -9); edges keep serving from their last config" in out
    assert "control plane is back" in out
    assert all(c.proc.poll() is not None for c in platform.children)


# --- the banner and what `verge vod add` reads -------------------------------------------------

UP = {
    "control": "http://127.0.0.1:7000", "admin_token": "vrg_admin_x",
    "edges": [{"name": "edge-1", "url": "http://127.0.0.2:8080",
               "admin_url": "http://127.0.0.2:8081"}],
    "origin": "http://127.0.0.1:9000", "dns": "127.0.0.1:5353", "zone": "verge.test",
    "router": "http://127.0.0.1:8053", "rtmp": "rtmp://127.0.0.1:1935/live", "stream_key": "k",
    "watch": "http://127.0.0.2:8080/live", "vod": "http://127.0.0.2:8080/vod",
    "service": "demo", "hostname": "demo.verge.test",
}  # fmt: skip


def test_banner_has_shell_ready_lines_and_the_dashboard_login() -> None:
    text = up.banner(UP, Path(".verge-up"))
    bin_dir = up.scripts_dir()
    assert (bin_dir / "verge").exists()  # the directory the PATH line adds has `verge`
    lines = [line.strip() for line in text.splitlines()]
    assert f"export PATH={bin_dir}:$PATH" in lines
    assert "export VERGE_CONTROL=http://127.0.0.1:7000" in lines
    assert "export VERGE_TOKEN=vrg_admin_x" in lines
    [login] = [line for line in lines if line.startswith("dashboard")]
    assert "http://127.0.0.1:7000/" in login and "admin token" in login
    assert "http://127.0.0.2:8080/vod/NAME.m3u8" in text


def test_exported_lines_work_in_a_shell() -> None:
    script = "\n".join([*up.shell_lines(UP), 'echo "$VERGE_CONTROL $VERGE_TOKEN"',
                        "command -v verge"])  # fmt: skip
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10,
                          env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.stdout.splitlines() == [
        "http://127.0.0.1:7000 vrg_admin_x",
        str(up.scripts_dir() / "verge"),
    ]


def test_find_demo_stream(tmp_path: Path) -> None:
    assert up.find_demo_stream(tmp_path) is None
    (tmp_path / "up.json").write_text(json.dumps(UP))  # an up.json from before stream_config
    assert up.find_demo_stream(tmp_path) is None  # and no stream.yaml: nothing to use
    (tmp_path / "stream.yaml").write_text("stream: {}\n")
    found = up.find_demo_stream(tmp_path)
    assert found == up.DemoStream(tmp_path, tmp_path / "stream.yaml", UP["vod"])
    (tmp_path / "up.json").write_text("{not json")
    assert up.find_demo_stream(tmp_path) is None


# --- the whole platform ------------------------------------------------------------------------


class Output:
    """A process's output lines, collected by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


def make_clip(path: Path, seconds: int = 2) -> Path:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=320x240:rate=25", "-f", "lavfi", "-i", "sine", "-t", str(seconds),
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
         str(path)],
        check=True, timeout=30,
    )  # fmt: skip
    return path


def publish(rtmp: str, key: str, seconds: int = 3) -> subprocess.Popen:
    return subprocess.Popen(
        ["ffmpeg", "-v", "error", "-nostdin", "-re", "-f", "lavfi", "-i",
         "testsrc2=size=320x240:rate=25", "-f", "lavfi", "-i", "sine", "-t", str(seconds),
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-c:a", "aac", "-f", "flv",
         f"{rtmp}/cam?key={key}"],
    )  # fmt: skip


def vod_entries(cwd: Path) -> list[str]:
    listed = subprocess.run([*VERGE, "vod", "list", "--json"], cwd=cwd, capture_output=True,
                            text=True, timeout=30, check=True)  # fmt: skip
    return [entry["name"] for entry in json.loads(listed.stdout)]


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_verge_up_vod_control_plane_restart_and_ctrl_c(tmp_path: Path) -> None:
    edge_port = free_port("127.0.0.2")
    ports = {name: str(free_port()) for name in (
        "--control-port", "--origin-port", "--https-port", "--dns-port", "--router-port",
        "--rtmp-port", "--stream-port")}  # fmt: skip
    proc = subprocess.Popen(
        [*VERGE, "up", "--state-dir", ".verge-up", "--edges", "1", "--edge-port", str(edge_port),
         *(item for pair in ports.items() for item in pair)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    output = Output(proc)
    up_json = tmp_path / ".verge-up" / "up.json"
    try:
        wait_until(lambda: up_json.exists() or proc.poll() is not None, 120, "up.json")
        assert proc.poll() is None, output.text()
        state = json.loads(up_json.read_text())
        edge = state["edges"][0]["url"]
        assert state["vod"] == f"{edge}/vod"
        assert "export VERGE_TOKEN=" + state["admin_token"] in output.text()
        # no token in any process's arguments (ps): they travel in the children's environment
        secrets = [state["admin_token"], state["join_token"], state["edges"][0]["admin_token"]]
        for pid in (state["control_pid"], state["edges"][0]["pid"], proc.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            assert not any(secret in cmdline for secret in secrets), cmdline
        publisher = publish(state["rtmp"], state["stream_key"])  # ends: becomes a recording

        # 1. `verge vod add` without --config: into the demo's library, served through the edge
        clip = make_clip(tmp_path / "clip.mp4")
        added = subprocess.run([*VERGE, "vod", "add", str(clip), "--name", "clip"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "using the `verge up` demo's stream config" in added.stderr
        assert f"{edge}/vod/clip.m3u8" in added.stdout
        assert not (tmp_path / "stream-data").exists()
        playlist = httpx.get(f"{edge}/vod/clip.m3u8", timeout=10)
        assert playlist.status_code == 200 and playlist.text.startswith("#EXTM3U")
        assert httpx.get(f"{edge}/vod/clip.mp4", headers={"Range": "bytes=0-99"},
                         timeout=10).status_code in (200, 206)  # fmt: skip

        # 2. the control plane dies: reported, the edge keeps serving, it comes back
        os.kill(state["control_pid"], signal.SIGKILL)
        wait_until(lambda: "control plane exited (code -9); edges keep serving from their "
                   "last config; restarting it" in output.text(), 20, "the report")  # fmt: skip
        assert httpx.get(f"{edge}/static/app.js", timeout=10).status_code == 200
        assert proc.poll() is None and not gone(state["edges"][0]["pid"])
        wait_until(lambda: "control plane is back" in output.text(), 60, "the restart")
        restarted = json.loads(up_json.read_text())["control_pid"]
        assert restarted != state["control_pid"] and not gone(restarted)
        nodes = httpx.get(
            state["control"] + "/api/v1/nodes",
            timeout=10,
            headers={"Authorization": f"Bearer {state['admin_token']}"},
        )
        assert nodes.status_code == 200

        # 3. the live stream, ended, is a recording served through the edge like any VOD
        publisher.wait(30)
        recording = wait_until(
            lambda: [n for n in vod_entries(tmp_path) if n.startswith("live-cam-")], 60,
            "the recording")[0]  # fmt: skip
        served = httpx.get(f"{edge}/vod/{recording}.m3u8", timeout=10)
        assert served.status_code == 200 and served.text.startswith("#EXTM3U")

        # 4. Ctrl-C: everything stops, calmly
        children = [restarted, state["edges"][0]["pid"], state["origin_pid"]]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, output.text()
        text = output.text()
        assert "stopping Verge (Ctrl-C)" in text and "stopping Verge:" not in text
        assert not re.search(r"(edge-1|origin|stream server|router) exited", text), text
        wait_until(lambda: all(gone(pid) for pid in children), 10, "the children gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
