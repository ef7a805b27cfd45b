"""`make demo` and `make test` install the system tools they need on a fresh machine.

The install script runs here against a PATH where the tools are missing and a stand-in
`apt-get` that records what it was asked for; nothing is installed for real.
"""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "system-deps.sh"
BASICS = ["bash", "ls", "sort", "tr", "id", "printf", "cat"]


def fake_path(tmp_path: Path, present: list[str]) -> tuple[dict, Path]:
    """A PATH holding only the shell basics, the listed tools and a recording apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in BASICS + present:
        os.symlink(shutil.which(name) or f"/usr/bin/{name}", bin_dir / name)
    record = tmp_path / "apt.log"
    apt = bin_dir / "apt-get"
    apt.write_text(f'#!/bin/bash\necho "$*" >> {record}\n')
    apt.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return env, record


def run_script(env: dict, *pairs: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *pairs], env=env, capture_output=True,
                          text=True, timeout=30)


def test_missing_ffmpeg_is_installed_and_announced(tmp_path):
    env, record = fake_path(tmp_path, present=[])
    done = run_script(env, "ffmpeg:ffmpeg", "ffprobe:ffmpeg", "curl:curl")
    assert done.returncode == 0, done.stderr
    assert "installing from apt: curl ffmpeg" in done.stdout
    calls = record.read_text().splitlines()
    assert calls[0].startswith("update")
    install = calls[1].split()
    assert install[:3] == ["install", "-y", "-q"]
    assert sorted(install[3:]) == ["curl", "ffmpeg"]  # ffmpeg once for two tools


def test_nothing_installed_when_all_present(tmp_path):
    env, record = fake_path(tmp_path, present=["sleep"])
    done = run_script(env, "sleep:coreutils", f"{SCRIPT}:whatever")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert not record.exists()


def test_missing_file_names_its_package(tmp_path):
    env, record = fake_path(tmp_path, present=[])
    done = run_script(env, "/nonexistent/libc.a:wasi-libc")
    assert done.returncode == 0, done.stderr
    assert "wasi-libc" in record.read_text()


def test_make_demo_installs_what_verge_up_runs():
    """The newcomer's stumble: `make demo` on a machine without ffmpeg."""
    plan = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30).stdout
    deps_line = next(line for line in plan.splitlines() if "system-deps.sh" in line)
    assert "ffmpeg:ffmpeg" in deps_line and "ffprobe:ffmpeg" in deps_line
    assert plan.index("system-deps.sh") < plan.index("verge up")


def test_make_test_keeps_pytest_summary_line():
    """One -q in all (pyproject's addopts): the closing "N passed" line stays."""
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30).stdout
    pytest_line = next(line for line in plan.splitlines() if "pytest" in line)
    assert " -q" not in pytest_line
