"""The systemd units (deploy/systemd): valid, hardened, and running real `verge` commands.

`systemd-analyze verify` loads each unit as systemd would (unknown keys, bad values and a
missing ExecStart binary are reported; verify exits 0 on most of them, so any output fails
the test) and `systemd-analyze security --offline` scores its sandboxing. The units name
/opt/verge/bin/verge; here that path is swapped for a stand-in executable, since verify
checks that the command exists. Skipped where systemd-analyze is not installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.verge_cli import unknown_options

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
INSTALLED = "/opt/verge/bin/verge"
NAMES = {  # unit file -> the unit to load (a template needs an instance)
    "verge-control.service": "verge-control.service",
    "verge-edge@.service": "verge-edge@edge1.service",
    "verge-router.service": "verge-router.service",
    "verge-stream.service": "verge-stream.service",
}
EXPOSURE_THRESHOLD = 20
"""`systemd-analyze security` exposure, in tenths: 2.0 and below is "OK" (10 is "UNSAFE")."""

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def directives(path: Path) -> list[tuple[str, str]]:
    """(key, value) of every directive, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def values(path: Path, key: str) -> list[str]:
    return [value for name, value in directives(path) if name == key]


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units in a temporary directory, ExecStart pointing at a stand-in `verge`."""
    stage = tmp_path_factory.mktemp("units")
    stand_in = stage / "verge"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    for name in NAMES:
        text = (UNITS / name).read_text().replace(INSTALLED, str(stand_in))
        (stage / name).write_text(text)
    return stage


def test_every_unit_is_here():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(NAMES)


@needs_systemd_analyze
@pytest.mark.parametrize("unit", NAMES.values())
def test_systemd_analyze_verify_finds_nothing(staged: Path, unit: str):
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(staged / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", NAMES.values())
def test_sandboxing_scores_ok(staged: Path, unit: str):
    done = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=yes",
            "--no-pager",
            f"--threshold={EXPOSURE_THRESHOLD}",
            str(staged / unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    summary = (done.stdout.strip().splitlines() or ["?"])[-1]
    assert done.returncode == 0, summary


@pytest.mark.parametrize("name", NAMES)
def test_exec_start_runs_a_real_verge_command(name: str):
    path = UNITS / name
    (exec_start,) = values(path, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED
    assert not unknown_options(argv[1:]), exec_start
    defaults = {
        pair.split("=", 1)[0]
        for value in values(path, "Environment")
        for pair in shlex.split(value)
    }
    for variable in re.findall(r"\$\{?(\w+)\}?", exec_start):
        assert variable in defaults, f"${variable} has no default in Environment="


@pytest.mark.parametrize("name", NAMES)
def test_units_are_hardened_and_keep_secrets_off_the_command_line(name: str):
    path = UNITS / name
    settings = dict(directives(path))
    assert settings["DynamicUser"] == "yes"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert (
        "StateDirectory" in settings
        or "CacheDirectory" in settings
        or name.startswith("verge-router")
    )
    assert "EnvironmentFile" in settings or "LoadCredential" in settings
    (exec_start,) = values(path, "ExecStart")
    assert not re.search(r"token|secret|password", exec_start, re.IGNORECASE), exec_start
