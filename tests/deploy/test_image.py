"""The container image: built by scripts/build-image.sh, run with podman, checked from inside.

This is CI's smoke test of the Containerfile: the image builds on a machine without a
registry (debootstrap base, cached under ~/.cache/verge-image/), an edge runs in it as an
unprivileged user on a read-only root filesystem, its HEALTHCHECK (the admin /healthz)
passes, it serves and caches through a real origin, it drains on SIGTERM (and the router,
which has no SIGTERM handler, still stops: tini is PID 1), `verge --version` answers, and
the control plane keeps its SQLite database on the /var/lib/verge volume. The containers run
without a network (`--network=none`); requests are made from inside with `podman exec`.

Slow: the first build debootstraps the base (a few minutes); later builds reuse it and
podman's layer cache (well under a minute when only code changed). Marked `image`:
`VERGE_SKIP_IMAGE=1` or `pytest -m 'not image'` skips it for quick local runs. It skips
by itself only where podman cannot run (not installable, or `podman info` fails after a
failed build); any other failed build is a failure. Where a registry is reachable,
VERGE_IMAGE_BASE=python:3.11-slim builds from that base instead of debootstrap.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
IMAGE = "localhost/verge:pytest"
BUILD_TIMEOUT = 900
READY_TIMEOUT = 60.0
UID = "10001"
EDGE_ARGS = shlex.split(
    "edge --listen 127.0.0.1:8080 --admin 127.0.0.1:8081 --cache-dir /var/cache/verge "
    "--workers 1 --origin http://127.0.0.1:9000"  # the demo origin, started in the container
)
ROUTER_ARGS = shlex.split(
    "router --config /etc/verge/router.yaml --dns 127.0.0.1:5353 --http 127.0.0.1:8053"
)

pytestmark = [
    pytest.mark.image,
    pytest.mark.timeout(BUILD_TIMEOUT + 120),
    pytest.mark.skipif(
        os.environ.get("VERGE_SKIP_IMAGE", "") not in ("", "0"),
        reason="VERGE_SKIP_IMAGE is set: the container image is not built",
    ),
]


def _run_flags() -> list[str]:
    """`podman run` flags that work without systemd, without a network, under tight rlimits.

    runc with cgroupfs needs no systemd; the rlimits are explicit because podman's defaults
    (nofile 1048576, a high nproc) are refused where the caller's hard limits are lower. The
    root filesystem is read-only, as the Kubernetes manifests run it (readOnlyRootFilesystem).
    """
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if hard_nofile == resource.RLIM_INFINITY else min(hard_nofile, 65536)
    return shlex.split(
        "--runtime runc --cgroup-manager cgroupfs --network=none --read-only "
        f"--ulimit nofile={nofile}:{nofile} --ulimit nproc=4096:4096"
    )


def _podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def _why_podman_cannot_be_had() -> str | None:
    """A reason to skip before building: no podman and no way to install it, or no root."""
    if shutil.which("podman") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        return (
            "podman is not installed, and scripts/build-image.sh installs it only as "
            "root with apt-get"
        )
    if os.geteuid() != 0 and not os.environ.get("VERGE_IMAGE_BASE"):
        return (
            "the debootstrap base image needs root; as another user set "
            "VERGE_IMAGE_BASE=python:3.11-slim (needs a registry)"
        )
    return None


def _why_podman_cannot_run() -> str | None:
    """A reason to skip after a failed build: podman itself does not work on this machine."""
    if shutil.which("podman") is None:
        return "podman could not be installed (see the build log)"
    probe = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"podman cannot run here: {last}"
    return None


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image, built by scripts/build-image.sh (the same path as `make image`)."""
    reason = _why_podman_cannot_be_had()
    if reason:
        pytest.skip(reason)
    log = tmp_path_factory.mktemp("image") / "build.log"
    args = ["bash", str(BUILD_SCRIPT), "--tag", IMAGE]
    if os.environ.get("VERGE_IMAGE_BASE"):
        args += ["--base", os.environ["VERGE_IMAGE_BASE"]]
    with log.open("w") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT)
    if done.returncode != 0:
        reason = _why_podman_cannot_run()
        if reason:
            pytest.skip(reason)
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"scripts/build-image.sh exited {done.returncode}; last lines:\n{tail}")
    return IMAGE


class Container:
    """One detached container of the image, and commands run inside it."""

    def __init__(
        self,
        image: str,
        *args: str,
        env: dict[str, str] | None = None,
        volumes: dict[str, str] | None = None,
    ) -> None:
        flags = [flag for key, value in (env or {}).items() for flag in ("-e", f"{key}={value}")]
        flags += [
            flag
            for host, inside in (volumes or {}).items()
            for flag in ("-v", f"{host}:{inside}:ro")
        ]
        done = _podman("run", "-d", *_run_flags(), *flags, image, *args)
        self.id = done.stdout.strip().splitlines()[-1]

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return _podman("exec", self.id, *command, check=check)

    def python(self, code: str) -> str:
        """Run Python in the container (its venv) and return what it printed."""
        return self.exec("python3", "-c", code).stdout

    def healthy(self) -> bool:
        """The image's HEALTHCHECK, run now."""
        return _podman("healthcheck", "run", self.id, check=False).returncode == 0

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not condition():
            if time.monotonic() > deadline or not self.running():
                logs = _podman("logs", self.id, check=False)
                raise AssertionError(
                    f"{what} not within {READY_TIMEOUT}s:\n{logs.stdout}{logs.stderr}"
                )
            time.sleep(0.25)  # another process's readiness: there is no event to await

    def running(self) -> bool:
        state = _podman("inspect", "--format", "{{.State.Running}}", self.id, check=False)
        return state.stdout.strip() == "true"

    def remove(self) -> None:
        _podman("rm", "-f", "-v", self.id, check=False)


