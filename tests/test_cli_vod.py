"""`verge vod add` / `list` without --config: a `verge up` state directory here means the demo's
library (said on stderr); without one, the entry goes to ./stream-data as before and the
command says where it is and how to serve it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import VERGE

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed"),
]
EDGE_VOD = "http://127.0.0.2:8080/vod"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("in") / "clip.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=320x240:rate=25", "-t", "1", "-c:v", "libx264", "-preset", "ultrafast",
         "-pix_fmt", "yuv420p", str(path)],
        check=True, timeout=30,
    )  # fmt: skip
    return path


def verge(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VERGE, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def fake_demo(root: Path) -> Path:
    """What `verge up` leaves in .verge-up/: up.json naming its stream config."""
    state = root / ".verge-up"
    state.mkdir()
    data = root / "demo-data"
    config = state / "stream.yaml"
    config.write_text(json.dumps({"stream": {"data_dir": str(data)}}))
    up = {"stream_config": str(config), "vod": EDGE_VOD, "edges": []}
    (state / "up.json").write_text(json.dumps(up))
    return data


def test_add_without_config_uses_the_verge_up_demo(tmp_path: Path, clip: Path) -> None:
    data = fake_demo(tmp_path)
    added = verge(tmp_path, "vod", "add", str(clip), "--name", "clip")
    assert added.returncode == 0, added.stderr
    assert "using the `verge up` demo's stream config" in added.stderr
    assert str(tmp_path / ".verge-up" / "stream.yaml") in added.stderr
    assert (data / "vod" / "clip" / "meta.json").is_file()
    assert not (tmp_path / "stream-data").exists()
    assert f"{EDGE_VOD}/clip.m3u8" in added.stdout
    listed = verge(tmp_path, "vod", "list", "--json")
    assert [entry["name"] for entry in json.loads(listed.stdout)] == ["clip"]


def test_config_or_data_dir_wins_over_the_demo(tmp_path: Path, clip: Path) -> None:
    data = fake_demo(tmp_path)
    added = verge(tmp_path, "vod", "add", str(clip), "--name", "clip", "--data-dir", "mine")
    assert added.returncode == 0, added.stderr
    assert "verge up" not in added.stderr and not (data / "vod").exists()
    entry = (tmp_path / "mine" / "vod" / "clip").resolve()
    assert f"-> {entry}" in added.stdout
    assert f"`stream: {{data_dir: {(tmp_path / 'mine').resolve()}}}`" in added.stdout


def test_add_without_a_demo_says_where_and_how_to_serve(tmp_path: Path, clip: Path) -> None:
    added = verge(tmp_path, "vod", "add", str(clip), "--name", "clip")
    assert added.returncode == 0, added.stderr
    entry = (tmp_path / "stream-data" / "vod" / "clip").resolve()
    assert (entry / "meta.json").is_file()
    lines = added.stdout.splitlines()[-4:]  # after the progress bar
    assert lines[0].endswith(f"-> {entry}")
    assert "no `verge up` state here (.verge-up/up.json)" in lines[1]
    assert f"`verge stream` run in {tmp_path}" in lines[2]
    assert "http://127.0.0.1:8090/vod/clip.m3u8" in lines[2]
