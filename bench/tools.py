"""What every benchmark script needs from the machine, written once: sbin on PATH, Debian
packages installed on demand (nginx, wrk, dnsperf, h2load ... are not pre-installed), the
tools' versions for the report, and the load average above which numbers are called noisy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence

BUSY_LOAD = 0.5  # 1-minute load average above which other work skews the numbers


class ToolError(RuntimeError):
    """A tool the benchmark needs is missing and could not be installed."""


def add_sbin_to_path() -> None:
    """nginx and nsd live in /usr/sbin, which a non-root user's PATH often lacks."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join(
        [*path, *(d for d in ("/usr/sbin", "/sbin") if d not in path)]
    )


def missing_packages(tools: Mapping[str, str]) -> list[str]:
    """The Debian packages of the ``{tool: package}`` whose tool is not on PATH."""
    return sorted({package for tool, package in tools.items() if shutil.which(tool) is None})


def apt_install(packages: Sequence[str], say=print) -> None:
    """``apt-get install`` the packages (sudo unless root); ToolError with apt's own words."""
    if not packages:
        return
    if shutil.which("apt-get") is None:
        raise ToolError(f"missing {', '.join(packages)} and no apt-get to install them")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    say(f"installing {' '.join(packages)} with apt-get …")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        [*sudo, "apt-get", "update", "-qq"],
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ToolError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")


def require(tools: Mapping[str, str], say=print) -> None:
    """Install what is missing of ``{tool: package}``; ToolError if a tool is still missing."""
    apt_install(missing_packages(tools), say)
    still = [tool for tool in tools if shutil.which(tool) is None]
    if still:
        raise ToolError(f"still missing after apt-get: {', '.join(still)}")


def tool_version(argv: list[str]) -> str:
    """The line of ``argv``'s output that names a version, else its first line."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    named = [line for line in lines if "version" in line.lower()]
    return (named or lines or ["unknown"])[0].strip()


def install_signal_handlers() -> None:
    """Ctrl-C raises KeyboardInterrupt (even if inherited as ignored) and SIGTERM/SIGHUP
    raise SystemExit, so the `finally` blocks stop every server and remove the temp dir."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