def _get(url: str) -> str:
    """Python that GETs url inside the container and prints status and Cache-Status as JSON."""
    return (
        "import json, urllib.request\n"
        f"r = urllib.request.urlopen({url!r}, timeout=10)\n"
        "print(json.dumps({'status': r.status, 'cache': r.headers.get('Cache-Status', ''),"
        " 'length': len(r.read())}))\n"
    )


@pytest.fixture(scope="module")
def edge(image: str) -> Iterator[Container]:
    """The edge, as the image runs it, in front of the demo origin started in the container."""
    container = Container(image, *EDGE_ARGS, env={"VERGE_ADMIN_TOKEN": "pytest-admin-token"})
    try:
        container.wait_until(container.healthy, "the edge's HEALTHCHECK (/healthz)")
        container.exec(
            "sh", "-c", "verge demo-origin --listen 127.0.0.1:9000 >/tmp/origin.log 2>&1 &"
        )
        yield container
    finally:
        container.remove()


def test_image_runs_unprivileged_with_volumes_and_healthcheck(image: str):
    inspected = json.loads(_podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert {"/var/cache/verge", "/var/lib/verge"} <= set(config["Volumes"])
    assert config["Entrypoint"] == ["tini", "--", "verge"]
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck") or {}
    assert "VERGE_HEALTHZ_URL" in " ".join(healthcheck.get("Test", [])), "no HEALTHCHECK kept"


def test_edge_answers_healthz(edge: Container):
    assert edge.healthy()
    status = _podman("inspect", "--format", "{{.State.Health.Status}}", edge.id).stdout.strip()
    assert status == "healthy"
    assert edge.exec("id", "-u").stdout.strip() == UID


def test_verge_version(edge: Container):
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    installed = edge.python("import importlib.metadata as m; print(m.version('verge'))")
    assert installed.strip() == expected
    done = edge.exec("verge", "--version", check=False)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_edge_caches_through_the_origin_on_its_volume(edge: Container):
    url = "http://127.0.0.1:8080/static/app.js"
    edge.wait_until(
        lambda: edge.exec("python3", "-c", _get(url), check=False).returncode == 0,
        "the demo origin behind the edge",
    )
    second = json.loads(edge.python(_get(url)))
    assert second["status"] == 200 and second["length"] > 0
    assert "hit" in second["cache"], second
    edge.wait_until(
        lambda: (
            edge.exec(
                "sh", "-c", "find /var/cache/verge -type f | grep -q .", check=False
            ).returncode
            == 0
        ),
        "an object in the disk tier (/var/cache/verge)",
    )


def test_control_plane_keeps_its_database_on_the_volume(image: str):
    container = Container(
        image,
        "control",
        "--listen",
        "127.0.0.1:7000",
        "--db",
        "sqlite:////var/lib/verge/verge.db",
        env={
            "VERGE_HEALTHZ_URL": "http://127.0.0.1:7000/healthz",
            "VERGE_ADMIN_TOKEN": "vrg_pytest_admin_token_0123456789",
        },
    )
    try:
        container.wait_until(container.healthy, "the control plane's HEALTHCHECK (/healthz)")
        container.exec("test", "-s", "/var/lib/verge/verge.db")
    finally:
        container.remove()


def _stop(container: Container) -> tuple[str, float]:
    """SIGTERM (podman stop, SIGKILL after 20 s): the exit code and the seconds it took."""
    started = time.monotonic()
    _podman("stop", "--time", "20", container.id)
    elapsed = time.monotonic() - started
    code = _podman("inspect", "--format", "{{.State.ExitCode}}", container.id).stdout.strip()
    return code, elapsed


def test_edge_drains_on_sigterm(image: str):
    container = Container(image, *EDGE_ARGS)
    try:
        container.wait_until(container.healthy, "the edge's HEALTHCHECK (/healthz)")
        code, elapsed = _stop(container)
        assert code == "0", f"exit code {code} after SIGTERM"
        assert elapsed < 15, f"SIGTERM took {elapsed:.1f}s"
    finally:
        container.remove()


def test_router_stops_on_sigterm(image: str, tmp_path: Path):
    """tini as PID 1 delivers SIGTERM even to a command without a handler for it."""
    config = tmp_path / "router.yaml"
    config.write_text(
        "zone: cdn.example.com\n"
        "nameservers: [{name: ns1.cdn.example.com, addresses: [192.0.2.53]}]\n"
        "edges: [{name: e1, url: 'http://192.0.2.1:8080'}]\n"
    )
    config.chmod(0o644)
    container = Container(image, *ROUTER_ARGS, volumes={str(config): "/etc/verge/router.yaml"})
    try:
        container.wait_until(
            lambda: "ready" in _podman("logs", container.id, check=False).stdout,
            "the router's ready line",
        )
        code, elapsed = _stop(container)
        assert code in ("0", "143"), f"exit code {code}: killed, not stopped"
        assert elapsed < 15, f"SIGTERM took {elapsed:.1f}s"
    finally:
        container.remove()
