"""The `verge` command as an operator meets it: help, bad config, busy ports, missing tokens.

Each test runs the real console script (or ``python -m verge.cli``) in a subprocess; an
operator's mistake must end in a clear message on stderr and a non-zero exit, never a
traceback and never a half-started node.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
import typer

from tests.conftest import ROOT, VERGE, free_port

pytestmark = pytest.mark.timeout(60)

SCRIPT = Path(sys.executable).parent / "verge"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else VERGE

GOOD = """\
services:
  - name: site
    hosts: ["*"]
    default: true
    origins: [http://127.0.0.1:9]
"""

BAD_VALUE = """\
services:
  - name: site
    hosts: ["*"]
    origins: [http://127.0.0.1:9]
    rules:
      - path: /x/
        ttl: soon
"""

TYPO = """\
cache:
  memroy_bytes: 1MiB
"""

BAD_YAML = """\
services:
  - name: site
    hosts: [a, b
"""


@dataclass
class Result:
    code: int
    out: str
    err: str


def verge(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> Result:
    """Run `verge ARGS`; a command that does not exit in time is killed with its workers."""
    proc = subprocess.Popen(
        [*COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        cwd=os.environ.get("TMPDIR", "/tmp"),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`verge {' '.join(args)}` did not exit:\n{out}\n{err}")
    return Result(proc.returncode, out, err)


def env_without(*names: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["COLUMNS"] = "200"  # help text on one line per option
    return env


def edge_args(
    tmp_path: Path, *extra: str, listen: str | None = None, admin: str | None = None
) -> list[str]:
    return [
        "edge",
        "--listen",
        listen or f"127.0.0.1:{free_port()}",
        "--admin",
        admin or f"127.0.0.1:{free_port()}",
        "--admin-token",
        "t",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--workers",
        "1",
        *extra,
    ]


def assert_clean_failure(result: Result, *needles: str) -> None:
    """Non-zero exit, every needle on stderr, no traceback."""
    assert result.code != 0, result
    for needle in needles:
        assert needle in result.err, f"{needle!r} not in stderr:\n{result.err}"
    assert "Traceback" not in result.err + result.out


# ---------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------


def test_top_level_help_lists_the_commands():
    result = verge("--help", env=env_without())
    assert result.code == 0
    for command in ("edge", "purge", "config-check"):
        assert command in result.out


def test_no_arguments_shows_help():
    result = verge(env=env_without())
    assert "edge" in result.out + result.err and "purge" in result.out + result.err


@pytest.mark.parametrize(
    "command, options",
    [
        (
            "edge",
            [
                "--listen",
                "--origin",
                "--cache-dir",
                "--admin",
                "--admin-token",
                "--workers",
                "--config",
                "--access-log",
            ],
        ),
        ("purge", ["--admin", "--token", "--tag", "--prefix", "--soft", "--json"]),
        ("config-check", ["path", "YAML config file"]),
    ],
)
def test_command_help_lists_its_options(command, options):
    result = verge(command, "--help", env=env_without())
    assert result.code == 0
    for option in options:
        assert option in result.out, f"{option} missing from `verge {command} --help`"


# ---------------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------------


def test_config_check_accepts_a_good_file(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = verge("config-check", str(path))
    assert result.code == 0, result
    assert f"{path}: ok (1 services)" in result.out


def test_config_check_accepts_the_shipped_example():
    result = verge("config-check", str(ROOT / "examples" / "verge.yaml"))
    assert result.code == 0, result
    assert "ok (3 services)" in result.out


@pytest.mark.parametrize(
    "text, where, reason",
    [
        (BAD_VALUE, ":7:14:", "services[0].rules[0].ttl: invalid duration 'soon'"),
        (TYPO, ":2:3:", "cache.memroy_bytes: unknown key; did you mean 'memory_bytes'?"),
        (BAD_YAML, ":4:1:", "invalid YAML"),
    ],
    ids=["bad-value", "typo", "bad-yaml"],
)
def test_config_check_reports_file_line_column_and_reason(tmp_path, text, where, reason):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = verge("config-check", str(path))
    assert_clean_failure(result, f"{path}{where}", reason)


def test_config_check_missing_file(tmp_path):
    result = verge("config-check", str(tmp_path / "nope.yaml"))
    assert_clean_failure(result, "nope.yaml", "cannot read config file")


def test_edge_with_bad_config_exits_with_file_line_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_VALUE)
    result = verge(*edge_args(tmp_path, "--config", str(path)))
    assert_clean_failure(result, f"{path}:7:14:", "invalid duration 'soon'")
    assert "ready" not in result.out


def test_edge_without_origin_or_services(tmp_path):
    result = verge(*edge_args(tmp_path))
    assert_clean_failure(result, "no services")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--origin", "ftp://example.com"], "--origin"),
        (["--origin", "http://127.0.0.1:9", "--workers", "-1"], "--workers"),
    ],
    ids=["bad-origin", "negative-workers"],
)
def test_edge_rejects_bad_options(tmp_path, extra, needle):
    assert_clean_failure(verge(*edge_args(tmp_path, *extra)), needle)


def test_edge_rejects_a_malformed_listen_address(tmp_path):
    result = verge(*edge_args(tmp_path, "--origin", "http://127.0.0.1:9", listen="localhost"))
    assert result.code != 0
    assert "HOST:PORT" in result.err


# ---------------------------------------------------------------------------------------------
# ports already in use
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def busy_port():
    """A port held by an ordinary listening socket (no SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_edge_on_a_busy_listen_port(tmp_path, busy_port):
    result = verge(
        *edge_args(tmp_path, "--origin", "http://127.0.0.1:9", listen=f"127.0.0.1:{busy_port}")
    )
    assert_clean_failure(result, "--listen", "in use")


def test_edge_on_a_busy_admin_port(tmp_path, busy_port):
    result = verge(
        *edge_args(tmp_path, "--origin", "http://127.0.0.1:9", admin=f"127.0.0.1:{busy_port}")
    )
    assert_clean_failure(result, "--admin", "in use")


def test_second_edge_on_the_port_of_a_running_one(tmp_path, edge):
    """The running edge binds with SO_REUSEPORT; a second one must not silently share it."""
    result = verge(
        *edge_args(tmp_path, "--origin", "http://127.0.0.1:9", listen=f"127.0.0.1:{edge.port}")
    )
    assert_clean_failure(result, "--listen", f"127.0.0.1:{edge.port}", "in use")


# ---------------------------------------------------------------------------------------------
# purge
# ---------------------------------------------------------------------------------------------


def test_purge_without_token_fails_clearly():
    result = verge(
        "purge",
        "--admin",
        f"http://127.0.0.1:{free_port()}",
        "http://site/x",
        env=env_without("VERGE_TOKEN"),
    )
    assert_clean_failure(result, "admin token is required", "--token")


def test_purge_without_targets_fails_clearly():
    result = verge("purge", "--token", "t", env=env_without("VERGE_TOKEN"))
    assert_clean_failure(result, "give URLs, --tag or --prefix")


def test_purge_with_unreachable_admin(tmp_path):
    result = verge(
        "purge",
        "--admin",
        f"http://127.0.0.1:{free_port()}",
        "--token",
        "t",
        "http://site/x",
        env=env_without("VERGE_TOKEN"),
    )
    assert_clean_failure(result, "cannot reach")


def test_purge_with_wrong_token(edge):
    result = verge(
        "purge",
        "--admin",
        edge.admin_url,
        "--token",
        "wrong",
        "http://site/x",
        env=env_without("VERGE_TOKEN"),
    )
    assert_clean_failure(result, "wrong admin token")


def test_purge_token_from_environment(edge):
    env = env_without("VERGE_TOKEN")
    env["VERGE_TOKEN"] = edge.token
    result = verge("purge", "--admin", edge.admin_url, "http://site/x", env=env)
    assert result.code == 0, result
    assert "purged" in result.out


def test_tokens_can_come_from_a_file_instead_of_the_command_line(tmp_path):
    """`--token @FILE` (and the VERGE_*TOKEN variables) keep secrets out of `ps`."""
    import typer

    from verge.cli.secrets import secret_value

    token_file = tmp_path / "admin.token"
    token_file.write_text("vrg_secret_123\n")
    assert secret_value(f"@{token_file}") == "vrg_secret_123"
    assert secret_value("plain") == "plain" and secret_value(None) is None
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        if bad.name == "empty":
            bad.write_text("\n")
        with pytest.raises(typer.BadParameter):
            secret_value(f"@{bad}")


def test_version():
    done = subprocess.run([*VERGE, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("verge 0.")


def _api_commands(seen: list) -> typer.Typer:
    """Two commands made the way the control-plane commands are (`with_api`)."""
    from verge.cli.common import Api, with_api

    app = typer.Typer()

    @app.command("one")
    @with_api
    def one(api: Api, name: Annotated[str, typer.Argument()], count: int = 1) -> None:
        seen.append((api, name, count))

    @app.command("raw")
    @with_api(json_option=False)
    def raw(api: Api) -> None:
        seen.append(api)

    return app


def test_with_api_adds_control_token_and_json_after_a_commands_own_options():
    from typer.testing import CliRunner

    from verge.cli.common import DEFAULT_CONTROL, Api

    seen: list = []
    app, runner = _api_commands(seen), CliRunner()
    result = runner.invoke(app, ["one", "x", "--count", "2", "--token", "t", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == [(Api(DEFAULT_CONTROL, "t", True), "x", 2)]
    result = runner.invoke(app, ["raw"], env={"VERGE_CONTROL": "http://c:1", "VERGE_TOKEN": "v"})
    assert result.exit_code == 0, result.output
    assert seen[-1] == Api("http://c:1", "v", False)
    assert runner.invoke(app, ["raw", "--json"]).exit_code == 2  # no --json there
    options = [p.name for p in typer.main.get_command(app).commands["one"].params]
    assert options == ["name", "count", "control", "token", "as_json"]


def test_api_prints_json_or_a_line_for_people(capsys):
    from verge.cli.common import Api

    Api(as_json=True).report({"deleted": "x"}, "x deleted")
    Api().report({"deleted": "x"}, "x deleted")
    Api(as_json=True).listing([{"a": 1}], "Things", [("a", "A")])
    Api().listing([], "Things", [("a", "A")])
    out = capsys.readouterr().out
    assert out == '{\n  "deleted": "x"\n}\nx deleted\n[\n  {\n    "a": 1\n  }\n]\n(no things)\n'
